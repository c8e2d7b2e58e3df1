"""The decoders' and FID Inception's rewritten forms against the literal ones, side by side in one process.

Each workload is compiled twice - as the library computes it now and in its literal form (the form before
session 14) - and the two are timed interleaved (min and median of ``--repeats`` steady calls):

* ``upsample conv``: nearest x2 + 3x3 conv, 2 x 128x128x160 -> 256x256x160 (VQVAE's largest), literal vs
  `bitlaws.quant.upsampled_conv.nearest2x_conv3x3` (one 2x2 conv of the four phase kernels at the input size);
* ``VQVAE decode``: VAR's VQVAE decoder (released size, random N(0, 0.02) weights) on 2 images;
* ``Inception pools``: the 13 pools of a 32-image batch at their shapes, ``lax.reduce_window`` vs strided slices;
* ``Inception resize``: 32 images 256 -> 299, two dense interpolation-matrix products vs two-tap gathers;
* ``Inception features``: 32 images 256x256 -> pool3, literal (reduce_window pools, pool branches pooled before
  their 1x1 conv, each 1x1 conv alone, matrix resize) vs the library (separable pools, pool after the conv,
  the 1x1 convs reading one input as one matmul, gather resize).

The literal programs are traced with the module functions swapped for their previous forms (restored after).
Every pair's outputs are compared (max relative difference printed).

Usage::

    python benchmarks/conv_forms.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ab  # noqa: E402  pylint: disable=g-import-not-at-top
from vs_official import random_var  # noqa: E402  pylint: disable=g-import-not-at-top

from bitlaws.eval import inception  # noqa: E402
from bitlaws.eval.fid import random_fid_inception  # noqa: E402
from bitlaws.quant import upsampled_conv  # noqa: E402
from bitlaws.xla_options import COMPILER_OPTIONS  # noqa: E402


def literal_max_pool(x, window, stride, padding=0):
    pads = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, window, window, 1), (1, stride, stride, 1), pads)


def literal_avg_pool(x):
    pads = ((0, 0), (1, 1), (1, 1), (0, 0))
    window_sum = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pads)
    return window_sum / jnp.asarray(inception._valid_counts_3x3(x.shape[1], x.shape[2]))  # pylint: disable=protected-access


def literal_resize(images, size=inception.INPUT_SIZE):
    rows = jnp.asarray(inception.bilinear_matrix(images.shape[1], size))
    cols = jnp.asarray(inception.bilinear_matrix(images.shape[2], size))
    x = jnp.einsum("oh,bhwc->bowc", rows, images)
    return jnp.einsum("pw,bowc->bopc", cols, x)


@contextlib.contextmanager
def literal_forms():
    """Swaps the library's rewritten forms for the literal ones while a program is traced."""
    saved = (inception.max_pool, inception.avg_pool_3x3_exclude_pad, inception.resize_bilinear,
             inception.BasicConv2d.plain, upsampled_conv.folds)
    inception.max_pool, inception.avg_pool_3x3_exclude_pad = literal_max_pool, literal_avg_pool
    inception.resize_bilinear = literal_resize
    inception.BasicConv2d.plain = property(lambda self: False)
    upsampled_conv.folds = lambda *args, **kwargs: False
    try:
        yield
    finally:
        (inception.max_pool, inception.avg_pool_3x3_exclude_pad, inception.resize_bilinear,
         inception.BasicConv2d.plain, upsampled_conv.folds) = saved


def _compile(fn, args):
    return jax.jit(fn, compiler_options=COMPILER_OPTIONS).lower(*args).compile()


def pools():
    """The 13 pools of a 32-image Inception batch, on random inputs of their shapes."""
    shapes = [((32, 147, 147, 64), 3, 2, 0), ((32, 71, 71, 192), 3, 2, 0), ((32, 35, 35, 288), 3, 2, 0),
              ((32, 17, 17, 768), 3, 2, 0), ((32, 8, 8, 2048), 3, 1, 1)]
    avg = [(32, 35, 35, 192), (32, 35, 35, 256), (32, 35, 35, 288)] + [(32, 17, 17, 768)] * 4 + [(32, 8, 8, 1280)]
    key = jax.random.key(3)
    max_inputs = [(jax.random.normal(key, s), w, st, p) for s, w, st, p in shapes]
    avg_inputs = [jax.random.normal(key, s) for s in avg]

    def run(args):
        maxes, avgs = args
        return ([inception.max_pool(x, w, st, p) for x, (_, w, st, p) in zip(maxes, shapes)],
                [inception.avg_pool_3x3_exclude_pad(x) for x in avgs])
    return run, (([x for x, *_ in max_inputs], avg_inputs),)


def workloads():
    key = jax.random.key(0)
    x_up = jax.random.normal(key, (2, 128, 128, 160))
    kernel = jax.random.normal(jax.random.key(1), (3, 3, 160, 160)) * 0.02
    from bitlaws.quant.seam import qconv  # pylint: disable=g-import-not-at-top
    vae, _, _, vq_ctor = random_var(16)
    vae_def, vae_state = nnx.split(vae)
    f_hat = jax.random.normal(jax.random.key(2), (2, 16, 16, vq_ctor["z_channels"]))
    net = random_fid_inception(0, include_fc=False)
    inc_def, inc_state = nnx.split(net)
    images = jax.random.uniform(jax.random.key(4), (32, 256, 256, 3))
    pool_fn, pool_args = pools()
    return {
        "upsample conv 2x128x128x160": (lambda x, k: qconv(x, k, padding=((1, 1), (1, 1)), upsample=2),
                                        (x_up, kernel)),
        "VQVAE decode, 2 images": (lambda s, f: nnx.merge(vae_def, s).fhat_to_img(f), (vae_state, f_hat)),
        "Inception pools, 32 images": (pool_fn, pool_args),
        "Inception resize, 32 images": (lambda x: inception.resize_bilinear(x), (images,)),
        "Inception features, 32 images": (lambda s, x: nnx.merge(inc_def, s).features(x), (inc_state, images)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"# {os.cpu_count()} cores, jax {jax.__version__} on {jax.devices()[0].device_kind}, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"{'workload':32s} {'literal min/median s':>22s} {'library min/median s':>22s} {'speed-up':>9s} "
          f"{'max rel diff':>12s}")
    for name, (fn, fn_args) in workloads().items():
        library = _compile(fn, fn_args)
        with literal_forms():
            literal = _compile(lambda *a, fn=fn: fn(*a), fn_args)  # a new function: no trace-cache hit
        diff = ab.max_rel_diff(literal(*fn_args), library(*fn_args))
        times = ab.interleaved({"literal": literal, "library": library}, fn_args, args.repeats)
        lit, lib = (np.array(times[k]) for k in ("literal", "library"))
        print(f"{name:32s} {lit.min():10.3f} / {np.median(lit):9.3f} {lib.min():10.3f} / {np.median(lib):9.3f} "
              f"{np.median(lit) / np.median(lib):8.2f}x {diff:12.1e}", flush=True)


if __name__ == "__main__":
    main()
