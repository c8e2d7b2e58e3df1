"""VAR's token filtering (top-k then top-p), release protocol: the bitwise threshold search vs the two-sort reference.

For every scale of VAR-d16 at batch 8 (guided logits ``[8, pn*pn, 4096]``, top-k 900, top-p 0.96) it times the
jitted `mask_top_k_top_p` and `mask_top_k_top_p_reference` side by side (interleaved, steady state: after one
compiling call), prints min / median per scale and the ratio, and checks that both keep the same tokens.

Usage::

    python benchmarks/top_k_top_p.py [--batch 8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import numpy as np

from bitlaws.sample.filtering import mask_top_k_top_p, mask_top_k_top_p_reference

PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # VAR-d16..d30 at 256x256
VOCAB, TOP_K, TOP_P = 4096, 900, 0.96


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    functions = {"bitwise": jax.jit(lambda x: mask_top_k_top_p(x, TOP_K, TOP_P)),
                 "reference": jax.jit(lambda x: mask_top_k_top_p_reference(x, TOP_K, TOP_P))}
    rng = np.random.default_rng(0)
    print(f"{jax.devices()[0].device_kind}, load average {os.getloadavg()[0]:.2f}; batch {args.batch}, V {VOCAB}, "
          f"top-k {TOP_K}, top-p {TOP_P}; seconds (min / median of {args.repeats})")
    totals = {name: 0.0 for name in functions}
    for pn in PATCH_NUMS:
        logits = jax.device_put(rng.normal(size=(args.batch, pn * pn, VOCAB)).astype(np.float32) * 3.0)
        outs = {name: np.isfinite(np.asarray(f(logits))) for name, f in functions.items()}  # compile + check
        same = np.array_equal(outs["bitwise"], outs["reference"])
        times = {name: [] for name in functions}
        for _ in range(args.repeats):
            for name, f in functions.items():
                start = time.perf_counter()
                f(logits).block_until_ready()
                times[name].append(time.perf_counter() - start)
        medians = {name: statistics.median(t) for name, t in times.items()}
        for name in functions:
            totals[name] += medians[name]
        print(f"{pn:>2}x{pn:<2} " + "  ".join(f"{name} {min(t):.4f} / {medians[name]:.4f}" for name, t in times.items())
              + f"  reference / bitwise {medians['reference'] / medians['bitwise']:.2f}x  same tokens kept: {same}")
    print(f"all scales: bitwise {totals['bitwise']:.3f} s, reference {totals['reference']:.3f} s, "
          f"ratio {totals['reference'] / totals['bitwise']:.2f}x")


if __name__ == "__main__":
    main()
