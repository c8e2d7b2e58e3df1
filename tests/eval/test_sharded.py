"""Tests for bitlaws.eval.sharded (run in subprocesses with 4 forced CPU devices)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]

_FOUR_DEVICE_SCRIPT = textwrap.dedent(
    r'''
    import json
    import numpy as np
    import jax
    import jax.numpy as jnp
    from bitlaws.eval import FeatureStats, accumulate_features
    from bitlaws.eval.sharded import data_mesh, merge_across_processes

    assert jax.device_count() == 4, jax.devices()
    rng = np.random.default_rng(0)
    N, D, K = 37, 16, 5
    images = rng.integers(0, 256, (N, 4, 4, 3), dtype=np.uint8)
    W = (rng.standard_normal((48, D)) / 4).astype(np.float32)
    b = rng.standard_normal(D).astype(np.float32)  # f(zero padding) != 0
    V = rng.standard_normal((D, K)).astype(np.float32)
    traced_shapes = []

    def feature_fn(x):
        traced_shapes.append(x.shape)
        x = x.reshape(x.shape[0], -1).astype(jnp.float32) / 255.0
        return jnp.tanh(jnp.dot(x, W, precision="highest") + b)

    def logits_fn(f):
        return jnp.dot(f, V, precision="highest")

    # numpy reference on all features (float64)
    ref_feats = np.tanh(images.reshape(N, -1).astype(np.float64) / 255.0 @ W + b)
    ref_mu, ref_sigma = ref_feats.mean(0), np.cov(ref_feats, rowvar=False)
    ref_logits = ref_feats @ V

    def rel(a, b):
        return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))

    report = {}
    run4 = accumulate_features(feature_fn, images, batch_size=10, logits_fn=logits_fn, progress=False)
    assert data_mesh().shape["data"] == 4
    assert traced_shapes == [(12, 4, 4, 3)], traced_shapes  # 10 padded to a multiple of 4, one trace
    assert run4.n == 37 and run4.stats.n == 37
    assert run4.logits.shape == (N, K)
    assert run4.images_per_sec > 0 and run4.seconds > 0

    run1 = accumulate_features(feature_fn, images, batch_size=10, mesh=data_mesh(1), progress=False)
    assert run1.logits is None and run1.stats.n == 37 and run1.features is None
    kept = accumulate_features(feature_fn, images, batch_size=10, progress=False, keep_features=True)
    assert kept.features.shape == (N, D)  # real rows only, in input order
    report["kept_features"] = rel(kept.features, ref_feats)
    report["4dev_vs_numpy_mu"] = rel(run4.stats.mu, ref_mu)
    report["4dev_vs_numpy_sigma"] = rel(run4.stats.sigma, ref_sigma)
    report["4dev_vs_1dev_mu"] = rel(run4.stats.mu, run1.stats.mu)
    report["4dev_vs_1dev_sigma"] = rel(run4.stats.sigma, run1.stats.sigma)
    report["logits"] = rel(run4.logits, ref_logits)

    # iterable of uneven batches (one larger than batch_size, one empty), params
    # replicated as an argument, pair (features, logits) output, resumed stats.
    def fn_params(p, x):
        x = x.reshape(x.shape[0], -1).astype(jnp.float32) / 255.0
        f = jnp.tanh(jnp.dot(x, p["W"], precision="highest") + p["b"])
        return f, jnp.dot(f, V, precision="highest")

    first = FeatureStats.from_features(ref_feats[:3])
    batches = [images[3:6], images[6:21], images[21:21], images[21:]]
    run_it = accumulate_features(fn_params, batches, batch_size=7, params={"W": W, "b": b},
                                 stats=first, progress=True)
    assert run_it.n == 34 and run_it.stats is first and first.n == 37
    report["iter_mu"] = rel(run_it.stats.mu, ref_mu)
    report["iter_sigma"] = rel(run_it.stats.sigma, ref_sigma)
    report["iter_logits"] = rel(run_it.logits, ref_logits[3:])

    assert merge_across_processes(run4.stats) is run4.stats  # single process: no-op

    # the jitted step really splits the padded batch over the 4 devices
    from jax.sharding import NamedSharding, PartitionSpec as P
    from bitlaws.eval.sharded import _make_step
    mesh = data_mesh()
    step = _make_step(feature_fn, logits_fn, False, NamedSharding(mesh, P("data")), NamedSharding(mesh, P()))
    x = jax.device_put(np.zeros((12, 4, 4, 3), np.uint8), NamedSharding(mesh, P("data")))
    feats, logits = step(x)
    assert sorted(s.data.shape for s in feats.addressable_shards) == [(3, D)] * 4
    assert len({s.device for s in feats.addressable_shards}) == 4
    print("REPORT " + json.dumps(report))
    '''
)


def _run_script(source: str, tmp_path: Path, devices: int, timeout: float = 120) -> str:
    script = tmp_path / "script.py"
    script.write_text(source)
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONWARNINGS"] = "error::DeprecationWarning:bitlaws.eval.sharded"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(script)], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


def test_four_devices_match_single_device_and_numpy(tmp_path):
    import json

    out = _run_script(_FOUR_DEVICE_SCRIPT, tmp_path, devices=4)
    line = next(l for l in out.splitlines() if l.startswith("REPORT "))
    report = json.loads(line[len("REPORT ") :])
    for key, err in report.items():
        assert err < 1e-6, (key, err, report)


_WORKER_SCRIPT = textwrap.dedent(
    r'''
    import json, sys
    import numpy as np
    import jax
    pid, port = int(sys.argv[1]), sys.argv[2]
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=pid)
    import jax.numpy as jnp
    from bitlaws.eval import FeatureStats, accumulate_features
    from bitlaws.eval.sharded import merge_across_processes

    rng = np.random.default_rng(0)
    N = 37
    images = rng.integers(0, 256, (N, 4, 4, 3), dtype=np.uint8)
    W = (rng.standard_normal((48, 16)) / 4).astype(np.float32)
    b = rng.standard_normal(16).astype(np.float32)
    V = rng.standard_normal((16, 3)).astype(np.float32)

    def fn(params, x):
        x = x.reshape(x.shape[0], -1).astype(jnp.float32) / 255.0
        return jnp.tanh(jnp.dot(x, params["W"], precision="highest") + params["b"])

    # Process 0 feeds 2 full batches, process 1 has 17 images: one batch of 10,
    # one of 7 and an empty (pure padding) batch to keep the step count equal.
    if pid == 0:
        mine, batches = images[:20], [images[:20], images[20:20]]
    else:
        mine, batches = images[20:], [images[20:]]
    run = accumulate_features(fn, batches, batch_size=10, stats=FeatureStats(dim=16), params={"W": W, "b": b},
                              logits_fn=lambda f: jnp.dot(f, V, precision="highest"), progress=False)
    merged = merge_across_processes(run.stats)
    ref = np.tanh(images.reshape(N, -1).astype(np.float64) / 255.0 @ W + b)
    mine_ref = np.tanh(mine.reshape(len(mine), -1).astype(np.float64) / 255.0 @ W + b)
    rel = lambda a, r: float(np.max(np.abs(a - r)) / np.max(np.abs(r)))
    print("REPORT " + json.dumps({
        "pid": pid, "devices": jax.device_count(), "local_n": run.n, "n": merged.n,
        "mu": rel(merged.mu, ref.mean(0)), "sigma": rel(merged.sigma, np.cov(ref, rowvar=False)),
        "local_sigma": rel(run.stats.sigma, np.cov(mine_ref, rowvar=False)),
        "logits": rel(run.logits, mine_ref @ V),
        "sum_xxT_bits": merged.sum_xxT.tobytes().hex()[:64],
    }))
    '''
)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_merge_across_processes(tmp_path):
    """Multi-host path: 2 processes x 2 CPU devices, gloo collectives."""
    import json

    script = tmp_path / "worker.py"
    script.write_text(_WORKER_SCRIPT)
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONWARNINGS"] = "error::DeprecationWarning:bitlaws.eval.sharded"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    port = str(_free_port())
    procs = [
        subprocess.Popen([sys.executable, str(script), str(pid), port], env=env, cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for pid in range(2)
    ]
    reports = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, f"stdout:\n{out}\nstderr:\n{err}"
            line = next(l for l in out.splitlines() if l.startswith("REPORT "))
            reports.append(json.loads(line[len("REPORT ") :]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert [r["local_n"] for r in reports] == [20, 17]
    for r in reports:
        assert r["devices"] == 4 and r["n"] == 37
        for key in ("mu", "sigma", "local_sigma", "logits"):
            assert r[key] < 1e-6, (key, r)
    assert reports[0]["sum_xxT_bits"] == reports[1]["sum_xxT_bits"]  # identical on every process


def test_pack_unpack_is_bit_exact():
    from bitlaws.eval import FeatureStats
    from bitlaws.eval.sharded import _pack, _unpack

    rng = np.random.default_rng(0)
    stats = FeatureStats.from_features(rng.standard_normal((11, 5)) * 1e3 + np.pi)
    packed = _pack(stats)
    assert all(v.dtype == np.uint32 for v in packed.values())
    back = _unpack(packed, 5)
    assert back.n == 11
    for name in ("shift", "sum_x", "sum_xxT"):
        np.testing.assert_array_equal(getattr(back, name), getattr(stats, name))


def test_accumulate_features_validation():
    import jax.numpy as jnp

    from bitlaws.eval import accumulate_features
    from bitlaws.eval.sharded import data_mesh

    images = np.zeros((5, 2, 2, 3), np.uint8)
    flat = lambda x: x.reshape(x.shape[0], -1).astype(jnp.float32)  # noqa: E731
    with pytest.raises(ValueError, match="batch_size"):
        accumulate_features(flat, images, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="features must have shape"):
        accumulate_features(lambda x: flat(x)[:, :, None], images, batch_size=4, progress=False)
    with pytest.raises(ValueError, match="logits_fn"):
        accumulate_features(lambda x: (flat(x), flat(x)), images, batch_size=4,
                            logits_fn=lambda f: f, progress=False)
    import jax

    bad_mesh = jax.make_mesh((1,), ("batch",))
    with pytest.raises(ValueError, match="'data'"):
        accumulate_features(flat, images, batch_size=4, mesh=bad_mesh, progress=False)
    run = accumulate_features(flat, images, batch_size=4, mesh=data_mesh(1), progress=False)
    np.testing.assert_allclose(run.stats.mu, np.zeros(12))
