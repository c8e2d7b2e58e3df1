"""Time to GPTQ-quantize one linear layer (jit, float32) on this machine, against round-to-nearest.

Builds a ``[in, out]`` kernel and ``tokens`` correlated calibration inputs ``x = z @ A`` (A = 0.5 I + a random
rank-64 mixing), the Hessian ``H = x^T x / tokens`` (timed separately), then times `gptq_core.quantize_weight`
and RTN (`qarray.quantize`, jitted): the first call (compile + run) and the best of `--repeats` later calls.
GPTVQ can be timed as well with ``--gptvq``.

Usage::

    python benchmarks/gptq_speed.py                     # 4096 x 4096, 4096 tokens, int4 g128
    python benchmarks/gptq_speed.py --quick             # 512 x 512, checks the script in seconds
    python benchmarks/gptq_speed.py --format int3 --group-size 0 --act-order --gptvq
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import jax.numpy as jnp

from bitlaws.ptq import gptq_core, gptvq_core
from bitlaws.quant import QuantSpec, qarray


def _timed(fn, repeats: int) -> tuple[float, float]:
    """(first call incl. compilation, best of `repeats` steady-state calls), in seconds."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return first, min(times)


def _layer(d_in: int, d_out: int, tokens: int, seed: int = 0):
    k1, k2, k3, k4 = jax.random.split(jax.random.key(seed), 4)
    w = jax.random.normal(k1, (d_in, d_out), jnp.float32) * 0.02
    rank = min(64, d_in)
    left = jax.random.normal(k2, (d_in, rank)) / jnp.sqrt(rank)
    right = jax.random.normal(k3, (rank, d_in))
    z = jax.random.normal(k4, (tokens, d_in))
    x = 0.5 * z + jnp.matmul(jnp.matmul(z, left), right)  # [tokens, in], correlated features
    return w, x


@jax.jit
def hessian_of(x: jax.Array) -> jax.Array:
    """Mean of x x^T over tokens, ``[in, in]`` float32."""
    return jnp.matmul(x.T, x, precision=jax.lax.Precision.HIGHEST) / x.shape[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--in", dest="d_in", type=int, default=4096)
    parser.add_argument("--out", dest="d_out", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--format", default="int4")
    parser.add_argument("--group-size", type=int, default=128, help="0: per-channel scales")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--act-order", action="store_true")
    parser.add_argument("--gptvq", action="store_true", help="also time GPTVQ (2D, 3 bits/dim, 256-row codebooks)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="512 x 512 layer, 512 tokens (checks the script)")
    args = parser.parse_args()
    if args.quick:
        args.d_in = args.d_out = args.tokens = 512
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device: {jax.devices()[0].device_kind} ({platform.processor() or 'cpu'}, {os.cpu_count()} cores, "
          f"load avg {load:.1f}), jax {jax.__version__}{'  [QUICK]' if args.quick else ''}")
    granularity = dict(granularity="group", group_size=args.group_size) if args.group_size else {}
    spec = QuantSpec(format=args.format, **granularity)
    w, x = _layer(args.d_in, args.d_out, args.tokens)
    jax.block_until_ready((w, x))
    h_first, h_steady = _timed(lambda: hessian_of(x), args.repeats)
    h = hessian_of(x)
    print(f"layer [{args.d_in}, {args.d_out}], {args.tokens} tokens, {spec.short()}, block {args.block_size}, "
          f"act_order={args.act_order}")
    print(f"  hessian x^T x / n : first {h_first:7.2f} s, steady {h_steady:7.2f} s")
    gptq = lambda: gptq_core.quantize_weight(w, h, spec, block_size=args.block_size,  # noqa: E731
                                             act_order=args.act_order)
    first, steady = _timed(gptq, args.repeats)
    print(f"  GPTQ              : first {first:7.2f} s (compile ~{first - steady:.2f} s), steady {steady:7.2f} s")
    rtn_jit = jax.jit(qarray.quantize, static_argnums=1)
    rtn_first, rtn_steady = _timed(lambda: rtn_jit(w, spec), args.repeats)
    print(f"  RTN               : first {rtn_first:7.2f} s, steady {rtn_steady:7.4f} s  "
          f"(GPTQ / RTN steady: {steady / rtn_steady:.0f}x)")
    if args.gptvq:
        vq = lambda: gptvq_core.quantize_weight(w, h, bits_per_dim=3, dim=2, group_size=256,  # noqa: E731
                                                block_size=args.block_size)
        vq_first, vq_steady = _timed(vq, args.repeats)
        print(f"  GPTVQ 2D b3 g256  : first {vq_first:7.2f} s, steady {vq_steady:7.2f} s")
    w_q = qarray.dequantize(gptq())
    w_r = qarray.dequantize(rtn_jit(w, spec))
    out = jnp.matmul(x, w)
    err = lambda v: float(jnp.sum(jnp.square(jnp.matmul(x, v) - out)) / jnp.sum(jnp.square(out)))  # noqa: E731
    print(f"  calibration-set ||X(Wq-W)||^2/||XW||^2: GPTQ {err(w_q):.5f}, RTN {err(w_r):.5f}")


if __name__ == "__main__":
    main()
