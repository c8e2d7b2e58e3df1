"""`ResultsFile`: one-write appends and the repair of cut-off / unreadable lines."""

import json

import numpy as np
import pytest

from bitlaws.sweep.results import ResultsFile, encode_record, exclusive_lock, read_records


def _record(i):
    return {"key": f"m|W4A16|int|rtn|s{i}", "fid": 1.5 + i, "mt_bits": np.int64(10 * i)}


def test_append_writes_whole_lines_and_load_round_trips(tmp_path):
    results = ResultsFile(tmp_path / "results.jsonl")
    assert results.load() == [] and results.finished_keys() == set()
    for i in range(3):
        results.append(_record(i))
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line)["key"].startswith("m|") for line in lines)
    assert results.load()[2] == {"key": "m|W4A16|int|rtn|s2", "fid": 3.5, "mt_bits": 20}
    assert results.finished_keys() == {f"m|W4A16|int|rtn|s{i}" for i in range(3)}
    assert results.repairs == [] and not results.corrupt_path.exists()


def test_cut_off_last_line_is_moved_to_corrupt_and_truncated(tmp_path):
    path = tmp_path / "results.jsonl"
    results = ResultsFile(path)
    results.append(_record(0))
    results.append(_record(1))
    partial = encode_record(_record(2))[:17]
    with open(path, "ab") as f:
        f.write(partial)
    records = results.load()
    assert [r["key"] for r in records] == ["m|W4A16|int|rtn|s0", "m|W4A16|int|rtn|s1"]
    assert len(results.repairs) == 1 and "cut-off last line" in results.repairs[0]
    assert (tmp_path / "results.jsonl.corrupt").read_bytes() == partial + b"\n"
    assert path.read_bytes().endswith(b"}\n")
    results.append(_record(2))  # appending after the repair gives clean lines
    assert [json.loads(line)["key"][-2:] for line in path.read_text().splitlines()] == ["s0", "s1", "s2"]
    assert results.load() and results.repairs == []


def test_complete_last_record_missing_only_its_newline_is_kept(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_bytes(encode_record(_record(0)) + encode_record(_record(1))[:-1])
    results = ResultsFile(path)
    assert len(results.load()) == 2
    assert "completed the newline" in results.repairs[0]
    assert path.read_bytes().count(b"\n") == 2 and not results.corrupt_path.exists()


def test_garbage_lines_anywhere_are_preserved_and_removed(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_bytes(encode_record(_record(0)) + b"not json\n" + b"[1, 2]\n" + encode_record(_record(1)) + b'{"ke')
    results = ResultsFile(path)
    assert [r["key"][-2:] for r in results.load()] == ["s0", "s1"]
    assert "line(s) 2, 3 and the cut-off last line" in results.repairs[0]
    assert results.corrupt_path.read_bytes() == b'not json\n[1, 2]\n{"ke\n'
    assert all(json.loads(line) for line in path.read_text().splitlines())
    assert read_records(path) == results.load()


def test_records_need_a_string_key(tmp_path):
    with pytest.raises(ValueError, match="string 'key'"):
        ResultsFile(tmp_path / "r.jsonl").append({"fid": 1.0})
    with pytest.raises(TypeError, match="not JSON serialisable"):
        ResultsFile(tmp_path / "r.jsonl").append({"key": "k", "bad": object()})


def test_exclusive_lock_refuses_a_second_writer(tmp_path):
    with exclusive_lock(tmp_path):
        with pytest.raises(RuntimeError, match="another sweep is running"):
            with exclusive_lock(tmp_path):
                pass
    with exclusive_lock(tmp_path):  # released again
        pass
