"""`bitlaws.xla_options.COMPILER_OPTIONS` against XLA's defaults on full-size kernels, side by side in one process.

Each workload is jitted with the library's compiler options (no YNNPACK fusions), without them, and with them plus
each ``--with`` option set; the variants are timed interleaved (min of ``--repeats`` steady calls after one
compiling call, whose time is printed too): a 3x3 convolution 160 -> 160 on 8x128x128, a 4096^3 float32 matmul
(also at ``precision='highest'``), VAR's VQVAE decode of 2 images and FID Inception pool3 features of 32 images
299x299 (random N(0, 0.02) / random-init weights).

Usage::

    python benchmarks/xla_options_ab.py [--repeats 2]
    python benchmarks/xla_options_ab.py --with '{"xla_backend_optimization_level": 1}'
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ab  # noqa: E402  pylint: disable=g-import-not-at-top
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--with", dest="extra", action="append", default=[], metavar="JSON",
                        help="also time COMPILER_OPTIONS updated with these options (a JSON object); repeatable")
    args = parser.parse_args()
    option_sets = {"xla defaults": {}, "bitlaws options": dict(COMPILER_OPTIONS)}
    for extra in args.extra:
        option_sets["+ " + extra] = {**COMPILER_OPTIONS, **json.loads(extra)}
    print(f"# XLA options A/B: {os.cpu_count()} cores, jax {jax.__version__}; COMPILER_OPTIONS={COMPILER_OPTIONS}; "
          "seconds: compiling call / min of steady calls; ratios: bitlaws options' steady time / the variant's")
    for name, (fn, inputs) in _workloads().items():
        variants = {label: jax.jit(lambda *a, fn=fn: fn(*a), compiler_options=options or None)
                    for label, options in option_sets.items()}
        first = {label: ab.timed(compiled, inputs) for label, compiled in variants.items()}  # compiles
        outputs = {label: compiled(*inputs) for label, compiled in variants.items()}
        times = ab.interleaved(variants, inputs, args.repeats)
        ours = min(times["bitlaws options"])
        cells = []
        for label in variants:
            diff = ab.max_rel_diff(outputs["bitlaws options"], outputs[label])
            cells.append(f"{label} {first[label]:6.2f} / {min(times[label]):7.3f} s ({ours / min(times[label]):4.2f}x, "
                         f"rel diff {diff:.0e})")
        print(f"{name:34s} " + "  ".join(cells) + f"  (load {os.getloadavg()[0]:.2f})", flush=True)


if __name__ == "__main__":
    main()
