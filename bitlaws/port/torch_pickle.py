"""Safe, torch-free reader for ``torch.save`` zip archives (``.pt`` / ``.pth`` / ``.bin``).

Since torch 1.6, ``torch.save`` writes a zip archive laid out as::

    <archive>/data.pkl        pickle of the saved object
    <archive>/byteorder       "little" or "big" (absent in old files: little)
    <archive>/data/<key>      raw bytes of storage <key>
    <archive>/version, ...    bookkeeping records (ignored here)

In ``data.pkl`` every tensor is ``torch._utils._rebuild_tensor_v2(storage, offset,
size, stride, requires_grad, backward_hooks[, metadata])`` where ``storage`` is a
persistent id ``("storage", torch.<Type>Storage, key, location, numel)``.

The pickle is loaded with an unpickler whose ``find_class`` hands out only a few
functions of our own (tensor rebuilders producing numpy arrays, storage-type
markers, ``OrderedDict`` and plain builtin containers). Any other global, such as
``posix.system`` or ``builtins.eval``, raises ``UnsafeCheckpointError`` before it can
be called, so nothing from the file is ever executed.

With ``lazy=True`` no tensor data is read while unpickling: every tensor whose storage record is stored
uncompressed (as ``torch.save`` writes them) becomes a `StoredTensor`, which remembers where its bytes lie in
the file and reads them on ``np.asarray`` (one tensor at a time, into memory of its own; nothing stays
mapped). A port can then stream a checkpoint larger than memory.
"""

from __future__ import annotations

import collections
import math
import os
import pickle
import struct
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np

from bitlaws.port.safetensors_io import CorruptCheckpointError, swap_if_foreign

__all__ = [
    "StoredTensor",
    "UnsafeCheckpointError",
    "load_torch_checkpoint",
    "torch_archive_prefix",
]

_PICKLE_RECORD = "data.pkl"


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint's pickle asked for a global outside the allow-list; nothing was run."""


@dataclass(frozen=True)
class _StorageType:
    """Marker standing in for a ``torch.<Type>Storage`` class inside the pickle."""

    name: str
    dtype: np.dtype


@dataclass(frozen=True)
class _Storage:
    """A storage loaded from ``<archive>/data/<key>``.

    Attributes:
        key: Record name under ``<archive>/data/``.
        data: 1-D read-only array of ``numel`` elements, native byte order; or, when read lazily, the
            record left in the file.
    """

    key: str
    data: np.ndarray | _StoredRecord

    @property
    def size(self) -> int:
        return self.data.size


@dataclass(frozen=True)
class _StoredRecord:
    """An uncompressed storage record, left in the file: ``size`` elements of ``dtype`` from byte ``offset``."""

    path: str
    key: str
    offset: int
    size: int
    dtype: np.dtype
    byteorder: str


@dataclass(frozen=True, eq=False)
class StoredTensor:
    """A tensor of a ``torch.save`` archive that is read from the file when converted to an array.

    ``np.asarray(tensor)`` reads the elements it spans into a new C-contiguous, writable array in native byte
    order, exactly what the eager reader returns; nothing is cached, so each conversion reads the file again.

    Attributes:
        record: Where the storage's elements lie in the file.
        storage_offset: First element, counted in elements of the storage.
        shape: Shape.
        stride: Per-dimension step, in elements.
    """

    record: _StoredRecord
    storage_offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def dtype(self) -> np.dtype:
        return self.record.dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __repr__(self) -> str:
        return f"StoredTensor(shape={self.shape}, dtype={self.dtype}, storage={self.record.key!r})"

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        del copy  # always a new array
        array = self.read()
        return array if dtype is None else array.astype(dtype, copy=False)

    def read(self) -> np.ndarray:
        """The tensor as a new C-contiguous array (the bytes it spans are read from the file)."""
        record, itemsize = self.record, self.dtype.itemsize
        if self.size == 0:
            return np.empty(self.shape, dtype=self.dtype)
        span = 1 + sum((n - 1) * s for n, s in zip(self.shape, self.stride))
        contiguous = self.stride == _contiguous_strides(self.shape)
        data = np.empty(self.shape if contiguous else (span,), dtype=self.dtype)
        with open(record.path, "rb") as f:
            f.seek(record.offset + self.storage_offset * itemsize)
            got = f.readinto(memoryview(data.reshape(-1).view(np.uint8)))
        if got != span * itemsize:
            raise CorruptCheckpointError(f"{record.path}: storage {record.key!r} ends early (file truncated)")
        data = swap_if_foreign(data, record.byteorder)
        if contiguous:
            return data
        view = np.lib.stride_tricks.as_strided(
            data, shape=self.shape, strides=tuple(s * itemsize for s in self.stride), writeable=False)
        return np.array(view, order="C", copy=True)


def _contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))


_STORAGE_TYPES: dict[str, _StorageType] = {
    name: _StorageType(name, np.dtype(dtype))
    for name, dtype in {
        "DoubleStorage": np.float64,
        "FloatStorage": np.float32,
        "HalfStorage": np.float16,
        "BFloat16Storage": ml_dtypes.bfloat16,
        "LongStorage": np.int64,
        "IntStorage": np.int32,
        "ShortStorage": np.int16,
        "CharStorage": np.int8,
        "ByteStorage": np.uint8,
        "BoolStorage": np.bool_,
    }.items()
}


_LATIN1_NAMES = frozenset({"latin1", "latin-1", "iso-8859-1", "iso8859-1", "l1"})


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """Stand-in for ``_codecs.encode``, which protocol-2 pickles use to rebuild ``bytes``."""
    if not isinstance(text, str) or str(encoding).lower().replace("_", "-") not in _LATIN1_NAMES:
        raise pickle.UnpicklingError("_codecs.encode is only allowed as str.encode('latin1')")
    return text.encode("latin1")


# Builtins a pickle may need to rebuild plain containers; protocol <= 2 names the
# module "__builtin__" (Python 2 spelling), later protocols "builtins".
_CONTAINER_BUILTINS: dict[str, Callable[..., Any]] = {
    "set": set,
    "frozenset": frozenset,
    "complex": complex,
    "bytearray": bytearray,
    "slice": slice,
}


def torch_archive_prefix(names: Sequence[str]) -> str | None:
    """Finds the ``<archive>/`` prefix of a ``torch.save`` zip from its record names.

    Args:
        names: Record names of a zip archive, e.g. ``ZipFile.namelist()``.

    Returns:
        ``"<archive>/"`` if exactly one top-level ``<archive>/data.pkl`` record exists,
        else ``None``.
    """
    prefixes = [
        name[: -len(_PICKLE_RECORD)]
        for name in names
        if name.endswith("/" + _PICKLE_RECORD) and name.count("/") == 1
    ]
    return prefixes[0] if len(prefixes) == 1 else None


class _TorchArchive:
    """Random access to the records of one ``torch.save`` zip archive."""

    def __init__(self, path: str, zf: zipfile.ZipFile, lazy: bool = False):
        self.path = path
        self.lazy = lazy
        self._zf = zf
        prefix = torch_archive_prefix(zf.namelist())
        if prefix is None:
            raise CorruptCheckpointError(
                f"{path}: zip archive has no single '<archive>/{_PICKLE_RECORD}' record; "
                "not a torch.save checkpoint"
            )
        self.prefix = prefix
        self.byteorder = self._read_byteorder()
        self._raw: dict[str, bytes] = {}
        self._views: dict[tuple[str, np.dtype], np.ndarray | _StoredRecord] = {}

    def _read_byteorder(self) -> str:
        name = self.prefix + "byteorder"
        try:
            info = self._zf.getinfo(name)
        except KeyError:
            return "little"
        value = self._zf.read(info).decode("ascii", errors="replace").strip()
        if value not in ("little", "big"):
            raise CorruptCheckpointError(f"{self.path}: record {name!r} holds {value!r}, not little/big")
        return value

    def open_pickle(self) -> BinaryIO:
        return self._zf.open(self.prefix + _PICKLE_RECORD)

    def storage(self, key: str, dtype: np.dtype, numel: int) -> np.ndarray | _StoredRecord:
        """Returns storage ``key`` as ``numel`` native-order elements of ``dtype``.

        The record's bytes are read once per key however often it is referenced. In lazy mode an uncompressed
        record is not read: its place in the file is returned instead.

        Raises:
            CorruptCheckpointError: Missing record, or fewer bytes than ``numel`` needs.
        """
        view = self._views.get((key, dtype))
        if view is None and self.lazy:
            view = self._stored_record(key, dtype)
        if view is None:
            raw = self._read_record(key)
            view = np.frombuffer(raw, dtype=dtype, count=len(raw) // dtype.itemsize)
            view = swap_if_foreign(view, self.byteorder)
            view.flags.writeable = False
            self._views[(key, dtype)] = view
        if numel > view.size:
            raise CorruptCheckpointError(
                f"{self.path}: storage {key!r} holds {view.size} elements of {dtype}, "
                f"the pickle expects {numel}"
            )
        if isinstance(view, _StoredRecord):
            return replace(view, size=numel)
        return view[:numel]

    def _stored_record(self, key: str, dtype: np.dtype) -> _StoredRecord | None:
        """Where uncompressed record ``key`` lies in the file (None if compressed: then it is read eagerly)."""
        info = self._info(key)
        if info.compress_type != zipfile.ZIP_STORED:
            return None
        with open(self.path, "rb") as f:  # the local header's name and extra lengths give the data's offset
            f.seek(info.header_offset)
            header = f.read(30)
        if len(header) != 30 or header[:4] != b"PK\x03\x04":
            raise CorruptCheckpointError(f"{self.path}: bad local header for storage record {info.filename!r}")
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        offset = info.header_offset + 30 + name_len + extra_len
        if offset + info.file_size > os.path.getsize(self.path):
            raise CorruptCheckpointError(f"{self.path}: storage record {info.filename!r} runs past the end of the file")
        return _StoredRecord(self.path, key, offset, info.file_size // dtype.itemsize, dtype, self.byteorder)

    def _info(self, key: str) -> zipfile.ZipInfo:
        name = f"{self.prefix}data/{key}"
        try:
            return self._zf.getinfo(name)
        except KeyError:
            raise CorruptCheckpointError(f"{self.path}: storage record {name!r} is missing") from None

    def _read_record(self, key: str) -> bytes:
        if key not in self._raw:
            self._raw[key] = self._zf.read(self._info(key))
        return self._raw[key]


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only allow-listed globals, to functions of this module."""

    def __init__(self, file: BinaryIO, archive: _TorchArchive):
        super().__init__(file, encoding="utf-8")
        self._archive = archive
        self._globals: dict[tuple[str, str], Any] = {
            ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor_v2,
            ("torch._utils", "_rebuild_tensor"): self._rebuild_tensor,
            ("torch._utils", "_rebuild_parameter"): self._rebuild_parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): self._rebuild_parameter_with_state,
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("_codecs", "encode"): _latin1_encode,
        }
        self._globals.update({("torch", name): marker for name, marker in _STORAGE_TYPES.items()})
        for module in ("builtins", "__builtin__"):
            self._globals.update({(module, name): fn for name, fn in _CONTAINER_BUILTINS.items()})

    def find_class(self, module: str, name: str) -> Any:
        """Returns the stand-in for an allow-listed global; refuses everything else."""
        target = self._globals.get((module, name))
        if target is None:
            raise UnsafeCheckpointError(
                f"refusing to load global '{module}.{name}' from {self._archive.path}: only torch "
                "tensor/storage rebuilders and plain containers are allowed"
            )
        return target

    def persistent_load(self, pid: Any) -> _Storage:
        """Resolves ``("storage", <Type>Storage, key, location, numel)`` to a storage."""
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise self._corrupt(f"unsupported persistent id {pid!r:.200}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise self._corrupt(f"persistent id names {storage_type!r:.100}, not a storage type")
        if not isinstance(key, str) or not _is_index(numel):
            raise self._corrupt(f"malformed storage id (key={key!r:.100}, numel={numel!r:.100})")
        return _Storage(key, self._archive.storage(key, storage_type.dtype, numel))

    def _corrupt(self, detail: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{self._archive.path}: {detail}")

    def _rebuild_tensor_v2(
        self,
        storage: _Storage,
        storage_offset: int,
        size: Sequence[int],
        stride: Sequence[int],
        requires_grad: bool = False,
        backward_hooks: Any = None,
        metadata: Any = None,
    ) -> np.ndarray | StoredTensor:
        """Builds a tensor as a C-contiguous copy of a strided view of its storage.

        Args:
            storage: Storage from ``persistent_load``.
            storage_offset: First element, counted in elements.
            size: Shape.
            stride: Per-dimension step, counted in elements (non-negative).
            requires_grad: Ignored.
            backward_hooks: Ignored.
            metadata: Ignored (tensor Python attributes).

        Returns:
            Writable array of shape ``size`` and the storage's dtype (a `StoredTensor` when read lazily
            from an uncompressed record).

        Raises:
            CorruptCheckpointError: Malformed arguments, or a view reaching outside
                the storage.
        """
        del requires_grad, backward_hooks, metadata
        if not isinstance(storage, _Storage):
            raise self._corrupt(f"tensor rebuilt from {type(storage).__name__}, not a storage")
        if not (
            isinstance(size, (tuple, list))
            and isinstance(stride, (tuple, list))
            and len(size) == len(stride)
            and all(map(_is_index, (storage_offset, *size, *stride)))
        ):
            raise self._corrupt(
                f"malformed tensor of storage {storage.key!r}: offset={storage_offset!r:.50}, "
                f"size={size!r:.100}, stride={stride!r:.100}"
            )
        data = storage.data
        if math.prod(size) == 0:
            return np.empty(tuple(size), dtype=data.dtype)
        last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.size:
            raise self._corrupt(
                f"tensor of size {tuple(size)}, stride {tuple(stride)}, offset {storage_offset} "
                f"reaches element {last} of storage {storage.key!r} with {storage.size} elements"
            )
        if isinstance(data, _StoredRecord):
            return StoredTensor(data, storage_offset, tuple(size), tuple(stride))
        view = np.lib.stride_tricks.as_strided(
            data[storage_offset:],
            shape=tuple(size),
            strides=tuple(s * data.itemsize for s in stride),
            writeable=False,
        )
        return np.array(view, order="C", copy=True)

    def _rebuild_tensor(
        self, storage: _Storage, storage_offset: int, size: Sequence[int], stride: Sequence[int]
    ) -> np.ndarray:
        """Older rebuild entry point; same as ``_rebuild_tensor_v2`` without grad info."""
        return self._rebuild_tensor_v2(storage, storage_offset, size, stride)

    def _rebuild_parameter(
        self, data: np.ndarray, requires_grad: bool = False, backward_hooks: Any = None
    ) -> np.ndarray:
        """``nn.Parameter`` wrapper: the parameter's value is its data tensor."""
        del requires_grad, backward_hooks
        if not isinstance(data, (np.ndarray, StoredTensor)):
            raise self._corrupt(f"parameter rebuilt from {type(data).__name__}, not a tensor")
        return data

    def _rebuild_parameter_with_state(
        self, data: np.ndarray, requires_grad: bool, backward_hooks: Any, state: Any
    ) -> np.ndarray:
        """``nn.Parameter`` with Python attributes: the attributes are dropped."""
        del state
        return self._rebuild_parameter(data, requires_grad, backward_hooks)


def _check_zip(path: str) -> None:
    """Raises a clear error for anything that is not a (readable) zip archive.

    Raises:
        CorruptCheckpointError: Empty file, or a zip signature without a readable
            central directory (truncated archive).
        ValueError: Legacy (pre-1.6, non-zip) ``torch.save`` file, or not a torch file.
    """
    if zipfile.is_zipfile(path):
        return
    with open(path, "rb") as f:
        head = f.read(8)
    if not head:
        raise CorruptCheckpointError(f"{path}: file is empty")
    if head.startswith(b"PK"):
        raise CorruptCheckpointError(f"{path}: truncated or corrupt zip archive (no central directory)")
    if head.startswith(b"\x80") or _looks_like_tar(path):
        raise ValueError(
            f"{path}: legacy torch.save format not supported; "
            "re-save with torch>=1.6 zip serialization"
        )
    raise ValueError(f"{path}: not a torch.save zip archive")


def _looks_like_tar(path: str) -> bool:
    with open(path, "rb") as f:
        f.seek(257)
        return f.read(5) == b"ustar"


def load_torch_checkpoint(path: str | os.PathLike, lazy: bool = False) -> Any:
    """Loads a ``torch.save`` zip archive without torch and without running its code.

    Args:
        path: ``.pt`` / ``.pth`` / ``.bin`` file written by ``torch.save`` (torch >= 1.6).
        lazy: Return a `StoredTensor` (read on ``np.asarray``) for each tensor of an uncompressed
            storage record instead of reading it now; the pickle and the records' places are still checked.

    Returns:
        The saved object with every tensor replaced by a C-contiguous numpy array
        (float64/32/16, ``ml_dtypes.bfloat16``, int64/32/16/8, uint8 or bool; native
        byte order). Tensors sharing a storage are read from one copy of its bytes;
        an object saved once and referenced twice comes back as one object.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        UnsafeCheckpointError: The pickle references a global outside the allow-list
            (e.g. ``posix.system``); the message names it as ``module.name``.
        CorruptCheckpointError: Truncated/corrupt archive, missing records, or
            tensors reaching outside their storage.
        ValueError: Legacy non-zip ``torch.save`` file, or not a torch file at all.
    """
    path = os.fspath(path)
    _check_zip(path)
    try:
        with zipfile.ZipFile(path) as zf:
            archive = _TorchArchive(path, zf, lazy=lazy)
            with archive.open_pickle() as stream:
                return _unpickle(stream, archive)
    except (UnsafeCheckpointError, CorruptCheckpointError):
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as err:
        raise CorruptCheckpointError(f"{path}: corrupt zip archive ({err})") from err


def _unpickle(stream: BinaryIO, archive: _TorchArchive) -> Any:
    try:
        return _RestrictedUnpickler(stream, archive).load()
    except (UnsafeCheckpointError, CorruptCheckpointError):
        raise
    except (zipfile.BadZipFile, zlib.error):
        raise
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError, LookupError,
            AttributeError, OverflowError, RecursionError) as err:
        raise CorruptCheckpointError(
            f"{archive.path}: cannot unpickle {archive.prefix}{_PICKLE_RECORD} ({err})"
        ) from err
