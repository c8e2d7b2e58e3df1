"""Throughput of FID Inception feature extraction (`bitlaws.eval.fid.inception_stats`) on forced CPU devices.

Each configuration runs in its own subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=N``
(N = 1, 2, 4 by default), random recipe-style weights (`random_fid_inception`) and uint8 images of
``--size`` x ``--size`` pixels (resized to 299x299 inside the network). The batch of ``--batch-size`` images
per step is sharded over the N devices. If ``torch`` and ``pytorch_fid`` are importable in this Python, the
same images also go through pytorch-fid's ``InceptionV3`` (random weights, nothing downloaded) on the same
CPU; otherwise that row is skipped with a message. torch is never a dependency of bitlaws.

Reported per configuration:

* ``steady img/s``: images / (end - moment the second batch was requested), i.e. after compilation;
* ``end-to-end img/s``: the `FeatureRun.images_per_sec` of the call (includes tracing and compilation);
* ``compile s``: time until the second batch was requested (trace + compile + first dispatch).

Usage::

    .venv/bin/python benchmarks/fid_throughput.py --images 64 --size 64 --batch-size 16 --devices 1 2 4
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _images(count: int, size: int, seed: int):
    import numpy as np  # pylint: disable=g-import-not-at-top
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def _timed_batches(images, batch_size: int, stamps: list[float]):
    """Yields batches and records the time each one is requested."""
    for start in range(0, images.shape[0], batch_size):
        stamps.append(time.perf_counter())
        yield images[start:start + batch_size]


def worker_jax(args: argparse.Namespace) -> dict:
    """Runs inside the subprocess: one `inception_stats` call, timed."""
    import jax  # pylint: disable=g-import-not-at-top
    from bitlaws.eval.fid import inception_stats, random_fid_inception  # pylint: disable=g-import-not-at-top

    images = _images(args.images, args.size, args.seed)
    model = random_fid_inception(args.seed)
    stamps: list[float] = []
    run = inception_stats(_timed_batches(images, args.batch_size, stamps), model=model,
                          batch_size=args.batch_size, progress=False)
    end = time.perf_counter()
    second = stamps[1] if len(stamps) > 1 else stamps[0]
    return {"backend": f"jax {jax.__version__}", "devices": jax.device_count(), "n": run.n,
            "steady": run.n / (end - second), "end_to_end": run.images_per_sec, "compile_s": second - stamps[0]}


def pytorch_fid_model():
    """pytorch-fid's ``InceptionV3([3])`` with random weights (its FID trunk built without the download)."""
    import pytorch_fid.inception as pfi  # pylint: disable=g-import-not-at-top

    def trunk_without_weights():
        net = pfi._inception_v3(num_classes=1008, aux_logits=False, weights=None)  # pylint: disable=protected-access
        net.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
        net.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
        net.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
        net.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
        net.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
        net.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
        net.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
        net.Mixed_7b = pfi.FIDInceptionE_1(1280)
        net.Mixed_7c = pfi.FIDInceptionE_2(2048)
        return net

    pfi.fid_inception_v3 = trunk_without_weights
    return pfi.InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True).eval()


def worker_torch(args: argparse.Namespace) -> dict:
    """Runs inside the subprocess: pytorch-fid InceptionV3 on the same images (NCHW float in [0, 1])."""
    import torch  # pylint: disable=g-import-not-at-top

    model = pytorch_fid_model()
    images = torch.from_numpy(_images(args.images, args.size, args.seed)).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        start = time.perf_counter()
        model(images[:args.batch_size])  # warm-up batch, not counted
        second = time.perf_counter()
        for begin in range(0, images.shape[0], args.batch_size):
            model(images[begin:begin + args.batch_size])
        end = time.perf_counter()
    n = images.shape[0]
    return {"backend": f"torch {torch.__version__} ({torch.get_num_threads()} threads)", "devices": 1, "n": n,
            "steady": n / (end - second), "end_to_end": n / (end - start), "compile_s": second - start}


def _spawn(args: argparse.Namespace, backend: str, devices: int) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    cmd = [sys.executable, __file__, "--worker", backend, "--images", str(args.images), "--size", str(args.size),
           "--batch-size", str(args.batch_size), "--seed", str(args.seed)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{backend} worker with {devices} device(s) failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _torch_available() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("torch", "pytorch_fid"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64, help="images per configuration (default 64)")
    parser.add_argument("--size", type=int, default=64, help="image height and width before the 299 resize")
    parser.add_argument("--batch-size", type=int, default=16, help="images per step, sharded over the devices")
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4], help="forced CPU device counts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", choices=["jax", "torch"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = worker_jax(args) if args.worker == "jax" else worker_torch(args)
        print(json.dumps(result))
        return

    print(f"FID Inception feature extraction: {args.images} images {args.size}x{args.size} -> 299x299, "
          f"batch {args.batch_size}, random recipe weights, CPU ({os.cpu_count()} cores visible)")
    rows = [_spawn(args, "jax", devices) for devices in args.devices]
    if _torch_available():
        rows.append(_spawn(args, "torch", 1))
    else:
        print("pytorch-fid row skipped: torch and/or pytorch_fid are not importable in this Python "
              "(they are never bitlaws dependencies)")
    base = rows[0]["steady"]
    print(f"{'backend':<28} {'devices':>7} {'steady img/s':>13} {'end-to-end img/s':>17} {'compile s':>10} "
          f"{'ratio':>6}")
    for row in rows:
        print(f"{row['backend']:<28} {row['devices']:>7} {row['steady']:>13.2f} {row['end_to_end']:>17.2f} "
              f"{row['compile_s']:>10.1f} {row['steady'] / base:>6.2f}")
    print(f"ratio = steady img/s relative to the first row ({rows[0]['devices']} JAX device(s))")


if __name__ == "__main__":
    main()
