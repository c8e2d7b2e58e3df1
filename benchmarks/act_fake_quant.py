"""Speed of fake-quantizing per-token activations: the seam's path against the earlier formulation, side by side.

A weight-activation cell of the demo sweep (W8A8, W4A8) fake-quantizes the input of every quantized linear with
one scale per token, ``qarray.fake_quant(x, spec, reduce_axes=(-1,))``. Two formulations, compiled and timed
interleaved in one process on the same input:

* ``view + arithmetic STE`` (before 2026-12-01): the activation transposed to its ``[K, N]`` reduction view and
  back, and the straight-through value ``where(inside, x + (x_hat - x), x_hat)``;
* ``bitlaws`` (now): the per-token statistics on ``[N, K, 1]`` in place (`qarray._quantize_dequantize_rows`) and a
  `jax.custom_jvp` straight-through that returns ``x_hat`` itself (the mask is only computed when differentiated).

Both give the same values (checked here: equal as numbers; the new one can return -0.0 where the old one gave
+0.0) and the same gradients.

Usage::

    python benchmarks/act_fake_quant.py                       # dit-d5's shapes at 1000 rows (the demo's DiT cells)
    python benchmarks/act_fake_quant.py --shape 1000 16 96 --repeats 50
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from bitlaws.quant import QuantSpec, qarray

FORMATS = ("int8", "fp8_e4m3")


def view_arithmetic_ste(spec: QuantSpec):
    """The earlier formulation (the reference of this benchmark)."""

    def fake_quant(x):
        x_hat, inside = qarray._quantize_dequantize_view(jax.lax.stop_gradient(x), spec, (x.ndim - 1,))
        return jnp.where(inside, x + jax.lax.stop_gradient(x_hat - x), jax.lax.stop_gradient(x_hat))

    return jax.jit(fake_quant)


def current(spec: QuantSpec):
    return jax.jit(lambda x: qarray.fake_quant(x, spec, reduce_axes=(-1,)))


def timed(fn, x, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x).block_until_ready()
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs="+", default=[1000, 16, 384], help="activation shape [..., K]")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    x = jnp.asarray(np.random.default_rng(0).standard_normal(args.shape).astype(np.float32))
    print(f"activation {tuple(args.shape)} float32, per-token scales, {jax.devices()[0].device_kind}, "
          f"load average {os.getloadavg()[0]:.2f}")
    print("| format | view + arithmetic STE: median (min) ms | bitlaws: median (min) ms | ratio of medians |")
    print("|---|---|---|---|")
    for name in FORMATS:
        spec = QuantSpec(format=name, granularity="token", scale_dtype="float32")
        old, new = view_arithmetic_ste(spec), current(spec)
        a, b = np.asarray(old(x)), np.asarray(new(x))
        assert np.array_equal(a, b), f"{name}: values differ"
        loss = lambda f: jax.grad(lambda v: jnp.sum(f(v) * v))  # noqa: E731
        assert np.array_equal(np.asarray(loss(old)(x)), np.asarray(loss(new)(x))), f"{name}: gradients differ"
        times = {"old": [], "new": []}
        for _ in range(args.repeats):  # interleaved, so both see the same machine state
            times["old"] += timed(old, x, 1)
            times["new"] += timed(new, x, 1)
        med = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
        low = {k: float(np.min(v)) * 1e3 for k, v in times.items()}
        print(f"| {name} | {med['old']:.2f} ({low['old']:.2f}) | {med['new']:.2f} ({low['new']:.2f}) | "
              f"{med['old'] / med['new']:.2f}x |")


if __name__ == "__main__":
    main()
