"""Runs killed with SIGKILL (between steps, inside a save) resume to bitwise the uninterrupted run."""

from __future__ import annotations

import json
import signal
import time

import numpy as np
import pytest

from bitlaws.train import STATE_DIR, metrics_lines

STEPS = "20"


def _started(worker, tmp_path_factory, name: str, *args: str):
    """Starts a worker run into a new folder; returns ``wait() -> (folder, return code)``, the process."""
    start, _ = worker
    out = tmp_path_factory.mktemp(name)
    process = start("run", str(out), "--steps", STEPS, *args)

    def wait():
        output, _ = process.communicate(timeout=120)
        return out, process.returncode, output

    return wait, process


@pytest.fixture(name="straight", scope="module")
def straight_fixture(worker, tmp_path_factory):
    """The uninterrupted run's folder (started with the module's other runs, awaited when first used)."""
    wait, process = _started(worker, tmp_path_factory, "straight")
    yield lambda: _succeeded(*wait())
    process.kill()


@pytest.fixture(name="died_in_save", scope="module")
def died_in_save_fixture(worker, tmp_path_factory):
    """A run SIGKILLed inside its third save (step 6: after the data went to orbax's temporary folder)."""
    wait, process = _started(worker, tmp_path_factory, "died", "--die-in-save", "3")
    yield wait
    process.kill()


def _succeeded(out, returncode, output):
    assert returncode == 0, output[-3000:]
    return out


def assert_same_run(tiny, got, want) -> None:
    a, b = np.load(got / "final.npz"), np.load(want / "final.npz")
    assert sorted(a.files) == sorted(b.files)
    for key in a.files:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    state_a, state_b = tiny.saved_state(got), tiny.saved_state(want)
    assert state_a.keys() == state_b.keys() and any("mu" in k for k in state_a)
    for key in state_a:
        np.testing.assert_array_equal(state_a[key], state_b[key], err_msg=key)
    strip = lambda records: [{k: v for k, v in r.items() if k != "steps_per_s"} for r in records]  # noqa: E731
    assert strip(metrics_lines(got)) == strip(metrics_lines(want))
    assert [r["step"] for r in metrics_lines(got)] == list(range(1, int(STEPS) + 1))


def committed_steps(out) -> list[int]:
    return sorted(int(p.name) for p in (out / STATE_DIR).iterdir() if p.name.isdigit())


def test_sigkill_between_steps_then_resume_is_bitwise_the_straight_run(tiny, worker, straight, died_in_save,
                                                                       tmp_path):
    del died_in_save  # started alongside
    start, finish = worker
    process = start("run", str(tmp_path), "--steps", STEPS, "--sleep", "0.1")
    deadline = time.monotonic() + 120
    while len(metrics_lines(tmp_path)) < 7:
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0][-3000:]
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    steps = committed_steps(tmp_path)  # two when the kill came between a commit and the old step's deletion
    step = steps[-1]
    assert 1 <= len(steps) <= 2 and 2 <= step < int(STEPS) and step % 2 == 0
    finish(start("run", str(tmp_path), "--steps", STEPS))
    assert json.loads((tmp_path / "result.json").read_text()) == {"step": int(STEPS), "start_step": step}
    assert_same_run(tiny, tmp_path, straight())


def test_sigkill_inside_a_save_keeps_the_previous_state(tiny, worker, straight, died_in_save):
    start, finish = worker
    out, returncode, output = died_in_save()
    assert returncode == -signal.SIGKILL, output[-3000:]
    assert committed_steps(out) == [4]
    assert any(p.name.startswith("6.") for p in (out / STATE_DIR).iterdir())  # the uncommitted data
    assert metrics_lines(out)[-1]["step"] == 6  # logged before the save began
    finish(start("run", str(out), "--steps", STEPS))
    assert json.loads((out / "result.json").read_text())["start_step"] == 4
    assert committed_steps(out) == [int(STEPS)]
    assert_same_run(tiny, out, straight())
