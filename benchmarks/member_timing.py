"""All demo cells of one member in one process (as a sweep worker runs them), with compile time per program.

Runs ``bitlaws sweep`` restricted to one model, in this process, with the persistent compilation cache in the
(fresh) output folder, and prints the member's total, the XLA compile seconds per program name and each cell's
``wall_s``. Pin it to one core (``taskset -c 0``) to mimic one of two sweep workers.

Usage::

    taskset -c 0 python benchmarks/member_timing.py var-d1 /tmp/member_var-d1
    python benchmarks/member_timing.py dit-d5 /tmp/member_dit-d5 --config configs/sweeps/demo.py
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import shutil
import time

import jax

from bitlaws import configlib
from bitlaws.sweep import runner
from cell_timing import CompileLog  # benchmarks/ is on sys.path when this script runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("out", help="output folder (deleted first)")
    parser.add_argument("--config", default="configs/sweeps/demo.py")
    args = parser.parse_args()
    jax.config.update("jax_log_compiles", True)
    handler = CompileLog()
    logging.getLogger("jax").addHandler(handler)
    config = configlib.load_config(args.config)
    config.models = (args.model,)
    config.compilation_cache = True
    shutil.rmtree(args.out, ignore_errors=True)
    start = time.perf_counter()
    summary = runner.run_sweep(config, args.out, progress=False, log=lambda message: None)
    print(f"{args.model}: {summary.total} cells in {time.perf_counter() - start:.1f} s")
    for name, seconds in handler.seconds.most_common(10):
        print(f"  {name}: {seconds:.1f} s in {handler.count[name]} compilations")
    for line in (pathlib.Path(args.out) / runner.RESULTS_NAME).read_text().splitlines():
        record = json.loads(line)
        print(f"    {record['key']}: {record['wall_s']:.1f} s")


if __name__ == "__main__":
    main()
