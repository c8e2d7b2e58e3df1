"""Sampling throughput of VAR and DiT (JAX, jit) with random weights at the released sizes.

VAR is timed end to end (all 10 scales, CFG batch 2B, KV cache, tokenizer decode). DiT-XL/2 is timed per
denoising step (one ``forward_with_cfg`` at batch 2B) plus one SD-VAE decode, and images/s is extrapolated
to the 250-step protocol: a full 250-step run on a 2-core CPU would take hours. Compile time is excluded
(each function runs once before timing) and reported separately.

Usage::

    python benchmarks/sampling.py                      # VAR-d16 and DiT-XL/2, batch 8 (slow on CPU)
    python benchmarks/sampling.py --quick              # tiny models, checks the script in seconds
    python benchmarks/sampling.py --only dit --batch 4
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import jax.numpy as jnp
from flax import nnx

from bitlaws import configlib
from bitlaws.models.common import random_model
from bitlaws.models.dit import DiT
from bitlaws.models.kl_vae import AutoencoderKL
from bitlaws.port.convert import REPO_CONFIGS, model_ctor
from bitlaws.sample.var_sampler import autoregressive_infer_cfg
from vs_official import random_var  # benchmarks/, the script's folder


def _timed(fn, repeats: int):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return compile_s, min(times)


def bench_var(depth: int, batch: int, repeats: int, quick: bool) -> dict:
    vae, var, var_ctor, _ = random_var(depth if not quick else 16, quick)  # N(0, 0.02) weights (vs_official.py)
    labels = jnp.arange(batch) % var_ctor["num_classes"]
    run = lambda: autoregressive_infer_cfg(var, vae, B=batch, label_B=labels, key=jax.random.key(0),  # noqa: E731
                                           cfg=1.5, top_k=900, top_p=0.96)
    compile_s, seconds = _timed(run, repeats)
    return dict(model=f"VAR-d{var_ctor['depth']}", batch=batch, seconds_per_batch=seconds,
                images_per_s=batch / seconds, compile_s=compile_s, note=f"end to end, {len(var_ctor['patch_nums'])} scales")


def bench_dit(variant: str, batch: int, steps: int, repeats: int, quick: bool) -> dict:
    config = configlib.load_config(str(REPO_CONFIGS / "dit.py") + f":{variant}")
    ctor = model_ctor(config.model)
    vae_ctor = model_ctor(configlib.load_config(str(REPO_CONFIGS / "sd_vae_ft_ema.py")).model)
    if quick:
        ctor.update(input_size=8, hidden_size=64, depth=2, num_heads=4)
        vae_ctor.update(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1)
    dit = random_model(lambda: DiT(**ctor, rngs=nnx.Rngs(0)), seed=2)
    vae = random_model(lambda: AutoencoderKL(**vae_ctor, rngs=nnx.Rngs(0)), seed=3)
    size, channels = ctor["input_size"], ctor["in_channels"]
    x = jax.random.normal(jax.random.key(0), (2 * batch, size, size, channels))
    t = jnp.full((2 * batch,), 500)
    y = jnp.concatenate([jnp.arange(batch) % ctor["num_classes"], jnp.full((batch,), ctor["num_classes"])])
    step = nnx.jit(lambda m, x, t, y: m.forward_with_cfg(x, t, y, 1.5))
    decode = nnx.jit(lambda v, z: v.decode(z / 0.18215))
    step_compile, step_s = _timed(lambda: step(dit, x, t, y), repeats)
    decode_compile, decode_s = _timed(lambda: decode(vae, x[:batch]), repeats)
    per_batch = steps * step_s + decode_s
    name = "DiT-tiny" if quick else f"DiT-{variant.upper()}"
    return dict(model=name, batch=batch, seconds_per_step=step_s, decode_s=decode_s,
                seconds_per_batch=per_batch, images_per_s=batch / per_batch,
                compile_s=step_compile + decode_compile,
                note=f"extrapolated: {steps} CFG steps x measured step + one VAE decode")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--var-depth", type=int, default=16, choices=(16, 20, 24, 30))
    parser.add_argument("--dit", default="xl2")
    parser.add_argument("--steps", type=int, default=250, help="DiT sampling steps to extrapolate to")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--only", choices=("var", "dit"))
    parser.add_argument("--quick", action="store_true", help="tiny models (checks the script, not a benchmark)")
    args = parser.parse_args()
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()} ({platform.processor() or 'cpu'}), "
          f"jax {jax.__version__}{'  [QUICK: tiny models]' if args.quick else ''}")
    rows = []
    if args.only in (None, "var"):
        rows.append(bench_var(args.var_depth, args.batch, args.repeats, args.quick))
    if args.only in (None, "dit"):
        rows.append(bench_dit(args.dit, args.batch, args.steps, args.repeats, args.quick))
    for row in rows:
        extra = (f", {row['seconds_per_step']:.3f} s/step, decode {row['decode_s']:.2f} s"
                 if "seconds_per_step" in row else "")
        print(f"{row['model']:<10} batch {row['batch']}: {row['images_per_s']:.4f} images/s "
              f"({row['seconds_per_batch']:.2f} s/batch{extra}; compile {row['compile_s']:.1f} s) — {row['note']}")


if __name__ == "__main__":
    main()
