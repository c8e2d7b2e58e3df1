"""`results.jsonl`: one JSON object per finished cell, appended so that a killed sweep loses nothing.

Durability: `ResultsFile.append` encodes the record as one line and hands it to the kernel with a single
``os.write`` on a descriptor opened ``O_WRONLY | O_APPEND | O_CREAT``, then ``os.fsync``. A SIGKILL
therefore leaves the whole line or (at worst, e.g. on a full disk) a prefix of it. `ResultsFile.repair`
(run by `load`) checks the file before anything is appended again:

* a last line without its newline that is a complete record gets the newline (nothing was lost);
* any other unreadable line (a cut-off last line, or garbage anywhere) is appended verbatim to
  ``results.jsonl.corrupt`` next to the file and removed from it, and the repair is reported. The cell of
  a removed line is not finished, so the sweep simply evaluates it again.

Record fields (`REQUIRED_FIELDS`): ``key``, ``model``, ``setting``, ``format``, ``method``, ``fid``,
``mt_bits``, ``ct_bits``, ``wall_s``, ``seed``, ``versions`` (python/jax/flax/bitlaws), ``time`` (UTC ISO
8601), plus the evaluator's metrics.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pathlib
from typing import Any, Iterator, Union

import numpy as np

REQUIRED_FIELDS = ("key", "model", "setting", "format", "method", "fid", "mt_bits", "ct_bits", "wall_s", "seed",
                   "versions", "time")
CORRUPT_SUFFIX = ".corrupt"


def _json_default(value: Any) -> Any:
    """Encodes numpy scalars/arrays and jax arrays (anything with ``tolist``)."""
    if isinstance(value, np.generic):
        return value.item()
    if hasattr(value, "tolist"):
        return np.asarray(value).tolist()
    raise TypeError(f"results record value of type {type(value).__name__} is not JSON serialisable")


def encode_record(record: dict) -> bytes:
    """One ``\\n``-terminated UTF-8 JSON line; raises ValueError for a record without a string ``key``."""
    if not isinstance(record, dict) or not isinstance(record.get("key"), str):
        raise ValueError("a results record must be a dict with a string 'key'")
    line = json.dumps(record, default=_json_default, separators=(",", ":"))
    return (line + "\n").encode("utf-8")


def _parse_line(raw: bytes) -> Union[dict, None]:
    """The record on one line (without its newline), or None if it is not a JSON object with a string key."""
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(value, dict) or not isinstance(value.get("key"), str):
        return None
    return value


def _fsync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all_once(fd: int, data: bytes, path: pathlib.Path) -> None:
    written = os.write(fd, data)
    if written != len(data):
        raise OSError(f"short write to {path}: {written} of {len(data)} bytes (the next load repairs it)")
    os.fsync(fd)


class ResultsFile:
    """An append-only JSON-lines file of sweep records.

    Args:
        path: The ``results.jsonl`` path; its folder must exist.
    """

    def __init__(self, path: Union[str, os.PathLike]):
        self.path = pathlib.Path(path)
        self.corrupt_path = self.path.with_name(self.path.name + CORRUPT_SUFFIX)
        self.repairs: list[str] = []

    def append(self, record: dict) -> None:
        """Appends `record` as one line with a single ``os.write``, then fsyncs."""
        data = encode_record(record)
        created = not self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            _write_all_once(fd, data, self.path)
        finally:
            os.close(fd)
        if created:
            _fsync_dir(self.path.parent)

    def _preserve(self, bad_lines: list[bytes]) -> None:
        fd = os.open(self.corrupt_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            _write_all_once(fd, b"".join(line + b"\n" for line in bad_lines), self.corrupt_path)
        finally:
            os.close(fd)

    def repair(self) -> list[str]:
        """Fixes the file as the module docstring says; returns one message per repair (empty if none)."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        if not data:
            return []
        lines = data.split(b"\n")
        tail = lines.pop()  # b"" when the file ends with a newline
        messages: list[str] = []
        if tail and _parse_line(tail) is not None:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            try:
                _write_all_once(fd, b"\n", self.path)
            finally:
                os.close(fd)
            messages.append(f"{self.path}: completed the newline of the last record")
            lines.append(tail)
            tail = b""
        bad = [(i, line) for i, line in enumerate(lines) if _parse_line(line) is None]
        if not bad and not tail:
            return messages
        self._preserve([line for _, line in bad] + ([tail] if tail else []))
        if tail and not bad:
            with open(self.path, "r+b") as f:
                f.truncate(len(data) - len(tail))
                f.flush()
                os.fsync(f.fileno())
            messages.append(f"{self.path}: moved a cut-off last line ({len(tail)} bytes) to {self.corrupt_path}")
            return messages
        good = b"".join(line + b"\n" for i, line in enumerate(lines) if _parse_line(line) is not None)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(good)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)
        where = ", ".join(str(i + 1) for i, _ in bad) + (" and the cut-off last line" if tail else "")
        messages.append(f"{self.path}: moved unreadable line(s) {where} to {self.corrupt_path}")
        return messages

    def load(self) -> list[dict]:
        """Repairs the file (messages in `repairs`) and returns its records in file order."""
        self.repairs = self.repair()
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_bytes().decode("utf-8").splitlines() if line]

    def finished_keys(self) -> set[str]:
        """Keys of every record in the file (after repair)."""
        return {record["key"] for record in self.load()}


def read_records(path: Union[str, os.PathLike]) -> list[dict]:
    """Read-only: the records of a results file, skipping (not repairing) unreadable lines."""
    records = []
    for raw in pathlib.Path(path).read_bytes().split(b"\n"):
        record = _parse_line(raw) if raw else None
        if record is not None:
            records.append(record)
    return records


@contextlib.contextmanager
def exclusive_lock(folder: Union[str, os.PathLike]) -> Iterator[None]:
    """Holds an ``flock`` on ``folder/.sweep.lock`` so two sweeps never write one folder at once.

    The kernel drops the lock when the holder dies (SIGKILL included), so a killed sweep never blocks the
    rerun.

    Raises:
        RuntimeError: another live process holds the lock.
    """
    lock_path = pathlib.Path(folder) / ".sweep.lock"
    fd = os.open(lock_path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise RuntimeError(f"another sweep is running in {folder} (it holds {lock_path})") from e
        yield
    finally:
        os.close(fd)
