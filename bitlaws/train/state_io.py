"""Orbax train-state checkpoints of `bitlaws.train`: ``OUT/train_state/<step>/``, written atomically.

A train state is a dict of pytrees (parameters, optimizer state, EMA) and scalars (step, wall time). It is
stored as one nested dict of arrays named by the leaves' tree paths (``params/blocks/0/attn/kernel/value``,
``opt_state/1/0/mu/...``) with ``orbax.checkpoint.CheckpointManager``:

* every save writes ``train_state/<step>.orbax-checkpoint-tmp-*`` and renames it to ``train_state/<step>``
  when complete; only then is the previous step deleted (``max_to_keep=1``). A process killed during a save
  leaves the previous step (and a temporary folder, removed when the store is next opened), so a restore
  always finds a complete state, the old or the new one;
* restoring goes into the dtypes and shardings of a template tree, so the restored arrays fit the compiled
  train step; a template of another structure fails with an error naming the differing keys.

All processes take part in saves and restores (orbax coordinates the hosts and writes each shard once).
"""

from __future__ import annotations

import pathlib
from typing import Any, Optional, Union

import jax
import numpy as np
import orbax.checkpoint as ocp

from bitlaws.checkpoint import tree_mismatch

STATE_DIR = "train_state"
PathLike = Union[str, pathlib.Path]


def _name(entry: Any) -> str:
    for attribute in ("key", "name", "idx"):
        if hasattr(entry, attribute):
            return str(getattr(entry, attribute))
    return str(entry)


def _paths(tree: Any) -> tuple[list[tuple[str, ...]], list[Any], Any]:
    """``(name paths, leaves, treedef)`` of `tree`."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [tuple(_name(e) for e in path) for path, _ in flat], [leaf for _, leaf in flat], treedef


def to_named(tree: Any) -> dict[str, Any]:
    """`tree` as a nested dict of its leaves keyed by their path names (what orbax stores)."""
    paths, leaves, _ = _paths(tree)
    named: dict[str, Any] = {}
    for path, leaf in zip(paths, leaves):
        node = named
        for part in path[:-1]:
            node = node.setdefault(part, {})
        if path[-1] in node:
            raise ValueError(f"two leaves share the checkpoint name {'/'.join(path)}")
        node[path[-1]] = leaf
    return named


def from_named(named: dict[str, Any], like: Any) -> Any:
    """Inverse of `to_named`: the leaves of `named` in the structure of `like`."""
    paths, _, treedef = _paths(like)
    leaves = []
    for path in paths:
        node = named
        for part in path:
            node = node[part]
        leaves.append(node)
    return jax.tree.unflatten(treedef, leaves)


def _abstract(leaf: Any) -> Any:
    """The restore target of one template leaf: numpy stays numpy, jax arrays keep dtype and sharding."""
    if isinstance(leaf, (np.ndarray, np.generic)):
        return np.zeros(np.shape(leaf), np.asarray(leaf).dtype)
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)


def _shapes(named: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    paths, leaves, _ = _paths(named)
    return {"/".join(p): (tuple(leaf.shape), str(np.dtype(leaf.dtype))) for p, leaf in zip(paths, leaves)}


class TrainStateStore:
    """The train states under ``out_dir/train_state`` (open it on every process; use as a context manager).

    Args:
        out_dir: The run's output folder.
    """

    def __init__(self, out_dir: PathLike):
        self.directory = pathlib.Path(out_dir).resolve() / STATE_DIR
        self._check_format()
        options = ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False, create=True,
                                               cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_handlers=ocp.StandardCheckpointHandler())

    def _check_format(self) -> None:
        """Refuses a single orbax checkpoint in place of the step folders (the demo trainers' old format)."""
        if (self.directory / "_CHECKPOINT_METADATA").exists() or (self.directory / "_METADATA").exists():
            raise ValueError(f"{self.directory} holds no bitlaws.train state but a single orbax checkpoint (written "
                             f"by an older trainer?); move it away to start afresh")

    def latest_step(self) -> Optional[int]:
        """The step of the newest complete state, or None."""
        return self._manager.latest_step()

    def save(self, step: int, state: dict[str, Any]) -> None:
        """Writes `state` (a dict of pytrees of arrays) as step `step`; then drops older steps."""
        if step in self._manager.all_steps():
            return
        self._manager.save(step, args=ocp.args.StandardSave(to_named(state)))

    def restore(self, like: dict[str, Any], step: Optional[int] = None) -> dict[str, Any]:
        """Restores step `step` (default: the latest) into the structure, dtypes and shardings of `like`.

        Raises:
            FileNotFoundError: there is no state.
            ValueError: the stored tree differs from `like` (names missing / unexpected / misshapen keys).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no train state in {self.directory}")
        target = jax.tree.map(_abstract, to_named(like))
        metadata = self._manager.item_metadata(step)
        stored = _shapes(getattr(metadata, "tree", metadata))
        wanted = _shapes(target)
        if stored != wanted:
            raise ValueError(f"train state {self.directory / str(step)} does not match this run (shape, dtype): "
                             f"{tree_mismatch(stored, wanted)}")
        restored = self._manager.restore(step, args=ocp.args.StandardRestore(target))
        return from_named(restored, like)

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> "TrainStateStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
