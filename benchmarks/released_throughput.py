"""Samples/s of the released study's pipelines (`bitlaws.sweep.released`) at the released sizes, random weights.

VAR-d16 (+ its VQVAE tokenizer) and DiT-XL/2 (+ the SD VAE) are built from ``configs/models`` with random weights
(`bitlaws.models.common.random_model`; nothing is downloaded) and sampled by the study's
`released_sampling.ShardedSampler`: ``--batch`` samples per device, one ``fold_in`` key per sample, the batch
sharded over all local devices, uint8 output; with ``--inception`` the random-weight FID Inception's features of the
batch are included. Each model runs in its own subprocess (``--timeout`` seconds at most). One batch is one
measurement: the first call is reported as compile time (trace + compile + one batch), then ``--repeats``
batches are timed and the fastest is reported.

CPU runs are slow at these sizes: ``--steps`` cuts DiT's 250 DDPM steps (the protocol's respacing becomes
``str(steps)``) and ``--scales`` keeps VAR's first N of its 10 scales (the image shrinks to ``16 * pn_N``).

Usage::

    python benchmarks/released_throughput.py                            # both, full protocol (accelerator)
    python benchmarks/released_throughput.py --steps 2 --scales 4 --batch 1 --repeats 1   # quick check on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _var_pipeline(args: argparse.Namespace):
    from flax import nnx  # pylint: disable=g-import-not-at-top

    from bitlaws import configlib  # pylint: disable=g-import-not-at-top
    from bitlaws.analysis.subjects import VAR_PROTOCOL  # pylint: disable=g-import-not-at-top
    from bitlaws.models.common import random_model  # pylint: disable=g-import-not-at-top
    from bitlaws.models.var import VAR, var_ctor_kwargs  # pylint: disable=g-import-not-at-top
    from bitlaws.models.vqvae import VQVAE  # pylint: disable=g-import-not-at-top
    from bitlaws.port.convert import REPO_CONFIGS, model_ctor  # pylint: disable=g-import-not-at-top

    config = configlib.load_config(str(REPO_CONFIGS / "var_d16.py"))
    vq_ctor = model_ctor(config.vqvae)
    var_ctor = var_ctor_kwargs(model_ctor(config.var), vq_ctor)
    patch_nums = tuple(var_ctor["patch_nums"])[:args.scales]
    vq_ctor["v_patch_nums"] = var_ctor["patch_nums"] = patch_nums
    vae = random_model(lambda: VQVAE(**vq_ctor, rngs=nnx.Rngs(0)), seed=0)
    var = random_model(lambda: VAR(**var_ctor, rngs=nnx.Rngs(0)), seed=1)
    return "var", var, vae, dict(VAR_PROTOCOL), f"VAR-d16, {len(patch_nums)} scales ({16 * patch_nums[-1]} px)"


def _dit_pipeline(args: argparse.Namespace):
    from flax import nnx  # pylint: disable=g-import-not-at-top

    from bitlaws import configlib  # pylint: disable=g-import-not-at-top
    from bitlaws.analysis.subjects import DIT_PROTOCOL  # pylint: disable=g-import-not-at-top
    from bitlaws.models.common import random_model  # pylint: disable=g-import-not-at-top
    from bitlaws.models.dit import DiT  # pylint: disable=g-import-not-at-top
    from bitlaws.models.kl_vae import AutoencoderKL  # pylint: disable=g-import-not-at-top
    from bitlaws.port.convert import REPO_CONFIGS, model_ctor  # pylint: disable=g-import-not-at-top

    ctor = model_ctor(configlib.load_config(str(REPO_CONFIGS / "dit_xl2.py")).model)
    vae_ctor = model_ctor(configlib.load_config(str(REPO_CONFIGS / "sd_vae_ft_ema.py")).model)
    dit = random_model(lambda: DiT(**ctor, rngs=nnx.Rngs(0)), seed=2)
    vae = random_model(lambda: AutoencoderKL(**vae_ctor, rngs=nnx.Rngs(0)), seed=3)
    protocol = {**DIT_PROTOCOL, "timestep_respacing": str(args.steps)}
    return "dit", dit, vae, protocol, f"DiT-XL/2, {args.steps} DDPM steps + SD-VAE decode"


def worker(args: argparse.Namespace) -> dict:
    """Runs in the subprocess: builds one pipeline and times it."""
    import jax  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top

    from bitlaws.eval.fid import inception_stats, random_fid_inception  # pylint: disable=g-import-not-at-top
    from bitlaws.eval.sharded import local_data_mesh  # pylint: disable=g-import-not-at-top
    from bitlaws.sweep.released_sampling import ShardedSampler  # pylint: disable=g-import-not-at-top

    family, model, decoder, protocol, name = (_var_pipeline if args.worker == "var" else _dit_pipeline)(args)
    mesh = local_data_mesh()
    sampler = ShardedSampler(family, model, decoder, protocol, mesh=mesh, per_device_batch=args.batch,
                             num_classes=int(model.num_classes))
    inception = random_fid_inception(0) if args.inception else None

    def one_batch(offset: int) -> None:
        images = sampler.sample(0, np.arange(offset, offset + sampler.batch))
        if inception is not None:
            inception_stats(images, model=inception, batch_size=sampler.batch, mesh=mesh, progress=False)

    start = time.perf_counter()
    one_batch(0)
    compile_s = time.perf_counter() - start
    times = []
    for repeat in range(args.repeats):
        start = time.perf_counter()
        one_batch((repeat + 1) * sampler.batch)
        times.append(time.perf_counter() - start)
    best = min(times)
    return {"model": name, "device": f"{jax.devices()[0].device_kind} x{jax.local_device_count()}",
            "batch": sampler.batch, "seconds_per_batch": best, "samples_per_s": sampler.batch / best,
            "compile_s": compile_s - best, "inception": bool(args.inception)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8, help="samples per device per batch")
    parser.add_argument("--steps", type=int, default=250, help="DiT DDPM steps (250: the paper's protocol)")
    parser.add_argument("--scales", type=int, default=10, help="VAR scales kept (10: all)")
    parser.add_argument("--repeats", type=int, default=2, help="timed batches after the compiling one")
    parser.add_argument("--inception", action="store_true", help="include the FID Inception features")
    parser.add_argument("--only", choices=("var", "dit"))
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per model (subprocess)")
    parser.add_argument("--worker", choices=("var", "dit"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)))
        return
    for family in ("var", "dit"):
        if args.only not in (None, family):
            continue
        command = [sys.executable, __file__, *sys.argv[1:], "--worker", family]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        try:
            proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            print(f"{family}: timed out after {args.timeout:.0f} s (use --steps / --scales / --batch on a CPU)")
            continue
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(f"{family}: failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
            continue
        row = json.loads(lines[-1][len("RESULT "):])
        print(f"{row['device']}: {row['model']}, batch {row['batch']}{' + Inception' if row['inception'] else ''}: "
              f"{row['samples_per_s']:.4f} samples/s ({row['seconds_per_batch']:.2f} s/batch; compile "
              f"{row['compile_s']:.1f} s)")


if __name__ == "__main__":
    main()
