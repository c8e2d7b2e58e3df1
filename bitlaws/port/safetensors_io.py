"""Reader and writer for the ``.safetensors`` checkpoint format, without extra dependencies.

Layout of a file::

    [8 bytes]  N, unsigned little-endian 64-bit: length of the JSON header in bytes
    [N bytes]  UTF-8 JSON object {name: {"dtype": str, "shape": [int, ...],
                                         "data_offsets": [begin, end]}, ...,
                                  "__metadata__": {str: str}}   (metadata optional)
    [rest]     byte buffer; tensor ``name`` occupies buffer[begin:end], row-major,
               little-endian.

Offsets are relative to the start of the byte buffer (i.e. to ``8 + N``).
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

__all__ = [
    "CorruptCheckpointError",
    "SAFETENSORS_DTYPES",
    "read_safetensors",
    "read_safetensors_metadata",
    "swap_if_foreign",
    "write_safetensors",
]

METADATA_KEY = "__metadata__"
_HEADER_LEN_BYTES = 8
# Same ceiling as the reference implementation: a header above 100 MB is treated as corrupt.
_MAX_HEADER_BYTES = 100 * 1024 * 1024

SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype(np.bool_),
}
"""Safetensors dtype tag -> numpy dtype (ml_dtypes for bfloat16 and float8)."""

_DTYPE_TAGS: dict[np.dtype, str] = {
    dtype.newbyteorder("="): tag for tag, dtype in SAFETENSORS_DTYPES.items()
}


class CorruptCheckpointError(ValueError):
    """A checkpoint file is truncated or its contents contradict its own header."""


def swap_if_foreign(array: np.ndarray, byteorder: str) -> np.ndarray:
    """Swaps element bytes when ``byteorder`` differs from the host's.

    Use it on raw bytes read from a file (file order -> host order) or on host
    arrays about to be written (host order -> file order); the swap is its own
    inverse. Works for any fixed-size dtype, including ml_dtypes types that have no
    non-native variant, by swapping through an unsigned integer view.

    Args:
        array: Array of any shape with a native-byte-order dtype.
        byteorder: ``"little"`` or ``"big"``: the byte order on the file side.

    Returns:
        ``array`` itself when no swap is needed, else a byte-swapped copy with the
        same shape and dtype.
    """
    if byteorder == sys.byteorder or array.dtype.itemsize == 1:
        return array
    uint = np.dtype(f"u{array.dtype.itemsize}")
    return array.view(uint).byteswap().view(array.dtype)


def _corrupt(path: str | os.PathLike, detail: str, key: str | None = None) -> CorruptCheckpointError:
    where = f"tensor {key!r} in " if key is not None else ""
    return CorruptCheckpointError(f"corrupt safetensors file: {where}{os.fspath(path)}: {detail}")


def _read_header(
    path: str | os.PathLike, blob: bytes | bytearray, file_size: int | None = None
) -> tuple[dict[str, Any], int]:
    """Parses and sanity-checks the JSON header.

    Args:
        path: File name, for error messages.
        blob: The file contents, or at least its first ``8 + header length`` bytes.
        file_size: Size of the whole file; defaults to ``len(blob)``.

    Returns:
        ``(header, buffer_start)``: the decoded JSON object (order preserved) and the
        byte position where the tensor buffer starts.

    Raises:
        CorruptCheckpointError: Truncated file, oversized header or invalid JSON.
    """
    file_size = len(blob) if file_size is None else file_size
    if file_size < _HEADER_LEN_BYTES:
        raise _corrupt(path, f"file is {file_size} bytes, too short for the 8-byte header length")
    (header_len,) = struct.unpack("<Q", blob[:_HEADER_LEN_BYTES])
    available = file_size - _HEADER_LEN_BYTES
    if header_len > available:
        raise _corrupt(path, f"header length {header_len} exceeds the {available} bytes after it")
    if header_len > _MAX_HEADER_BYTES:
        raise _corrupt(path, f"header length {header_len} exceeds the {_MAX_HEADER_BYTES}-byte limit")
    start = _HEADER_LEN_BYTES + header_len
    try:
        header = json.loads(
            bytes(blob[_HEADER_LEN_BYTES:start]).decode("utf-8"), object_pairs_hook=_unique_keys
        )
    except (UnicodeDecodeError, ValueError) as err:  # JSONDecodeError is a ValueError
        raise _corrupt(path, f"header is not valid UTF-8 JSON ({err})") from None
    if not isinstance(header, dict):
        raise _corrupt(path, f"header is a JSON {type(header).__name__}, expected an object")
    return header, start


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """JSON object hook that rejects duplicate names instead of keeping the last one."""
    result: dict[str, Any] = {}
    for name, value in pairs:
        if name in result:
            raise ValueError(f"duplicate key {name!r}")
        result[name] = value
    return result


def _parse_metadata(path: str | os.PathLike, header: Mapping[str, Any]) -> dict[str, str]:
    metadata = header.get(METADATA_KEY, {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise _corrupt(path, f"{METADATA_KEY!r} must map strings to strings")
    return metadata


def _parse_entry(
    path: str | os.PathLike, key: str, entry: Any, buffer_len: int
) -> tuple[np.dtype, tuple[int, ...], int, int]:
    """Validates one tensor entry of the header.

    Args:
        path: File name, for error messages.
        key: Tensor name.
        entry: The JSON value stored under ``key``.
        buffer_len: Size in bytes of the tensor buffer.

    Returns:
        ``(dtype, shape, begin, end)`` with ``0 <= begin <= end <= buffer_len`` and
        ``end - begin == prod(shape) * dtype.itemsize``.

    Raises:
        CorruptCheckpointError: Naming ``path`` and ``key``.
    """
    if not isinstance(entry, dict):
        raise _corrupt(path, "entry is not a JSON object", key)
    tag = entry.get("dtype")
    if tag not in SAFETENSORS_DTYPES:
        raise _corrupt(path, f"unknown dtype {tag!r} (known: {sorted(SAFETENSORS_DTYPES)})", key)
    dtype = SAFETENSORS_DTYPES[tag]
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(_is_nonneg_int(d) for d in shape):
        raise _corrupt(path, f"shape {shape!r} is not a list of non-negative integers", key)
    offsets = entry.get("data_offsets")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_nonneg_int, offsets)):
        raise _corrupt(path, f"data_offsets {offsets!r} is not a pair of non-negative integers", key)
    begin, end = offsets
    if begin > end or end > buffer_len:
        detail = f"data_offsets [{begin}, {end}] out of range for a {buffer_len}-byte buffer"
        raise _corrupt(path, detail, key)
    expected = math.prod(shape) * dtype.itemsize
    if end - begin != expected:
        raise _corrupt(
            path, f"{end - begin} bytes stored but shape {shape} of {tag} needs {expected}", key
        )
    return dtype, tuple(shape), begin, end


def _is_nonneg_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_no_overlap(path: str | os.PathLike, spans: list[tuple[int, int, str]]) -> None:
    """Raises CorruptCheckpointError if two non-empty byte ranges intersect."""
    previous_end, previous_key = 0, None
    for begin, end, key in sorted(s for s in spans if s[1] > s[0]):
        if previous_key is not None and begin < previous_end:
            raise _corrupt(path, f"data_offsets overlap those of tensor {previous_key!r}", key)
        previous_end, previous_key = end, key


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads every tensor of a ``.safetensors`` file.

    Args:
        path: File to read.

    Returns:
        ``{name: array}`` in header order. Each array has the stored shape and a
        native-byte-order dtype from ``SAFETENSORS_DTYPES`` (``ml_dtypes.bfloat16`` for
        BF16, ``ml_dtypes.float8_e4m3fn`` / ``float8_e5m2`` for F8). Arrays are
        writable and share one buffer holding the file contents.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CorruptCheckpointError: Header length beyond the file size, invalid JSON,
            unknown dtype, offsets out of range or overlapping, or a byte count that
            does not match the shape; the message names the file and the tensor.
    """
    with open(path, "rb") as f:
        blob = bytearray(f.read())
    header, start = _read_header(path, blob)
    _parse_metadata(path, header)
    buffer = memoryview(blob)[start:]
    entries = {
        key: _parse_entry(path, key, entry, len(buffer))
        for key, entry in header.items()
        if key != METADATA_KEY
    }
    _check_no_overlap(path, [(begin, end, key) for key, (_, _, begin, end) in entries.items()])
    return {
        key: _decode(buffer, dtype, shape, begin)
        for key, (dtype, shape, begin, _) in entries.items()
    }


def _decode(buffer: memoryview, dtype: np.dtype, shape: tuple[int, ...], begin: int) -> np.ndarray:
    """Views (or, when misaligned, copies) ``shape`` elements of ``dtype`` at ``begin``."""
    count = math.prod(shape)
    native = dtype.newbyteorder("=")
    array = np.frombuffer(buffer, dtype=native, count=count, offset=begin)
    if begin % native.alignment:
        array = array.copy()
    return swap_if_foreign(array, "little").reshape(shape)


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """Returns the ``__metadata__`` string map of a ``.safetensors`` file ({} if absent).

    Only the header is read, not the tensor buffer.

    Raises:
        CorruptCheckpointError: The header is unreadable or the metadata is not a
            string-to-string map.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(_HEADER_LEN_BYTES)
        if len(head) == _HEADER_LEN_BYTES:
            (header_len,) = struct.unpack("<Q", head)
            head += f.read(min(header_len, size - _HEADER_LEN_BYTES, _MAX_HEADER_BYTES + 1))
    header, _ = _read_header(path, head, file_size=size)
    return _parse_metadata(path, header)


def _dtype_tag(key: str, array: np.ndarray) -> str:
    tag = _DTYPE_TAGS.get(array.dtype.newbyteorder("="))
    if tag is None:
        raise ValueError(
            f"tensor {key!r}: dtype {array.dtype} cannot be stored in safetensors "
            f"(supported: {sorted(SAFETENSORS_DTYPES)})"
        )
    return tag


def _to_little_endian_bytes(array: np.ndarray) -> bytes:
    native = np.asarray(array, dtype=array.dtype.newbyteorder("="), order="C")
    return swap_if_foreign(native, "little").tobytes()


def write_safetensors(
    path: str | os.PathLike,
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Writes arrays to a ``.safetensors`` file, in the mapping's order.

    Args:
        path: Destination file (overwritten).
        tensors: ``{name: array}``; any shape, dtype one of ``SAFETENSORS_DTYPES``
            (any byte order; stored little-endian, row-major).
        metadata: Optional string-to-string map stored under ``__metadata__``.

    Raises:
        ValueError: A name is not a string or is ``"__metadata__"``, a dtype is not
            supported, or metadata is not a string-to-string map.
    """
    header: dict[str, Any] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("safetensors metadata must map strings to strings")
        header[METADATA_KEY] = dict(metadata)
    chunks: list[bytes] = []
    offset = 0
    for key, value in tensors.items():
        if not isinstance(key, str) or key == METADATA_KEY:
            raise ValueError(f"invalid tensor name {key!r}")
        array = np.asarray(value)
        data = _to_little_endian_bytes(array)
        header[key] = {
            "dtype": _dtype_tag(key, array),
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # pad so the buffer starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for data in chunks:
            f.write(data)
