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
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable, Mapping, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

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


def apply_table(state_dict: Mapping[str, np.ndarray], table: Sequence[KeyMap],
                ignore: Iterable[str] = ()) -> tuple[dict[str, np.ndarray], list[str]]:
    """Maps a source state dict through a table.

    Args:
        state_dict: ``{source key: array}``.
        table: The port table; for each source key the first entry whose first pattern matches is used.
        ignore: Regexes (fullmatch) of source keys to drop (buffers recomputed by our model).

    Returns:
        ``(converted {dst path: array}, unexpected source keys)``. Source keys of a multi-source entry whose
        partner keys are absent are reported as unexpected.
    """
    ignore_res = [re.compile(p) for p in ignore]
    compiled = [(entry, [_pattern_regex(p) for p in entry.sources]) for entry in table]
    converted: dict[str, np.ndarray] = {}
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
            for position, regex in enumerate(regexes):
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
            converted[entry.dst.format(**values)] = entry.transform(*(np.asarray(state_dict[n]) for n in names))
            break
        else:
            unexpected.append(key)
    return converted, [k for k in unexpected if k not in used]


def _flat_target(abstract_model: nnx.Module) -> dict[str, jax.ShapeDtypeStruct]:
    _, state = nnx.split(abstract_model)
    return {".".join(str(p) for p in path): var.get_value()
            for path, var in nnx.to_flat_state(state)}


def port_state_dict(state_dict: Mapping[str, np.ndarray], table: Sequence[KeyMap],
                    make_model: Callable[[], nnx.Module], *, ignore: Iterable[str] = (),
                    model_name: str = "model") -> nnx.Module:
    """Builds a model from a foreign state dict.

    Args:
        state_dict: ``{source key: array}`` (e.g. from `read_state_dict`).
        table: The model's port table.
        make_model: Zero-argument constructor of the NNX model; only evaluated abstractly
            (`nnx.eval_shape`), so porting a large model allocates its weights once.
        ignore: Regexes of source keys to drop.
        model_name: Used in error messages.

    Returns:
        The model with every state leaf taken from the checkpoint.

    Raises:
        PortError: naming every missing, unexpected and misshapen key at once.
    """
    converted, unexpected = apply_table(state_dict, table, ignore)
    abstract = nnx.eval_shape(make_model)
    target = _flat_target(abstract)
    missing = [k for k in target if k not in converted]
    unexpected += [k for k in converted if k not in target]
    misshapen = [f"{k} (checkpoint {tuple(converted[k].shape)}, model {tuple(target[k].shape)})"
                 for k in target if k in converted and tuple(converted[k].shape) != tuple(target[k].shape)]
    if missing or unexpected or misshapen:
        raise PortError(model_name, missing, unexpected, misshapen)
    graphdef, state = nnx.split(abstract)
    for path, var in nnx.to_flat_state(state):
        key = ".".join(str(p) for p in path)
        var.set_value(jnp.asarray(converted[key], dtype=target[key].dtype))
    return nnx.merge(graphdef, state)


def to_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
    """The model's state as ``{dotted path: numpy array}`` (handy for tests and debugging)."""
    _, state = nnx.split(model)
    return {".".join(str(p) for p in path): np.asarray(var.get_value())
            for path, var in nnx.to_flat_state(state)}
