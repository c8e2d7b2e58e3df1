"""Orbax checkpoints of NNX models: save a model's state, restore it into an abstract model.

A checkpoint directory holds the pure state tree (``nnx.to_pure_dict``) written by orbax's
`StandardCheckpointer`, plus ``bitlaws.json`` with free-form metadata (constructor arguments, training
summary). Restoring validates the tree against ``nnx.eval_shape`` of the model, so a checkpoint of another
size fails with an error naming the mismatching keys.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Callable, Optional, Union

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

METADATA_FILE = "bitlaws.json"
STATE_DIR = "state"


def _key_name(entry) -> str:
    return str(getattr(entry, "key", getattr(entry, "idx", entry)))


def _flat_shapes(tree) -> dict[str, tuple]:
    """``{dotted path: shape}``; integer keys (NNX lists) and their stored string form compare equal."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {".".join(_key_name(e) for e in path): tuple(np.shape(leaf)) for path, leaf in flat}


def save_model(model: nnx.Module, directory: Union[str, pathlib.Path], metadata: Optional[dict] = None) -> pathlib.Path:
    """Writes `model`'s state (and `metadata` as JSON) to `directory`, replacing an existing checkpoint there."""
    directory = pathlib.Path(directory).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    state = nnx.to_pure_dict(nnx.state(model))
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / STATE_DIR, state, force=True)
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
    target = nnx.to_pure_dict(abstract_state)
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
