"""Packed low-bit matmuls against a bf16 ``jnp.dot`` on the same device, in one run.

For M in {1, 16, 256, 4096} and the shapes N = K = 4096 and the VAR-d16 / DiT-XL/2 block layers, each format
(W4A16 g128, W3A16 g128, W8A16, fp8 E4M3, MXFP4 weight-only; W8A8 int8 x int8) runs through
`pallas_kernels.matmul` (backend ``pallas``: the Triton kernels on a GPU, the ``xla`` computation - dequantize
then dot - anywhere else) and is timed against ``jnp.dot`` of bf16 operands. Printed per row: median ms of
both, the speedup, and the memory-bound limit ``16 / stored bits per weight`` (scales included).

Goals ([8/12], on a GPU): W4A16 >= 3.5x bf16 at M <= 16 (limit 3.88x at group 128), W8A8 >= 1.6x at M = 4096.
On a CPU host the ``pallas`` backend lowers the XLA fallback, so the table measures that, not the kernels.

Usage::

    python benchmarks/matmul.py                      # every shape and format (long on a CPU)
    python benchmarks/matmul.py --m 1 16 --shapes square --formats w4a16 w8a8
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels
from bitlaws.quant import QuantSpec, backends
from bitlaws.quant.qarray import quantize
from pallas_kernels import common

SHAPES = {  # name -> [(K, N), ...]
    "square": [(4096, 4096)],
    "var-d16": [(1024, 3072), (1024, 1024), (1024, 4096), (4096, 1024), (1024, 6144)],  # qkv, proj, fc1, fc2, ada
    "dit-xl2": [(1152, 3456), (1152, 1152), (1152, 4608), (4608, 1152), (1152, 6912)],
}
INT8_TOKEN = QuantSpec(format="int8", granularity="token", scale_dtype="float32")
FORMATS = {  # name -> (weight spec, activation spec or None)
    "w4a16": (QuantSpec(format="int4", granularity="group", group_size=128), None),
    "w3a16": (QuantSpec(format="int3", granularity="group", group_size=128), None),
    "w8a16": (QuantSpec(format="int8"), None),
    "fp8": (QuantSpec(format="fp8_e4m3"), None),
    "mxfp4": (QuantSpec(format="mxfp4"), None),
    "w8a8": (QuantSpec(format="int8"), INT8_TOKEN),
}


def median_ms(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--m", type=int, nargs="+", default=[1, 16, 256, 4096])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({jax.default_backend()}); host {platform.processor() or platform.machine()}; "
          f"jax {jax.__version__}")
    if jax.default_backend() != "gpu":
        print("note: no GPU - the pallas backend lowers its XLA fallback here; these are not kernel timings")
    print(f"{'shape':>12} {'M':>5} {'format':>6} {'bf16 ms':>9} {'packed ms':>9} {'speedup':>8} {'limit':>6}")
    rng = np.random.default_rng(0)
    for shape_name in args.shapes:
        for k, n in SHAPES[shape_name]:
            w_float = jnp.asarray(rng.normal(size=(k, n)) * 0.02, jnp.float32)
            w_bf16 = w_float.astype(jnp.bfloat16)
            packed = {name: quantize(w_float, FORMATS[name][0]) for name in args.formats}
            for m in args.m:
                x = jnp.asarray(rng.normal(size=(m, k)), jnp.bfloat16)
                dense = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype))
                base = median_ms(dense, x, w_bf16, repeats=args.repeats)
                for name in args.formats:
                    act = backends.ActOperand(spec=FORMATS[name][1])
                    fn = jax.jit(lambda x, w, act=act: pallas_kernels.matmul(x, w, act=act))
                    ms = median_ms(fn, x, packed[name], repeats=args.repeats)
                    limit = common.memory_bound_speedup(common.bits_per_weight(packed[name]))
                    print(f"{shape_name + f' {k}x{n}':>12} {m:>5} {name:>6} {base:9.3f} {ms:9.3f} "
                          f"{base / ms:7.2f}x {limit:5.2f}x", flush=True)


if __name__ == "__main__":
    main()
