"""One entry point to read a state dict from any supported checkpoint format."""

from __future__ import annotations

import errno
import os
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np

from bitlaws.port.safetensors_io import CorruptCheckpointError, read_safetensors
from bitlaws.port.torch_pickle import (StoredTensor, UnsafeCheckpointError, load_torch_checkpoint,
                                       torch_archive_prefix)

__all__ = ["SUPPORTED_FORMATS", "detect_format", "read_state_dict"]

CheckpointFormat = Literal["safetensors", "npz", "torch"]

SUPPORTED_FORMATS: dict[str, CheckpointFormat] = {
    ".safetensors": "safetensors",
    ".npz": "npz",
    ".pt": "torch",
    ".pth": "torch",
    ".bin": "torch",
    ".ckpt": "torch",
}
"""File extension -> format. Files with other extensions are recognised by content."""

_SUPPORTED_TEXT = (
    "safetensors (.safetensors), numpy (.npz), "
    "torch.save zip archives (.pt, .pth, .bin, .ckpt)"
)


_MAX_LISTED = 20  # keys shown in error messages


def detect_format(path: str | os.PathLike) -> CheckpointFormat:
    """Decides how to read a checkpoint: by extension, else by its first bytes.

    Args:
        path: Existing file.

    Returns:
        ``"safetensors"``, ``"npz"`` or ``"torch"``.

    Raises:
        ValueError: Unknown extension and unrecognised contents; the message names
            the file and the supported formats.
    """
    suffix = Path(path).suffix.lower()
    if suffix in SUPPORTED_FORMATS:
        return SUPPORTED_FORMATS[suffix]
    sniffed = _sniff(path)
    if sniffed is None:
        raise ValueError(f"unknown checkpoint format: {os.fspath(path)}; supported: {_SUPPORTED_TEXT}")
    return sniffed


def _sniff(path: str | os.PathLike) -> CheckpointFormat | None:
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except zipfile.BadZipFile:
            return None
        if torch_archive_prefix(names) is not None:
            return "torch"
        if names and all(name.endswith(".npy") for name in names):
            return "npz"
        return None
    with open(path, "rb") as f:
        head = f.read(9)
        size = os.fstat(f.fileno()).st_size
    if len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] <= size - 8:
        return "safetensors"
    return None


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a ``.npz`` archive without unpickling anything.

    Args:
        path: File written by ``np.savez`` / ``np.savez_compressed``.

    Returns:
        ``{name: array}`` in archive order.

    Raises:
        UnsafeCheckpointError: A member holds an object array (needs pickle).
        CorruptCheckpointError: Truncated or corrupt archive.
    """
    if not zipfile.is_zipfile(path):
        raise CorruptCheckpointError(f"{os.fspath(path)}: not a readable zip archive, so not a valid .npz")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {name: _load_npz_member(path, npz, name) for name in npz.files}
    except (zipfile.BadZipFile, EOFError) as err:
        raise CorruptCheckpointError(f"{os.fspath(path)}: corrupt npz archive ({err})") from err


def _load_npz_member(path: str | os.PathLike, npz: Any, name: str) -> np.ndarray:
    try:
        value = npz[name]
    except ValueError as err:
        if "allow_pickle" in str(err):
            raise UnsafeCheckpointError(
                f"{os.fspath(path)}: npz member {name!r} is an object array; refusing to unpickle it"
            ) from err
        raise CorruptCheckpointError(f"{os.fspath(path)}: npz member {name!r}: {err}") from err
    if not isinstance(value, np.ndarray):
        raise CorruptCheckpointError(f"{os.fspath(path)}: npz member {name!r} is not a .npy array")
    return value


def read_state_dict(path: str | os.PathLike, key: str | None = None, *,
                    lazy: bool = False) -> dict[str, np.ndarray | StoredTensor]:
    """Reads a checkpoint into a flat ``{name: array}`` state dict, without torch.

    Supports ``.safetensors``, ``.npz`` and ``torch.save`` zip archives
    (``.pt`` / ``.pth`` / ``.bin`` / ``.ckpt``); other extensions are recognised by
    content. Torch pickles are loaded with an allow-list, so no code in the file runs.

    Nested checkpoints (a dict whose values include dicts, e.g.
    ``{"model": sd, "ema": sd, "steps": 1000}``) need ``key`` to pick one sub-dict;
    ``key`` may be dotted (``"ema.model"``) to go deeper. Non-array leaves of the
    selected dict (``steps``, optimizer hyper-parameters...) are dropped. For flat
    formats (safetensors, npz) ``key`` selects the names starting with ``key + "."``
    and strips that prefix.

    With ``lazy=True`` the tensors of a torch archive are not read: each is a
    `StoredTensor` (``shape``, ``dtype``; ``np.asarray`` reads it from the file), so
    a state dict larger than memory can be ported tensor by tensor. Other formats
    are read eagerly either way.

    Args:
        path: Checkpoint file.
        key: Which sub-dict of a nested checkpoint to return, or ``None``.
        lazy: Leave torch tensors in the file until they are used.

    Returns:
        ``{name: array}`` in file order. Arrays keep the stored shape and dtype
        (``ml_dtypes.bfloat16`` / float8 types where stored so).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: Unknown format, legacy torch file, or a nested checkpoint read
            without ``key`` (the message lists the valid keys).
        KeyError: ``key`` does not name a sub-dict of the checkpoint.
        CorruptCheckpointError: Truncated or inconsistent file (a ``ValueError``).
        UnsafeCheckpointError: The file asks to run code (refused).
    """
    path_str = os.fspath(path)
    if not os.path.exists(path_str):
        raise FileNotFoundError(errno.ENOENT, "checkpoint not found", path_str)
    fmt = detect_format(path_str)
    if fmt == "safetensors":
        return _select_prefix(read_safetensors(path_str), key, path_str)
    if fmt == "npz":
        return _select_prefix(read_npz(path_str), key, path_str)
    tree = load_torch_checkpoint(path_str, lazy=lazy)
    if not isinstance(tree, Mapping):
        raise ValueError(f"checkpoint {path_str} holds a {type(tree).__name__}, not a dict of tensors")
    return _select_subtree(tree, key, path_str)


def _select_prefix(flat: dict[str, np.ndarray], key: str | None, path: str) -> dict[str, np.ndarray]:
    """Keeps the entries under ``key + "."`` (prefix stripped); all of them if no key."""
    if key is None:
        return flat
    prefix = key + "."
    selected = {name[len(prefix):]: value for name, value in flat.items() if name.startswith(prefix)}
    if not selected:
        raise KeyError(f"checkpoint {path} has no tensors under {prefix!r}")
    return selected


def _select_subtree(tree: Mapping[Any, Any], key: str | None, path: str) -> dict[str, np.ndarray | StoredTensor]:
    """Walks to sub-dict ``key`` (if any) and returns its array leaves.

    Raises:
        KeyError: ``key`` is not a path of dicts in ``tree``.
        ValueError: The selected dict still contains dicts (the message lists the
            dotted keys to choose from).
    """
    node: Any = tree
    if key is not None:
        node = _resolve(tree, key)
        if not isinstance(node, Mapping):
            raise KeyError(
                f"checkpoint {path}: key {key!r} not found or not a dict; "
                f"pass key= one of {_dict_paths(tree)[:_MAX_LISTED]}"
            )
    nested = [name for name, value in node.items() if isinstance(value, Mapping)]
    if nested:
        prefix = "" if key is None else key + "."
        raise ValueError(
            f"checkpoint {path} is nested; pass key= one of {[prefix + str(n) for n in nested]}"
        )
    return {str(name): value for name, value in node.items() if isinstance(value, (np.ndarray, StoredTensor))}


def _resolve(tree: Mapping[Any, Any], key: str) -> Any:
    """Looks up a dotted ``key``; names that themselves contain dots are matched whole."""
    if key in tree:
        return tree[key]
    for name, value in tree.items():
        if isinstance(name, str) and isinstance(value, Mapping) and key.startswith(name + "."):
            found = _resolve(value, key[len(name) + 1:])
            if found is not None:
                return found
    return None


def _dict_paths(tree: Mapping[Any, Any], prefix: str = "") -> list[str]:
    """Dotted names of every dict inside ``tree``, outermost first."""
    paths: list[str] = []
    for name, value in tree.items():
        if isinstance(value, Mapping):
            paths.append(f"{prefix}{name}")
            paths.extend(_dict_paths(value, f"{prefix}{name}."))
    return paths
