"""Sampling with `bitlaws.xla_options.COMPILER_OPTIONS` against XLA's default options, side by side.

Each (member, options) pair runs in its own process (the options are fixed at import), alternately, and prints
the first call (compilation included) and the median of the following calls, all pinned to the first CPU of
this process's affinity mask. 500 samples (50 per digit) as a demo sweep cell draws them.

Usage::

    python benchmarks/sampler_xla_options.py                 # var-d4 and dit-d5, 2 rounds
    python benchmarks/sampler_xla_options.py var-d1 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _measure(member: str, calls: int) -> dict:
    import jax  # pylint: disable=g-import-not-at-top  (imported after the environment is set)
    import numpy as np  # pylint: disable=g-import-not-at-top

    from bitlaws.demo import dit_family, family, var_family  # pylint: disable=g-import-not-at-top

    del dit_family, var_family  # imported to register the families

    loaded = family.load_member(member)
    labels = np.repeat(np.arange(10, dtype=np.int32), 50)
    times = []
    for _ in range(1 + calls):
        start = time.perf_counter()
        images = loaded.sample(loaded.model, labels, jax.random.key(0))
        times.append(time.perf_counter() - start)
    return {"first_s": times[0], "steady_s": statistics.median(times[1:]), "checksum": float(np.sum(images))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("members", nargs="*", default=["var-d4", "dit-d5"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--calls", type=int, default=3, help="timed calls after the first")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_measure(args.child, args.calls)))
        return
    cpu = sorted(os.sched_getaffinity(0))[0]
    results: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.rounds):
        for member in args.members:
            for label, defaults in (("bitlaws", "0"), ("xla-default", "1")):
                env = dict(os.environ, BITLAWS_XLA_DEFAULTS=defaults)
                out = subprocess.run(["taskset", "-c", str(cpu), sys.executable, __file__, "--child", member,
                                      "--calls", str(args.calls)], env=env, check=True, capture_output=True,
                                     text=True).stdout
                results.setdefault((member, label), []).append(json.loads(out.strip().splitlines()[-1]))
    print("| member | options | first call (s) | steady call (s) | checksum |")
    print("|---|---|---|---|---|")
    for (member, label), runs in results.items():
        first = statistics.median(r["first_s"] for r in runs)
        steady = statistics.median(r["steady_s"] for r in runs)
        print(f"| {member} | {label} | {first:.1f} | {steady:.2f} | {runs[0]['checksum']:.6g} |")
    for member in args.members:
        ours, default = results[(member, "bitlaws")], results[(member, "xla-default")]
        ratio = statistics.median(r["steady_s"] for r in default) / statistics.median(r["steady_s"] for r in ours)
        first = statistics.median(r["first_s"] for r in default) / statistics.median(r["first_s"] for r in ours)
        print(f"{member}: xla-default / bitlaws = {ratio:.2f}x steady, {first:.2f}x first call")


if __name__ == "__main__":
    main()
