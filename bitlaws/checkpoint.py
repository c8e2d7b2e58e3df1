"""Orbax checkpoints of NNX models: save a model's state, restore it into an abstract model.

A checkpoint directory holds the pure state tree (``nnx.to_pure_dict``) written by orbax's
`StandardCheckpointer`, plus ``bitlaws.json`` with free-form metadata (constructor arguments, training
summary). Restoring validates the tree against ``nnx.eval_shape`` of the model, so a checkpoint of another
size fails with an error naming the mismatching keys.

`save_deferred_state` writes the same checkpoint from a tree of `DeferredArray` leaves, each computed only when
the writer reaches it, a batch of leaves at a time: a model far larger than memory can be written from a
lazily read source (`bitlaws port` streams official checkpoints this way).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import pathlib
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

METADATA_FILE = "bitlaws.json"
STATE_DIR = "state"


def _key_name(entry) -> str:
    return str(getattr(entry, "key", getattr(entry, "idx", getattr(entry, "name", entry))))


def dotted_path(path) -> str:
    """A key path as a dotted name (``blocks.0.attn.qkv.kernel``): pytree dict keys, list indices and attribute
    names alike, or an NNX state path of plain strings and ints."""
    return ".".join(_key_name(entry) for entry in path)


def _flat_shapes(tree) -> dict[str, tuple]:
    """``{dotted path: shape}``; integer keys (NNX lists) and their stored string form compare equal."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {dotted_path(path): tuple(np.shape(leaf)) for path, leaf in flat}


def save_model(model: nnx.Module, directory: Union[str, pathlib.Path], metadata: Optional[dict] = None) -> pathlib.Path:
    """Writes `model`'s state (and `metadata` as JSON) to `directory`, replacing an existing checkpoint there."""
    directory = pathlib.Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    state = nnx.to_pure_dict(nnx.state(model))
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / STATE_DIR, state, force=True)
    (directory / METADATA_FILE).write_text(json.dumps(metadata or {}, indent=2, sort_keys=True))
    return directory


@dataclasses.dataclass(frozen=True)
class DeferredArray:
    """A checkpoint leaf computed when `save_deferred_state` reaches it.

    Attributes:
        shape: Shape of the computed array.
        dtype: Dtype it is stored with (the computed array is cast as ``jnp.asarray(value, dtype)``).
        compute: ``() -> array`` of `shape`; called once, while saving.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    compute: Callable[[], Any]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


DEFAULT_BATCH_BYTES = 1 << 26
"""Bytes of computed leaves `save_deferred_state` holds at once (a larger leaf forms a batch of its own)."""


class _DeferredArrayHandler(ocp.type_handlers.TypeHandler):
    """Saves `DeferredArray` leaves exactly as orbax's ``jax.Array`` handler saves arrays, a batch at a time.

    Each batch is computed, handed to the ``jax.Array`` handler and written to the end before the next batch is
    computed, so at most about `batch_bytes` of leaves (and the writer's buffers for them) are in memory. The
    leaves are recorded as ``jax.Array`` values, with the same tree metadata, sharding and array metadata as
    `save_model` writes.
    """

    def __init__(self, arrays: ocp.type_handlers.TypeHandler, batch_bytes: int):
        self._arrays = arrays
        self._batch_bytes = batch_bytes

    def typestr(self) -> str:
        return self._arrays.typestr()

    async def metadata(self, infos):
        return await self._arrays.metadata(infos)

    async def deserialize(self, infos, args=None):
        return await self._arrays.deserialize(infos, args)

    async def serialize(self, values: Sequence[DeferredArray], infos, args=None):
        args = list(args) if args else [ocp.type_handlers.SaveArgs()] * len(values)
        for batch in _batches(list(zip(values, infos, args)), self._batch_bytes):
            arrays = [_computed(value, info.name) for value, info, _ in batch]
            futures = await self._arrays.serialize(arrays, [b[1] for b in batch], [b[2] for b in batch])
            del arrays  # the writer keeps what it still needs until its futures are done
            await asyncio.to_thread(lambda fs=futures: [f.result() for f in fs])
        return []


def _batches(items: list, max_bytes: int) -> list[list]:
    """Consecutive groups of ``(DeferredArray, ...)`` items of at most `max_bytes` (at least one item each)."""
    batches, current, size = [], [], 0
    for item in items:
        if current and size + item[0].nbytes > max_bytes:
            batches.append(current)
            current, size = [], 0
        current.append(item)
        size += item[0].nbytes
    return batches + [current] if current else batches


def _computed(value: DeferredArray, name: str) -> jax.Array:
    array = jnp.asarray(value.compute(), dtype=value.dtype)
    if tuple(array.shape) != tuple(value.shape):
        raise ValueError(f"deferred leaf {name} computed shape {tuple(array.shape)}, declared {tuple(value.shape)}")
    return array


def _deferred_save_handler(batch_bytes: int) -> ocp.PyTreeCheckpointHandler:
    """The pytree handler behind `ocp.StandardCheckpointer`, with `DeferredArray` leaves saved in batches."""
    arrays = ocp.type_handlers.get_type_handler(jax.Array)
    registry = ocp.type_handlers.create_type_handler_registry(
        (DeferredArray, _DeferredArrayHandler(arrays, batch_bytes)), (jax.Array, arrays))
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def save_deferred_state(state: Any, directory: Union[str, pathlib.Path], metadata: Optional[dict] = None, *,
                        batch_bytes: int = DEFAULT_BATCH_BYTES) -> pathlib.Path:
    """Writes a pure state tree of `DeferredArray` leaves like `save_model` writes a model's state.

    Leaves are computed in tree order, `batch_bytes` at a time, and each batch is written before the next is
    computed; the tree must be what ``nnx.to_pure_dict(nnx.state(model))`` gives for the model that `load_model`
    will rebuild (same nesting and keys, each leaf the shape and dtype of the model's). `load_model` restores it
    exactly as a `save_model` checkpoint holding the computed values (the files differ only in the handler named
    in ``_CHECKPOINT_METADATA``, orbax's pytree handler instead of the standard one that wraps it, and in how
    the OCDBT data files are split).

    Args:
        state: Nested dicts with `DeferredArray` leaves.
        directory: Checkpoint directory (an existing checkpoint there is replaced).
        metadata: JSON-serialisable metadata written to ``bitlaws.json``.
        batch_bytes: Bytes of computed leaves held at once.

    Returns:
        The resolved directory.
    """
    leaves = jax.tree.leaves(state)
    wrong = [type(leaf).__name__ for leaf in leaves if not isinstance(leaf, DeferredArray)]
    if wrong or not leaves:
        raise ValueError(f"save_deferred_state needs a tree of DeferredArray leaves, got {sorted(set(wrong)) or 'none'}")
    directory = pathlib.Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.Checkpointer(_deferred_save_handler(batch_bytes)) as checkpointer:
        checkpointer.save(directory / STATE_DIR, args=ocp.args.PyTreeSave(state), force=True)
    (directory / METADATA_FILE).write_text(json.dumps(metadata or {}, indent=2, sort_keys=True))
    return directory


def load_metadata(directory: Union[str, pathlib.Path]) -> dict[str, Any]:
    path = pathlib.Path(directory) / METADATA_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {directory} is not a bitlaws checkpoint")
    return json.loads(path.read_text())


def load_model(make_model: Callable[[], nnx.Module], directory: Union[str, pathlib.Path]) -> nnx.Module:
    """Restores a checkpoint written by `save_model` into ``make_model()`` (built abstractly).

    Raises:
        FileNotFoundError: the directory holds no checkpoint.
        ValueError: the checkpoint's tree does not match the model (names the differing keys).
    """
    directory = pathlib.Path(directory).resolve()
    if not (directory / STATE_DIR).exists():
        raise FileNotFoundError(f"no checkpoint in {directory} (expected {directory / STATE_DIR})")
    graphdef, abstract_state = nnx.split(nnx.eval_shape(make_model))
    # Restored onto this process's first device, also in a multi-process job (`jax.distributed`): without a
    # target sharding orbax reuses the stored one and refuses a checkpoint written by a job of another topology.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device),
                          nnx.to_pure_dict(abstract_state))
    with ocp.StandardCheckpointer() as checkpointer:
        stored_meta = checkpointer.metadata(directory / STATE_DIR)
        stored_tree = getattr(stored_meta, "item_metadata", stored_meta)
        stored = _flat_shapes(jax.tree.map(lambda m: np.empty(m.shape, np.int8), dict(stored_tree)))
        wanted = _flat_shapes(jax.tree.map(lambda a: np.empty(a.shape, np.int8), target))
        if stored != wanted:
            raise ValueError(f"checkpoint {directory} does not match the model: {tree_mismatch(stored, wanted)}")
        restored = checkpointer.restore(directory / STATE_DIR, target)
    nnx.replace_by_pure_dict(abstract_state, restored)
    return nnx.merge(graphdef, abstract_state)


def tree_mismatch(stored: dict, wanted: dict) -> str:
    """``missing [...], unexpected [...], misshapen [...]`` between two ``{key: (shape, dtype)}`` maps."""
    missing = sorted(set(wanted) - set(stored))
    unexpected = sorted(set(stored) - set(wanted))
    misshapen = sorted(k for k in set(stored) & set(wanted) if stored[k] != wanted[k])
    return f"missing {missing}, unexpected {unexpected}, misshapen {misshapen}"
