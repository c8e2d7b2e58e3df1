"""Which interval describes the seed-to-seed spread of an FID: the jackknife's or the bootstrap's.

On Gaussian "features" of a chosen size (default the demo's: d = 64, N = 500), draws `--sets` independent sample
sets from one distribution, computes the Frechet distance of each to fixed reference statistics, and compares
their real spread (standard deviation over the sets) with, on the first `--checked` sets:

* the delete-a-group jackknife standard error of `bitlaws.eval.intervals` (what the demo records), and
* a plain nonparametric bootstrap (`--boot` resamples with replacement; written here, it is not in the library):
  its standard deviation and how far its resamples sit above the estimate.

Usage::

    python benchmarks/frechet_intervals.py                       # d = 64, N = 500, three distances
    python benchmarks/frechet_intervals.py --dim 16 --n 300
"""

from __future__ import annotations

import argparse

import numpy as np

from bitlaws.eval import intervals
from bitlaws.eval.frechet import frechet_distance


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--sets", type=int, default=40)
    parser.add_argument("--checked", type=int, default=6)
    parser.add_argument("--boot", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    d, n = args.dim, args.n
    mix = rng.standard_normal((d, d)) / np.sqrt(d) + np.eye(d)
    ref = rng.standard_normal((20000, d)) @ mix
    mu, sigma = ref.mean(axis=0), np.cov(ref, rowvar=False)
    reference = intervals.FrechetReference.from_stats(mu, sigma)
    print(f"d = {d}, N = {n}, {args.sets} sets; jackknife and bootstrap on the first {args.checked}")
    print("| sample scale | mean FID | seed-to-seed std | jackknife se | bootstrap std | bootstrap mean - estimate |")
    print("|---:|---:|---:|---:|---:|---:|")
    for scale in (1.0, 1.1, 1.3):
        sets = [rng.standard_normal((n, d)) @ (scale * mix) + 0.05 for _ in range(args.sets)]
        fids = np.array([frechet_distance(s.mean(axis=0), np.cov(s, rowvar=False), mu, sigma) for s in sets])
        se = [intervals.frechet_interval(s, mu, sigma, reference=reference).se for s in sets[:args.checked]]
        boot_std, boot_shift = [], []
        for s, fid in zip(sets[:args.checked], fids):
            rows = rng.integers(0, n, size=(args.boot, n))
            values = np.array([reference.distance(s[r].mean(axis=0), np.cov(s[r], rowvar=False)) for r in rows])
            boot_std.append(values.std(ddof=1))
            boot_shift.append(values.mean() - fid)
        print(f"| {scale} | {fids.mean():.3f} | {fids.std(ddof=1):.3f} | {np.median(se):.3f} | "
              f"{np.median(boot_std):.3f} | {np.median(boot_shift):+.3f} |", flush=True)


if __name__ == "__main__":
    main()
