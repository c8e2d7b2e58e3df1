"""`bitlaws.xla_options.COMPILER_OPTIONS` against XLA's defaults on full-size kernels, side by side in one process.

Each workload is jitted twice - with the library's compiler options (no YNNPACK fusions) and without - and the
two are timed interleaved (min of ``--repeats`` steady calls after one compiling call): a 3x3 convolution
160 -> 160 on 8x128x128, a 4096^3 float32 matmul (also at ``precision='highest'``), VAR's VQVAE decode of 2
images and FID Inception pool3 features of 32 images 299x299 (random N(0, 0.02) / random-init weights).

Usage::

    python benchmarks/xla_options_ab.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vs_official import random_var  # noqa: E402  pylint: disable=g-import-not-at-top

from bitlaws.eval.fid import random_fid_inception  # noqa: E402
from bitlaws.xla_options import COMPILER_OPTIONS  # noqa: E402


def _workloads():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((8, 128, 128, 160), np.float32))
    w = jnp.asarray(rng.standard_normal((3, 3, 160, 160), np.float32) * 0.03)
    a = jnp.asarray(rng.standard_normal((4096, 4096), np.float32))
    vae, _, _, vq_ctor = random_var(16)
    vae_def, vae_state = nnx.split(vae)
    f_hat = jax.random.normal(jax.random.key(1), (2, 16, 16, vq_ctor["z_channels"]))
    inception = random_fid_inception(0, include_fc=False)
    inc_def, inc_state = nnx.split(inception)
    images = jnp.asarray(rng.integers(0, 256, (32, 299, 299, 3), dtype=np.uint8))
    return {
        "conv3x3 160->160 8x128x128": (lambda x, w: jax.lax.conv_general_dilated(
            x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")), (x, w)),
        "matmul 4096^3": (jnp.dot, (a, a)),
        "matmul 4096^3 precision=highest": (lambda a, b: jnp.dot(a, b, precision="highest"), (a, a)),
        "VQVAE decode, 2 images": (lambda s, f: nnx.merge(vae_def, s).fhat_to_img(f), (vae_state, f_hat)),
        "Inception features, 32 images": (lambda s, x: nnx.merge(inc_def, s).features(x), (inc_state, images)),
    }


def _time(fn, args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(f"# XLA options A/B: {os.cpu_count()} cores, jax {jax.__version__}; COMPILER_OPTIONS={COMPILER_OPTIONS}; "
          "seconds, min of steady calls")
    outputs = {}
    for name, (fn, inputs) in _workloads().items():
        variants = {"xla defaults": jax.jit(fn), "bitlaws options": jax.jit(fn, compiler_options=COMPILER_OPTIONS)}
        times = {label: [] for label in variants}
        for label, compiled in variants.items():
            outputs[label] = np.asarray(compiled(*inputs))  # compiles
        for r in range(args.repeats):
            for label in (variants if r % 2 == 0 else reversed(list(variants))):
                times[label].append(_time(variants[label], inputs))
        a, b = min(times["xla defaults"]), min(times["bitlaws options"])
        diff = np.max(np.abs(outputs["xla defaults"] - outputs["bitlaws options"])) / max(
            np.max(np.abs(outputs["xla defaults"])), 1e-30)
        print(f"{name:34s} xla defaults {a:7.3f}  bitlaws options {b:7.3f}  defaults / options {a / b:5.2f}x  "
              f"max rel diff {diff:.1e}  (load {os.getloadavg()[0]:.2f})", flush=True)


if __name__ == "__main__":
    main()
