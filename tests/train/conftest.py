"""Shared pieces of the `bitlaws.train` tests: the tiny MLP problem (`tiny_mlp.py`) and its worker process."""

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

WORKER = pathlib.Path(__file__).resolve().parent / "tiny_mlp.py"
REPO = WORKER.parents[2]


def _load_tiny():
    spec = importlib.util.spec_from_file_location("tiny_mlp", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(name="tiny", scope="session")
def tiny_fixture():
    """The `tiny_mlp` module (problem, config, helpers)."""
    return _load_tiny()


def start_worker(*args: str, devices: int = 1) -> subprocess.Popen:
    """Starts ``python tiny_mlp.py ARGS`` on the CPU (with `devices` host devices); stdout/stderr captured."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    if devices > 1:
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    return subprocess.Popen([sys.executable, str(WORKER), *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen, timeout: float = 120.0) -> str:
    """Waits for `process`; fails the test with its output unless it exited with status 0."""
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-4000:]
    return output


@pytest.fixture(name="worker", scope="session")
def worker_fixture():
    """``(start_worker, finish)`` (conftest helpers are shared as fixtures, not imports)."""
    return start_worker, finish
