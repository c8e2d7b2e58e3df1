"""Capture the inputs (and outputs) of modules at given dotted paths while a forward function runs.

Model-agnostic: nothing is asked of the model. `recording` returns an `nnx.clone` of the model (sharing every
array) in which each requested module is wrapped by a `Recorder`; the recorder sends its call's arguments
(and, optionally, its output) to the host with an ordered `jax.debug.callback`, then calls the wrapped
module. That works eagerly and inside `jax.jit` / `nnx.jit` (python-side appends of tracers would not), so the
forward of a `CalibrationData` can stay compiled. Recorders find their sink by a static token (the path)
when the callback fires, so repeated captures of the same model and paths reuse one compiled forward.

What is recorded per call (`Call`): the positional and keyword arguments with their pytree structure kept.
Leaves that are jax arrays at call time (tracers under jit) arrive as host numpy arrays; every other leaf
(numpy constants such as VAR's attention mask, python numbers) is kept as the object that was passed.

`stack_calls` turns the calls of one module into a `CallBatch` for block-wise training: leaves with the
calls' batch axis are concatenated (``[n, ...]``), the others must be the same in every call and are kept once.

Example::

    calls = capture_calls(model, ["blocks.0"], data)        # {"blocks.0": [Call, ...]} one per batch
    batch = stack_calls(calls["blocks.0"], "blocks.0")
    args, kwargs = batch.signature.rebuild(batch.batched, batch.arrays)
    y = model.blocks[0](*args, **kwargs)                     # the block on all captured inputs at once
"""

from __future__ import annotations

import dataclasses
import re
import threading
from typing import Any, Iterable, Optional, Sequence

import jax
import numpy as np
from flax import nnx

from bitlaws.quant.methods import CalibrationData


@dataclasses.dataclass(frozen=True)
class Call:
    """One recorded call of a module.

    Attributes:
        args: Positional arguments (jax arrays as host numpy arrays).
        kwargs: Keyword arguments.
        output: The output (same conversion), or None when outputs were not recorded.
    """

    args: tuple
    kwargs: dict
    output: Any = None


class _Sink:
    """Host-side list of ``(kind, tree)`` records of one recorded module."""

    def __init__(self, path: str):
        self.path = path
        self.records: list[tuple[str, Any]] = []

    def calls(self) -> list[Call]:
        """Pairs each input record with the output record that follows it (ordered callbacks)."""
        calls, pending = [], None
        for kind, tree in self.records:
            if kind == "in":
                if pending is not None:
                    calls.append(Call(*pending))
                pending = tree
            else:
                if pending is None:
                    raise RuntimeError(f"capture: output of {self.path} recorded before its input")
                calls.append(Call(*pending, output=tree))
                pending = None
        if pending is not None:
            calls.append(Call(*pending))
        return calls

    def take_calls(self) -> list[Call]:
        """`calls` recorded so far, then forgets them (a long run can summarise and drop as it goes).

        Call `jax.effects_barrier` first so that every callback of the computations run so far has landed.
        """
        calls = self.calls()
        self.records.clear()
        return calls


# Recorders name their sink by a token (a static string) looked up when a callback fires: two recordings of the
# same model and paths have equal graphs, so a compiled forward is reused instead of recompiled, and it still
# delivers to the sinks of the recording that runs it. A token in use gets a suffix (a new graph).
_ACTIVE: dict[str, _Sink] = {}
_LOCK = threading.Lock()


def _claim(path: str, sink: _Sink) -> str:
    with _LOCK:
        token, n = path, 0
        while token in _ACTIVE:
            n += 1
            token = f"{path}#{n}"
        _ACTIVE[token] = sink
        return token


def _release(tokens: Iterable[str]) -> None:
    with _LOCK:
        for token in tokens:
            _ACTIVE.pop(token, None)


def _to_host(value: Any) -> np.ndarray:
    return np.array(value, copy=True)


def _send(token: str, kind: str, tree: Any) -> None:
    """Sends `tree`'s array leaves to the host (ordered callback); other leaves are closed over as they are."""
    leaves, treedef = jax.tree.flatten(tree)
    dynamic = [i for i, leaf in enumerate(leaves) if isinstance(leaf, jax.Array)]
    fixed = list(leaves)

    def receive(*values):
        sink = _ACTIVE.get(token)
        if sink is None:
            raise RuntimeError(f"capture: recorder {token!r} ran after its recording stopped")
        full = list(fixed)
        for i, value in zip(dynamic, values):
            full[i] = _to_host(value)
        sink.records.append((kind, jax.tree.unflatten(treedef, full)))

    jax.debug.callback(receive, *[leaves[i] for i in dynamic], ordered=True)


class Recorder(nnx.Module):
    """Wraps a module: records each call's arguments (and output) on the host, then calls the module.

    Attributes of the wrapped module stay reachable through the recorder (``recorder.attn`` is
    ``recorder.inner.attn``), so model code that reads them keeps working.
    """

    def __init__(self, inner: nnx.Module, token: str, outputs: bool):
        self.inner = inner
        self.token = token
        self.outputs = outputs

    def __call__(self, *args, **kwargs):
        _send(self.token, "in", (args, kwargs))
        out = self.inner(*args, **kwargs)
        if self.outputs:
            _send(self.token, "out", out)
        return out

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("inner", "token", "outputs"):
            raise AttributeError(name)
        return getattr(self.inner, name)


def _path_key(path: str) -> tuple:
    """Sort key: dotted paths in natural order (``blocks.2`` before ``blocks.10``), parents before children."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.split("."))


def natural_sorted(paths: Iterable[str]) -> list[str]:
    """Dotted paths sorted naturally (numeric parts as numbers)."""
    return sorted(paths, key=_path_key)


def _child(node: Any, part: str) -> Any:
    if part.isdigit() and not hasattr(node, part):
        return node[int(part)]
    return getattr(node, part)


def get_module(model: nnx.Module, path: str) -> nnx.Module:
    """The module at dotted `path` (``blocks.3.attn``).

    Raises:
        ValueError: no module at `path` (the message lists a few existing module paths).
    """
    node = model
    try:
        for part in path.split("."):
            node = _child(node, part)
    except (AttributeError, IndexError, KeyError, TypeError):
        node = None
    if not isinstance(node, nnx.Module):
        known = [".".join(str(p) for p in p_) for p_, _ in nnx.iter_modules(model) if p_]
        raise ValueError(f"capture: no module at path {path!r}; module paths include {natural_sorted(known)[:12]}")
    return node


def _replace(model: nnx.Module, path: str, new: nnx.Module) -> None:
    *parents, leaf = path.split(".")
    parent = get_module(model, ".".join(parents)) if parents else model
    if leaf.isdigit() and not hasattr(parent, leaf):
        parent[int(leaf)] = new
    else:
        setattr(parent, leaf, new)


def recording(model: nnx.Module, paths: Sequence[str], *,
              outputs: bool = False) -> tuple[nnx.Module, dict[str, _Sink]]:
    """A clone of `model` whose modules at `paths` record their calls, until `stop_recording`.

    Args:
        model: Any NNX model (left unchanged; the clone shares its arrays).
        paths: Dotted module paths (nested paths are fine).
        outputs: Also record each call's output.

    Returns:
        ``(clone, {path: sink})``; run the clone, then read ``sink.calls()`` and call `stop_recording`.

    Raises:
        ValueError: a path names no module, or an empty path.
    """
    paths = list(dict.fromkeys(paths))
    if any(not p for p in paths):
        raise ValueError("capture: module paths must be non-empty (wrap the model's forward to see its inputs)")
    clone = nnx.clone(model)
    for path in paths:
        get_module(clone, path)  # validate all before changing anything
    sinks = {path: _Sink(path) for path in paths}
    for path in sorted(paths, key=_path_key, reverse=True):  # children before their parents
        _replace(clone, path, Recorder(get_module(clone, path), _claim(path, sinks[path]), outputs))
    return clone, sinks


def stop_recording(clone: nnx.Module) -> None:
    """Detaches the recorders of a `recording` clone from their sinks (running it again raises)."""
    _release(m.token for _, m in nnx.iter_modules(clone) if isinstance(m, Recorder))


def capture_calls(model: nnx.Module, paths: Sequence[str], data: CalibrationData, *,
                  outputs: bool = False) -> dict[str, list[Call]]:
    """Runs ``data.forward`` over ``data.batches`` and returns every call of the modules at `paths`.

    A forward compiled by an earlier capture of the same model structure and paths is reused.

    Args:
        model: The model to run (unchanged).
        paths: Dotted module paths.
        data: The forward function (may be `nnx.jit`-compiled) and batches.
        outputs: Also record outputs.

    Returns:
        ``{path: [Call, ...]}`` in call order (one per batch for a module called once per forward; empty for a
        module the forward never calls).
    """
    clone, sinks = recording(model, paths, outputs=outputs)
    try:
        for batch in data.batches:
            jax.block_until_ready(data.forward(clone, batch))
            jax.effects_barrier()
    finally:
        jax.effects_barrier()
        stop_recording(clone)
    return {path: sink.calls() for path, sink in sinks.items()}


# ------------------------------------------------------------------------------------------- stacking
BATCHED, ARRAY, STATIC = "batched", "array", "static"


@dataclasses.dataclass(frozen=True)
class CallSignature:
    """The hashable structure of stacked calls: what `rebuild` needs besides the arrays.

    Attributes:
        treedef: Structure of ``(args, kwargs)``.
        kinds: Per leaf: ``batched`` (leading batch axis), ``array`` (a shared array) or ``static`` (a shared
            non-array value, stored in `statics`).
        statics: The static leaves, in order.
    """

    treedef: Any
    kinds: tuple[str, ...]
    statics: tuple

    def rebuild(self, batched: Sequence[Any], arrays: Sequence[Any]) -> tuple[tuple, dict]:
        """``(args, kwargs)`` from the batched leaves and the shared arrays (e.g. inside a jitted function)."""
        batched, arrays, statics = iter(batched), iter(arrays), iter(self.statics)
        source = {BATCHED: batched, ARRAY: arrays, STATIC: statics}
        return jax.tree.unflatten(self.treedef, [next(source[kind]) for kind in self.kinds])


@dataclasses.dataclass(frozen=True)
class CallBatch:
    """The inputs of ``n`` samples of a module's calls, stacked.

    Attributes:
        signature: The structure (`CallSignature`).
        batched: The batched leaves, each ``[n, ...]`` (numpy).
        arrays: The shared array leaves (numpy), e.g. a mask without batch axis.
    """

    signature: CallSignature
    batched: tuple[np.ndarray, ...]
    arrays: tuple[np.ndarray, ...]

    @property
    def n(self) -> int:
        return int(self.batched[0].shape[0]) if self.batched else 0

    def call_args(self) -> tuple[tuple, dict]:
        """``(args, kwargs)`` of one call on all ``n`` samples."""
        return self.signature.rebuild(self.batched, self.arrays)


def _batch_size(call: Call) -> Optional[int]:
    """Leading size of the call's first array argument (positional first), None without array arguments."""
    for leaf in jax.tree.leaves((call.args, call.kwargs)):
        if isinstance(leaf, np.ndarray) and leaf.ndim >= 1:
            return int(leaf.shape[0])
    return None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.shape == b.shape
                and a.dtype == b.dtype and bool(np.array_equal(a, b, equal_nan=True)))
    return a is b or a == b


def stack_calls(calls: Sequence[Call], what: str = "module") -> CallBatch:
    """Stacks the inputs of several calls of one module along their batch axis.

    The batch size of a call is the leading size of its first array argument (positional first); an array
    leaf with that leading size is *batched* and concatenated over calls; every other leaf (an array without
    it, a numpy constant, a python value) must be equal in all calls and is kept once. Caveat: with batch size
    1 a shared array of leading size 1 counts as batched.

    Args:
        calls: The calls (`capture_calls`), at least one, all with the same argument structure.
        what: Name for error messages (the module path).

    Raises:
        ValueError: no calls; calls with different structures; a leaf batched in one call but not another; a
            shared leaf that differs between calls (the message names the argument).
    """
    if not calls:
        raise ValueError(f"stack_calls: {what} was never called (no calls to stack)")
    flat = [jax.tree_util.tree_flatten_with_path((c.args, c.kwargs)) for c in calls]
    treedef = flat[0][1]
    for i, (_, other) in enumerate(flat):
        if other != treedef:
            raise ValueError(f"stack_calls: call {i} of {what} has arguments {other}, call 0 had {treedef}")
    names = [jax.tree_util.keystr(path) for path, _ in flat[0][0]]
    per_call = [[leaf for _, leaf in leaves] for leaves, _ in flat]
    sizes = [_batch_size(c) for c in calls]
    kinds, batched, arrays, statics = [], [], [], []
    for j, name in enumerate(names):
        values = [leaves[j] for leaves in per_call]
        is_batched = [isinstance(v, np.ndarray) and v.ndim >= 1 and b is not None and v.shape[0] == b
                      for v, b in zip(values, sizes)]
        if any(is_batched):
            if not all(is_batched):
                raise ValueError(f"stack_calls: argument {name} of {what} has the batch axis in some calls only "
                                 f"(shapes {[getattr(v, 'shape', None) for v in values]})")
            kinds.append(BATCHED)
            batched.append(np.concatenate(values, axis=0))
            continue
        for i, v in enumerate(values[1:], 1):
            if not _same(values[0], v):
                raise ValueError(f"stack_calls: argument {name} of {what} has no batch axis but differs between "
                                 f"call 0 and call {i}; it cannot be shared")
        if isinstance(values[0], np.ndarray):
            kinds.append(ARRAY)
            arrays.append(values[0])
        else:
            kinds.append(STATIC)
            statics.append(values[0])
    signature = CallSignature(treedef, tuple(kinds), tuple(statics))
    return CallBatch(signature, tuple(batched), tuple(arrays))


def paths_matching(model: nnx.Module, pattern: str) -> list[str]:
    """Dotted paths of the modules of `model` whose path fully matches the regex `pattern`, naturally sorted."""
    regex = re.compile(pattern)
    found = [".".join(str(p) for p in path) for path, _ in nnx.iter_modules(model) if path]
    return natural_sorted(p for p in found if regex.fullmatch(p))


__all__ = ["Call", "CallBatch", "CallSignature", "Recorder", "capture_calls", "get_module", "natural_sorted",
           "paths_matching", "recording", "stack_calls", "stop_recording"]
