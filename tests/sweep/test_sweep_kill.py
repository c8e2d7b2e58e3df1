"""The kill test: SIGKILL a real (toy) sweep mid-run, rerun it, and check nothing is lost or duplicated."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from bitlaws.configlib import load_config
from bitlaws.sweep import grid

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIG = "configs/sweeps/toy.py:small"
OVERRIDES = ["--set", "toy.sleep_s=0.3", "--set", "formats=('int',)"]  # 6 cells: fast on a loaded machine


def _command(out: pathlib.Path) -> list[str]:
    return [sys.executable, "-m", "bitlaws.cli", "sweep", "--config", CONFIG, "--out", str(out), "--no-progress",
            *OVERRIDES]


def _line_count(path: pathlib.Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _kill_after_lines(command: list[str], env: dict, results: pathlib.Path, *, lines: int,
                      timeout_s: float) -> list[int]:
    """Starts `command`, SIGKILLs it once `results` has `lines` lines; returns the pids of its children then."""
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout_s
        while _line_count(results) < lines and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process.poll() is None, process.communicate()[0].decode()[-2000:]
        children = _children(process.pid)
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return children


def test_sigkilled_sweep_resumes_without_loss_or_duplicates(tmp_path):
    overrides = OVERRIDES[1::2]
    expected = [cell.key for cell in grid.expand_grid(load_config(str(REPO / CONFIG), overrides))]
    assert len(expected) == 6
    out = tmp_path / "run"
    results = out / "results.jsonl"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    _kill_after_lines(_command(out), env, results, lines=2, timeout_s=60)
    killed_at = _line_count(results)
    assert 2 <= killed_at < len(expected)
    # Simulate the worst case a kill can leave (a cut-off line); the rerun must move it aside, not choke.
    first_line = results.read_bytes().split(b"\n")[0]
    with open(results, "ab") as f:
        f.write(first_line[: len(first_line) // 2])

    rerun = subprocess.run(_command(out), cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    assert f"{len(expected)}/{len(expected)} cells finished ({len(expected) - killed_at} now" in rerun.stdout

    lines = results.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line parses
    keys = [record["key"] for record in records]
    assert sorted(keys) == sorted(expected) and len(keys) == len(set(keys)) == len(expected)
    assert (out / "results.jsonl.corrupt").read_bytes() == first_line[: len(first_line) // 2] + b"\n"
    by_key = {record["key"]: record for record in records}
    assert by_key["mlp-w16-d2|W16A16|none|none|s0"]["fid"] == 0.0
    assert 0 < by_key["mlp-w16-d2|W8A16|int|rtn|s0"]["fid"] < by_key["mlp-w16-d2|W3A16|int|rtn|s0"]["fid"] < 1
    assert all("not an FID" in record["metric_name"] for record in records)
    assert by_key["mlp-w16-d2|W4A16|int|rtn|s0"]["mt_bits"] < by_key["mlp-w16-d2|W16A16|none|none|s0"]["mt_bits"]


def _children(pid: int) -> list[int]:
    children = pathlib.Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in children.read_text().split()] if children.exists() else []


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie waiting for its new parent to reap it counts as gone)."""
    status = pathlib.Path(f"/proc/{pid}/status")
    try:
        return "\nState:\tZ" not in status.read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.slow  # 12-42 s; moved out of the default suite to keep it under ~15 min
def test_sigkilled_parallel_sweep_resumes_and_its_workers_exit(tmp_path):
    overrides = ["--set", "toy.sleep_s=0.3", "--set", "formats=('int',)"]  # 2 models x 6 cells
    expected = [cell.key for cell in grid.expand_grid(load_config(str(REPO / "configs/sweeps/toy.py"),
                                                                  overrides[1::2]))]
    assert len(expected) == 12
    out = tmp_path / "run"
    results = out / "results.jsonl"
    command = [sys.executable, "-m", "bitlaws.cli", "sweep", "--config", "configs/sweeps/toy.py", "--out", str(out),
               "--no-progress", "--workers", "2", *overrides]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    workers = _kill_after_lines(command, env, results, lines=3, timeout_s=120)
    assert workers, "the sweep started no worker processes"
    killed_at = _line_count(results)
    assert 3 <= killed_at < len(expected)
    deadline = time.monotonic() + 60  # each worker finishes the cell it is on (<= a few s), sees its parent gone
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(pid) for pid in workers), "worker processes outlived their killed parent"
    assert _line_count(results) == killed_at  # nobody wrote after the parent died

    rerun = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
    keys = [json.loads(line)["key"] for line in results.read_text().splitlines()]
    assert sorted(keys) == sorted(expected) and len(set(keys)) == len(keys)
