"""Declarative checkpoint porting: key tables + per-key transforms, validated against `nnx.eval_shape`.

A port table is a list of `KeyMap` entries. Each maps one source key pattern (or several, combined by
the transform) to one destination path of the NNX model's state::

    TABLE = [
        KeyMap("blocks.{i}.mlp.fc1.weight", "blocks.{i}.mlp.fc1.kernel", linear),
        KeyMap("blocks.{i}.mlp.fc1.bias", "blocks.{i}.mlp.fc1.bias"),
        KeyMap(("blocks.{i}.attn.q_bias", "blocks.{i}.attn.zero_k_bias", "blocks.{i}.attn.v_bias"),
               "blocks.{i}.attn.qkv.bias", concat),
    ]

Placeholders ``{name}`` match one dotted component. `port_state_dict` applies the table to a state dict,
checks the result against the abstract model (every missing, unexpected or misshapen key is named in
one `PortError`), and returns a concrete model.

The checked port is a `PortPlan` (`plan_port`): the abstract model plus, per state leaf, its source tensors
and transform, evaluated only when the leaf is needed. `PortPlan.build` fills the model leaf by leaf;
`PortPlan.deferred_state` hands the leaves to `bitlaws.checkpoint.save_deferred_state`, which writes them
to disk a batch at a time (with lazily read sources, no copy of the whole model is ever in memory). Inside
`recording_plans`, `port_state_dict` records its plan and returns the abstract model instead, so a model's
own port function (with its ``ctor`` handling and extra checks) yields the plan.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import re
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bitlaws.checkpoint import DeferredArray, dotted_path

Transform = Callable[..., np.ndarray]


def identity(x: np.ndarray) -> np.ndarray:
    return x


def linear(w: np.ndarray) -> np.ndarray:
    """PyTorch Linear ``(out, in)`` -> kernel ``(in, out)``."""
    return np.ascontiguousarray(w.T)


def conv(w: np.ndarray) -> np.ndarray:
    """PyTorch Conv2d ``(O, I, kh, kw)`` -> HWIO ``(kh, kw, I, O)``."""
    return np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)))


def conv1x1_to_linear(w: np.ndarray) -> np.ndarray:
    """A 1x1 Conv2d ``(O, I, 1, 1)`` -> linear kernel ``(in, out)``."""
    if w.ndim != 4 or w.shape[2:] != (1, 1):
        raise ValueError(f"expected a 1x1 conv weight (O, I, 1, 1), got shape {w.shape}")
    return np.ascontiguousarray(w[:, :, 0, 0].T)


def linear_to_conv1x1(w: np.ndarray) -> np.ndarray:
    """A Linear ``(out, in)`` -> 1x1 HWIO conv kernel ``(1, 1, in, out)``."""
    return np.ascontiguousarray(w.T[None, None])


def concat(*parts: np.ndarray) -> np.ndarray:
    """Concatenates several source tensors along axis 0 (e.g. q/k/v biases)."""
    return np.concatenate(parts, axis=0)


def squeeze(x: np.ndarray) -> np.ndarray:
    return np.squeeze(x)


def reshape_to(*shape: int) -> Transform:
    """A transform that reshapes to `shape`."""
    return lambda x: np.reshape(x, shape)


@dataclasses.dataclass(frozen=True)
class KeyMap:
    """One row of a port table.

    Attributes:
        src: Source key pattern, or a tuple of patterns sharing the same placeholders.
        dst: Destination dotted path in the NNX state (``blocks.{i}.attn.qkv.kernel``).
        transform: ``fn(*sources) -> array`` applied before the shape check.
    """

    src: Union[str, tuple[str, ...]]
    dst: str
    transform: Transform = identity

    @property
    def sources(self) -> tuple[str, ...]:
        return (self.src,) if isinstance(self.src, str) else tuple(self.src)


class PortError(ValueError):
    """The converted state does not fit the model; lists every offending key."""

    def __init__(self, model: str, missing: Sequence[str], unexpected: Sequence[str],
                 misshapen: Sequence[str]):
        self.missing, self.unexpected, self.misshapen = list(missing), list(unexpected), list(misshapen)
        lines = [f"checkpoint does not match {model}:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("misshapen", misshapen)):
            if items:
                lines.append(f"  {len(items)} {title}: " + ", ".join(items))
        super().__init__("\n".join(lines))


def _pattern_regex(pattern: str) -> re.Pattern:
    parts = re.split(r"(\{\w+\})", pattern)
    regex = "".join(f"(?P<{p[1:-1]}>[^.]+)" if p.startswith("{") else re.escape(p) for p in parts)
    return re.compile(regex)


def _placeholders(pattern: str) -> list[str]:
    return re.findall(r"\{(\w+)\}", pattern)


@dataclasses.dataclass(frozen=True, eq=False)
class PortedLeaf:
    """One destination leaf of a port, computed on demand from its source tensors.

    Attributes:
        sources: The source values (arrays, or lazily read tensors such as
            `bitlaws.port.torch_pickle.StoredTensor`; anything ``np.asarray`` accepts with ``shape``/``dtype``).
        transform: ``fn(*sources) -> array``.
        shape: Shape of the transformed array (known without reading the sources).
        dtype: Dtype of the transformed array.
    """

    sources: tuple[Any, ...]
    transform: Transform
    shape: tuple[int, ...]
    dtype: np.dtype

    def value(self) -> np.ndarray:
        """Reads the sources and applies the transform."""
        return np.asarray(self.transform(*(np.asarray(src) for src in self.sources)))


_SHAPE_RULES: dict[Callable, Callable[[tuple[int, ...]], tuple[int, ...]]] = {
    identity: lambda s: s,
    linear: lambda s: s[::-1] if len(s) == 2 else None,
    conv: lambda s: (s[2], s[3], s[1], s[0]) if len(s) == 4 else None,
}
"""Output shapes of common single-source transforms (others are probed on a stand-in, see `_leaf`)."""


def _leaf(transform: Transform, sources: tuple[Any, ...]) -> PortedLeaf:
    """A `PortedLeaf` whose output shape and dtype are found without reading `sources`.

    Transforms without a rule in `_SHAPE_RULES` run on zero-filled stand-ins of the sources' shapes (a
    broadcast scalar, so only the transform's own output is allocated, and freed at once).
    """
    shapes = [tuple(np.shape(src)) for src in sources]
    dtypes = [np.dtype(src.dtype) for src in sources]
    rule = _SHAPE_RULES.get(transform)
    shape = rule(shapes[0]) if rule is not None and len(sources) == 1 else None
    if shape is not None:
        return PortedLeaf(sources, transform, tuple(shape), dtypes[0])
    stand_ins = [np.broadcast_to(np.zeros((), dtype), shape) for dtype, shape in zip(dtypes, shapes)]
    probe = np.asarray(transform(*stand_ins))
    return PortedLeaf(sources, transform, tuple(probe.shape), probe.dtype)


def plan_table(state_dict: Mapping[str, Any], table: Sequence[KeyMap],
               ignore: Iterable[str] = ()) -> tuple[dict[str, PortedLeaf], list[str]]:
    """Maps a source state dict through a table without reading any tensor.

    Args:
        state_dict: ``{source key: array or lazily read tensor}``.
        table: The port table; for each source key the first entry whose first pattern matches is used.
        ignore: Regexes (fullmatch) of source keys to drop (buffers recomputed by our model).

    Returns:
        ``(converted {dst path: PortedLeaf}, unexpected source keys)``. Source keys of a multi-source entry
        whose partner keys are absent are reported as unexpected.
    """
    ignore_res = [re.compile(p) for p in ignore]
    compiled = [(entry, [_pattern_regex(p) for p in entry.sources]) for entry in table]
    converted: dict[str, PortedLeaf] = {}
    used: set[str] = set()
    unexpected: list[str] = []
    for key in state_dict:
        if key in used:
            continue
        if any(r.fullmatch(key) for r in ignore_res):
            used.add(key)
            continue
        for entry, regexes in compiled:
            match = None
            for regex in regexes:
                match = regex.fullmatch(key)
                if match:
                    break
            if match is None:
                continue
            values = match.groupdict()
            names = [p.format(**values) for p in entry.sources]
            if not all(n in state_dict for n in names):
                continue
            used.update(names)
            converted[entry.dst.format(**values)] = _leaf(entry.transform, tuple(state_dict[n] for n in names))
            break
        else:
            unexpected.append(key)
    return converted, [k for k in unexpected if k not in used]


def apply_table(state_dict: Mapping[str, np.ndarray], table: Sequence[KeyMap],
                ignore: Iterable[str] = ()) -> tuple[dict[str, np.ndarray], list[str]]:
    """Maps a source state dict through a table (`plan_table`, every leaf computed).

    Returns:
        ``(converted {dst path: array}, unexpected source keys)``.
    """
    converted, unexpected = plan_table(state_dict, table, ignore)
    return {key: leaf.value() for key, leaf in converted.items()}, unexpected


def _flat_target(abstract_model: nnx.Module) -> dict[str, jax.ShapeDtypeStruct]:
    _, state = nnx.split(abstract_model)
    return {".".join(str(p) for p in path): var.get_value()
            for path, var in nnx.to_flat_state(state)}


@dataclasses.dataclass(frozen=True, eq=False)
class PortPlan:
    """A checked port: the abstract model and, for each of its state leaves, how to compute it.

    Attributes:
        model_name: Used in messages.
        abstract: ``nnx.eval_shape`` of the model (no weights allocated).
        leaves: ``{dotted state path: PortedLeaf}`` for every state leaf, in the model's state order.
        dtypes: ``{dotted state path: the model's dtype}`` (leaves are cast to it).
    """

    model_name: str
    abstract: nnx.Module
    leaves: dict[str, PortedLeaf]
    dtypes: dict[str, np.dtype]

    def build(self) -> nnx.Module:
        """The concrete model: each leaf computed and cast to the model's dtype, one at a time."""
        graphdef, state = nnx.split(self.abstract)
        for path, var in nnx.to_flat_state(state):
            key = ".".join(str(p) for p in path)
            var.set_value(jnp.asarray(self.leaves[key].value(), dtype=self.dtypes[key]))
        return nnx.merge(graphdef, state)

    def deferred_state(self) -> dict:
        """``nnx.to_pure_dict`` of the model's state with `DeferredArray` leaves (for `save_deferred_state`)."""
        pure = nnx.to_pure_dict(nnx.state(self.abstract))

        def deferred(path, _):
            key = dotted_path(path)
            leaf = self.leaves[key]
            return DeferredArray(leaf.shape, self.dtypes[key], leaf.value)

        return jax.tree_util.tree_map_with_path(deferred, pure)


_RECORDED_PLANS: contextvars.ContextVar[list[PortPlan] | None] = contextvars.ContextVar("port_plans", default=None)


@contextlib.contextmanager
def recording_plans() -> Iterator[list[PortPlan]]:
    """Inside, `port_state_dict` checks its port, appends the `PortPlan` to the yielded list and returns the
    *abstract* model without reading any weight.

    ``with recording_plans() as plans: port_var(lazy_state_dict, **ctor)`` gives the plan of VAR's port
    (its constructor handling and its own checks included) for streaming it to a checkpoint.
    """
    plans: list[PortPlan] = []
    token = _RECORDED_PLANS.set(plans)
    try:
        yield plans
    finally:
        _RECORDED_PLANS.reset(token)


def plan_port(state_dict: Mapping[str, Any], table: Sequence[KeyMap], make_model: Callable[[], nnx.Module], *,
              ignore: Iterable[str] = (), model_name: str = "model") -> PortPlan:
    """Checks a port against the abstract model, reading no tensor.

    Args:
        state_dict: ``{source key: array or lazily read tensor}`` (e.g. ``read_state_dict(path, lazy=True)``).
        table: The model's port table.
        make_model: Zero-argument constructor of the NNX model; only evaluated abstractly (`nnx.eval_shape`).
        ignore: Regexes of source keys to drop.
        model_name: Used in error messages.

    Returns:
        The plan: every model state leaf paired with its sources and transform.

    Raises:
        PortError: naming every missing, unexpected and misshapen key at once.
    """
    converted, unexpected = plan_table(state_dict, table, ignore)
    abstract = nnx.eval_shape(make_model)
    target = _flat_target(abstract)
    missing = [k for k in target if k not in converted]
    unexpected += [k for k in converted if k not in target]
    misshapen = [f"{k} (checkpoint {tuple(converted[k].shape)}, model {tuple(target[k].shape)})"
                 for k in target if k in converted and tuple(converted[k].shape) != tuple(target[k].shape)]
    if missing or unexpected or misshapen:
        raise PortError(model_name, missing, unexpected, misshapen)
    return PortPlan(model_name, abstract, {k: converted[k] for k in target},
                    {k: np.dtype(v.dtype) for k, v in target.items()})


def port_state_dict(state_dict: Mapping[str, np.ndarray], table: Sequence[KeyMap],
                    make_model: Callable[[], nnx.Module], *, ignore: Iterable[str] = (),
                    model_name: str = "model") -> nnx.Module:
    """Builds a model from a foreign state dict.

    Args:
        state_dict: ``{source key: array}`` (e.g. from `read_state_dict`; lazily read tensors work too).
        table: The model's port table.
        make_model: Zero-argument constructor of the NNX model; only evaluated abstractly
            (`nnx.eval_shape`), so porting a large model allocates its weights once.
        ignore: Regexes of source keys to drop.
        model_name: Used in error messages.

    Returns:
        The model with every state leaf taken from the checkpoint (inside `recording_plans`: the abstract
        model, the plan being recorded instead).

    Raises:
        PortError: naming every missing, unexpected and misshapen key at once.
    """
    plan = plan_port(state_dict, table, make_model, ignore=ignore, model_name=model_name)
    recorded = _RECORDED_PLANS.get()
    if recorded is not None:
        recorded.append(plan)
        return plan.abstract
    return plan.build()


def to_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """The model's state as ``{dotted path: numpy array}`` (handy for tests and debugging)."""
    _, state = nnx.split(model)
    return {".".join(str(p) for p in path): np.asarray(var.get_value())
            for path, var in nnx.to_flat_state(state)}
