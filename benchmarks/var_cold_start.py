"""The VAR sampler's cold start: first call against a steady call, compiling ahead (concurrently) or not.

Each setting runs in a fresh Python process with the persistent compilation cache off (``BITLAWS_COMPILATION_CACHE
=0``), so the first call compiles everything; the process then makes one more call (steady state). Settings run
one after the other, alternating over ``--rounds``. Prints per setting the first call, the steady call and their
difference (the issue's goal: VAR-d16's first call at most 10 s more than a steady one), and the first call's
compile work from `jax.monitoring` (XLA compilations, tracing and lowering seconds, summed over threads: less noisy
than the difference, which on 2 cores is roughly half of it).

Usage::

    python benchmarks/var_cold_start.py              # VAR-d16, batch 8, top-k 900, top-p 0.96, 1 round
    python benchmarks/var_cold_start.py --tiny --rounds 2
    PYTHONPATH=/path/to/other/checkout python benchmarks/var_cold_start.py   # another version's sampler
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CHILD = r"""
import collections, json, sys, time
sys.path[:] = [{bench!r}] + [p for p in sys.path if p not in ("", ".")]  # bitlaws: PYTHONPATH or the installed one
import jax, jax.numpy as jnp
work = collections.Counter()
def listen(event, seconds, **kwargs):
    work[event.rsplit("/", 1)[-1]] += seconds
    work[event.rsplit("/", 1)[-1] + "_count"] += 1
jax.monitoring.register_event_duration_secs_listener(listen)
from vs_official import random_var
from bitlaws.sample.var_sampler import autoregressive_infer_cfg
vae, var, _, _ = random_var({depth}, {tiny})
top_k = {top_k}
def call(seed):
    start = time.perf_counter()
    jax.block_until_ready(autoregressive_infer_cfg(var, vae, B={batch}, label_B=jnp.arange({batch}) % var.num_classes,
                                                   key=jax.random.key(seed), cfg=1.5, top_k=top_k, top_p=0.96,
                                                   compile_ahead={ahead}))
    return time.perf_counter() - start
work.clear()
first = call(0)
compile_work = dict(work)
print(json.dumps({{"first": first, "steady": call(1), "work": compile_work}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depth", type=int, default=16, choices=(16, 20, 24, 30))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    bench = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, BITLAWS_COMPILATION_CACHE="0")
    results = {True: [], False: []}
    for r in range(args.rounds):
        for ahead in ((True, False) if r % 2 == 0 else (False, True)):
            code = CHILD.format(bench=bench, depth=args.depth, tiny=args.tiny, batch=args.batch, ahead=ahead,
                                top_k=32 if args.tiny else 900)
            start = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            result["process"] = time.perf_counter() - start
            results[ahead].append(result)
            work = result["work"]
            print(f"compile_ahead={ahead}: first {result['first']:.1f} s, steady {result['steady']:.1f} s, "
                  f"first - steady {result['first'] - result['steady']:.1f} s (process {result['process']:.1f} s, "
                  f"load {os.getloadavg()[0]:.2f}); the first call's compile work: "
                  f"{work.get('backend_compile_duration_count', 0)} XLA compilations "
                  f"{work.get('backend_compile_duration', 0.0):.1f} s, tracing "
                  f"{work.get('jaxpr_trace_duration', 0.0):.1f} s, lowering "
                  f"{work.get('jaxpr_to_mlir_module_duration', 0.0):.1f} s", flush=True)
    print(f"\n# VAR-d{args.depth}{' (tiny)' if args.tiny else ''} cold start, batch {args.batch}, {os.cpu_count()} cores")
    for ahead, runs in results.items():
        best = min(runs, key=lambda x: x["first"] - x["steady"])
        print(f"compile_ahead={ahead}: first {best['first']:.1f} s, steady {best['steady']:.1f} s, "
              f"first - steady {best['first'] - best['steady']:.1f} s")


if __name__ == "__main__":
    main()
