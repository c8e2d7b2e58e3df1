"""Reading a sweep's ``results.jsonl`` for the laws: read-only, every problem named by file and line.

The sweep owns the file: it repairs it (`bitlaws.sweep.results.ResultsFile.repair` moves cut-off lines to
``results.jsonl.corrupt``) before it appends again. The laws never write it. Here:

* blank lines are skipped;
* the last line, when it has no newline and does not parse (a sweep killed mid-write), is skipped with a
  notice naming the file and the line, so that the report can say what it left out;
* any other line that is not UTF-8, not JSON, or not a JSON object is an error naming the file and the line;
* when a key appears more than once the last row wins.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Union

RESULTS_FILE = "results.jsonl"


@dataclasses.dataclass(frozen=True)
class ResultsRead:
    """What `read_results` found.

    Attributes:
        path: The file read.
        rows: The rows (JSON objects), one per key, in order of first appearance.
        notices: One message per skipped line (``FILE:LINE: ...``).
    """

    path: pathlib.Path
    rows: list[dict]
    notices: tuple[str, ...] = ()


def results_path(path_or_dir: Union[str, pathlib.Path]) -> pathlib.Path:
    """``results.jsonl`` inside a sweep folder, or the file itself."""
    path = pathlib.Path(path_or_dir)
    return path / RESULTS_FILE if path.is_dir() else path


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return type(value).__name__


def read_results(path_or_dir: Union[str, pathlib.Path]) -> ResultsRead:
    """Reads a sweep's ``results.jsonl`` (or the file inside a folder) without changing it.

    Raises:
        FileNotFoundError: no results file there.
        ValueError: a line other than a cut-off last one is not UTF-8, not JSON or not a JSON object (the
            message names the file and the line number).
    """
    path = results_path(path_or_dir)
    if not path.is_file():
        raise FileNotFoundError(f"no sweep results at {path}")
    data = path.read_bytes()
    lines = data.split(b"\n")  # the last item is b"" when the file ends with a newline
    rows: dict[str, dict] = {}
    notices: list[str] = []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        cut_tail = number == len(lines)  # a non-empty last item: the line has no newline
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            if cut_tail:
                notices.append(f"{path}:{number}: skipped the unreadable last line ({len(raw)} bytes, no newline: "
                               f"a sweep stopped while writing it; rerunning the sweep moves it aside and "
                               f"evaluates its cell again)")
                continue
            if isinstance(e, UnicodeDecodeError):
                raise ValueError(f"{path}:{number}: results line is not UTF-8 text (byte {e.start + 1} of the line: "
                                 f"{e.reason})") from e
            raise ValueError(f"{path}:{number}: corrupt results line ({e})") from e
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{number}: results line is {_json_kind(row)}, not a JSON object (a record)")
        rows[str(row.get("key", f"line-{number}"))] = row
    return ResultsRead(path, list(rows.values()), tuple(notices))
