"""The released-model study end to end on the parity fixtures' tiny ported models (``released.py:smoke``).

One in-process DiT run (1 device) is the reference; the 4-device run, the SIGKILLed-and-resumed run and the
two-process run must reproduce its uint8 samples exactly and its FID / IS to float rounding.
"""

import json
import math
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from bitlaws import cli
from bitlaws.eval.fid import fid_from_features, load_reference
from bitlaws.eval.inception_score import inception_score
from bitlaws.sweep import runner
from bitlaws.sweep.released_smoke import smoke_inputs

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIG = "configs/sweeps/released.py"
DIT_CELL = "dit_fixture|W16A16|none|none|s0"
# DiT only (compiles in seconds), the float cell, 16 samples in 2 shards of 8, 4 samples per device per step.
DIT_OVERRIDES = ["settings=('W16A16',)", "released.n_samples=16", "released.progress=False"]
N = 16


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    folder = tmp_path_factory.mktemp("released_smoke")
    smoke_inputs(folder)
    return folder


def _spec(cache, model="dit_fixture"):
    return f"{CONFIG}:smoke,cache={cache}" + (f",model={model}" if model else "")


def _records(out: pathlib.Path) -> dict:
    return {r["key"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}


def _shards(out: pathlib.Path, key: str) -> dict:
    folder = out / "cells" / key.replace("|", "_")
    arrays = [np.load(path) for path in sorted(folder.glob("shard_*.npz"))]
    return {name: np.concatenate([a[name] for a in arrays]) for name in arrays[0].files}


def _command(cache, out, *extra_set, module="bitlaws.cli", model="dit_fixture"):
    command = [sys.executable, "-m", module] + (["sweep"] if module == "bitlaws.cli" else [])
    command += ["--config", _spec(cache, model), "--out", str(out), "--no-progress"]
    for item in (*DIT_OVERRIDES, *extra_set):
        command += ["--set", item]
    return command


def _env(devices: int) -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def reference_run(cache, tmp_path_factory):
    """The DiT float cell, 16 samples, in this process (one device)."""
    out = tmp_path_factory.mktemp("released_reference")
    summary = runner.run_sweep_from_config(_spec(cache), out, DIT_OVERRIDES, progress=False)
    assert summary.exit_code == 0, summary.failed
    return out


def test_reference_run_records_fid_is_and_the_stored_shards_agree(reference_run, cache):
    record = _records(reference_run)[DIT_CELL]
    assert record["n_samples"] == N and record["n_samples_resumed"] == 0 and record["metric_name"] == "FID-16"
    assert math.isfinite(record["fid"]) and record["fid"] > 0
    assert math.isfinite(record["inception_score"]) and record["inception_score"] >= 1.0
    assert record["protocol"]["timestep_respacing"] == "4" and record["protocol"]["cfg_scale"] == 1.5
    assert record["mt_bits"] > 0 and record["ct_bits"] > record["mt_bits"]
    shards = _shards(reference_run, DIT_CELL)
    assert shards["indices"].tolist() == list(range(N))
    assert shards["samples"].shape == (N, 16, 16, 3) and shards["samples"].dtype == np.uint8
    assert len({s.tobytes() for s in shards["samples"]}) == N  # every sample has its own key
    # The record is what the stored features and logits give.
    mu, sigma, _ = load_reference(pathlib.Path(cache) / "reference.npz")
    assert math.isclose(record["fid"], fid_from_features(shards["features"], (mu, sigma)), rel_tol=1e-9)
    mean, std = inception_score(shards["logits"], splits=2)
    assert math.isclose(record["inception_score"], mean, rel_tol=1e-12)
    assert math.isclose(record["inception_score_std"], std, rel_tol=1e-6, abs_tol=1e-15)


def test_four_devices_give_the_same_samples_and_fid(reference_run, cache, tmp_path):
    out = tmp_path / "four"
    proc = subprocess.run(_command(cache, out), cwd=REPO, env=_env(4), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, four = _records(reference_run)[DIT_CELL], _records(out)[DIT_CELL]
    assert four["devices"] == 4 and one["devices"] == jax.device_count() == 1
    np.testing.assert_array_equal(_shards(out, DIT_CELL)["samples"], _shards(reference_run, DIT_CELL)["samples"])
    np.testing.assert_allclose(_shards(out, DIT_CELL)["features"], _shards(reference_run, DIT_CELL)["features"],
                               rtol=1e-5, atol=1e-6)
    assert math.isclose(four["fid"], one["fid"], rel_tol=1e-6)
    assert math.isclose(four["inception_score"], one["inception_score"], rel_tol=1e-9)


def test_a_sigkilled_run_resumes_from_its_shards(reference_run, cache, tmp_path):
    out = tmp_path / "killed"
    first = out / "cells" / DIT_CELL.replace("|", "_") / "shard_00000.npz"
    with subprocess.Popen(_command(cache, out), cwd=REPO, env=_env(1), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT) as process:
        deadline = time.monotonic() + 300
        while not (first.exists() or process.poll() is not None or time.monotonic() > deadline):
            time.sleep(0.02)  # SIGKILL as soon as the first shard is complete
        running = process.poll() is None
        if running:
            os.kill(process.pid, signal.SIGKILL)
        log = process.communicate(timeout=60)[0].decode()
    assert running and process.returncode == -signal.SIGKILL, log[-2000:]
    written = sorted(p.name for p in first.parent.glob("shard_*.npz"))
    assert written == ["shard_00000.npz"]  # killed mid-cell: the first shard, not the second
    results = out / "results.jsonl"
    assert not results.exists() or not results.read_text()
    summary = runner.run_sweep_from_config(_spec(cache), out, DIT_OVERRIDES, progress=False)
    assert summary.exit_code == 0 and summary.evaluated == [DIT_CELL]
    resumed, fresh = _records(out)[DIT_CELL], _records(reference_run)[DIT_CELL]
    assert resumed["n_samples_resumed"] == 8 and resumed["n_samples"] == N
    np.testing.assert_array_equal(_shards(out, DIT_CELL)["samples"], _shards(reference_run, DIT_CELL)["samples"])
    assert resumed["fid"] == fresh["fid"] and resumed["inception_score"] == fresh["inception_score"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_processes_give_the_same_fid_as_one(reference_run, cache, tmp_path):
    """`released_multihost` with 2 local processes x 2 CPU devices (gloo), one shared output folder."""
    out, port = tmp_path / "two", _free_port()
    procs = [subprocess.Popen(_command(cache, out, module="bitlaws.sweep.released_multihost")
                              + ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(p)],
                              cwd=REPO, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for p in range(2)]
    logs = [proc.communicate(timeout=600)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], "\n----\n".join(log[-2000:] for log in logs)
    two, one = _records(out)[DIT_CELL], _records(reference_run)[DIT_CELL]
    assert two["processes"] == 2 and two["devices"] == 4 and two["n_samples"] == N
    np.testing.assert_array_equal(_shards(out, DIT_CELL)["samples"], _shards(reference_run, DIT_CELL)["samples"])
    assert math.isclose(two["fid"], one["fid"], rel_tol=1e-6)
    assert math.isclose(two["inception_score"], one["inception_score"], rel_tol=1e-9)


@pytest.mark.slow
def test_whole_smoke_config_through_the_command_line(cache, tmp_path):
    """Both families, float and W4A16 cells, as `bitlaws sweep --config configs/sweeps/released.py:smoke` runs."""
    out = tmp_path / "smoke"
    assert cli.main(["sweep", "--config", _spec(cache, model=None), "--out", str(out), "--no-progress",
                     "--set", "released.progress=False"]) == 0
    records = _records(out)
    assert sorted(records) == sorted(f"{m}|{s}" for m in ("var_fixture", "dit_fixture")
                                     for s in ("W16A16|none|none|s0", "W4A16|int|rtn|s0"))
    for record in records.values():
        assert math.isfinite(record["fid"]) and math.isfinite(record["inception_score"])
        assert record["n_samples"] == 24 and record["metric_name"] == "FID-24"
    assert records["var_fixture|W4A16|int|rtn|s0"]["mt_bits"] < records["var_fixture|W16A16|none|none|s0"]["mt_bits"]
    assert _shards(out, "var_fixture|W16A16|none|none|s0")["samples"].shape == (24, 64, 64, 3)


def test_missing_inputs_fail_before_sampling_with_one_line(cache, tmp_path, capsys):
    out = tmp_path / "never"
    cases = {
        "released.checkpoints.dit_fixture.dit=/nonexistent/dit_xl2": ("/nonexistent/dit_xl2", "bitlaws port dit"),
        "released.reference=/nonexistent/VIRTUAL_imagenet256_labeled.npz":
            ("/nonexistent/VIRTUAL_imagenet256_labeled.npz", "openaipublic.blob.core.windows.net"),
        "released.inception=/nonexistent/pt_inception-2015-12-05-6726825d.pth":
            ("/nonexistent/pt_inception-2015-12-05-6726825d.pth", "mseitzer/pytorch-fid"),
    }
    for override, (named, hint) in cases.items():
        with pytest.raises(ValueError) as error:
            runner.run_sweep_from_config(_spec(cache), out, [override], progress=False)
        message = str(error.value)
        assert "\n" not in message and named in message and hint in message, message
        assert not out.exists()  # nothing sampled, nothing written
    override = "released.checkpoints.dit_fixture.vae=/nonexistent/sd_vae_ft_ema"
    assert cli.main(["sweep", "--config", _spec(cache), "--out", str(out), "--set", override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "/nonexistent/sd_vae_ft_ema" in err and "sd-vae-ft-ema" in err
    with pytest.raises(ValueError, match="needs calibration data"):
        runner.run_sweep_from_config(_spec(cache), out, ["settings=('W4A16',)", "methods=('gptq',)"], progress=False)
