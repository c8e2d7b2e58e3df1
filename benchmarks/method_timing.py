"""Where a demo sweep member's method time goes: each cell's quantization method in sweep order, with XLA compile
time per program.

Runs, in one process and in the order a sweep worker would, the method (quantization, calibration, training) of
the given ``SETTING:METHOD`` cells of one member of a sweep config - no sampling, no scoring - and prints per cell
the method's wall time, the XLA compilation time inside it and the programs that compiled most. Later cells reuse
what earlier ones compiled, as in a sweep worker. Run it with ``BITLAWS_COMPILATION_CACHE=0`` unset or not, and in
a worktree of an older commit (``PYTHONPATH=<worktree>``) for a side-by-side comparison.

Usage::

    python benchmarks/method_timing.py configs/sweeps/demo_ptq.py dit-d4 W4A16:gptq W3A16:gptq W4A16:awq W3A16:awq
"""

from __future__ import annotations

import argparse
import logging
import time

import jax

import bitlaws.ptq  # noqa: F401  (registers the PTQ methods)
import bitlaws.qat  # noqa: F401  (registers the QAT methods)
from bitlaws import configlib
from bitlaws.demo import dit_family, family, var_family  # noqa: F401  (registers the families)
from bitlaws.quant import cached_calibration, calibrate_on
from bitlaws.sweep import settings
from bitlaws.sweep.grid import expand_grid
from cell_timing import CompileLog  # benchmarks/ is on sys.path when this script runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("model")
    parser.add_argument("cells", nargs="+", help="SETTING:METHOD, in the order to run them")
    parser.add_argument("--top", type=int, default=5, help="programs listed per cell")
    args = parser.parse_args()
    config = configlib.load_config(args.config)
    grid = {(c.setting, c.method): c for c in expand_grid(config) if c.model == args.model}
    wanted = [tuple(item.split(":", 1)) for item in args.cells]
    missing = [f"{s}:{m}" for s, m in wanted if (s, m) not in grid]
    if missing:
        parser.error(f"not cells of {args.model} in {args.config}: {', '.join(missing)}")
    options = settings.quant_options(config)
    member = family.load_member(args.model)
    calibration = config.demo.get("calibration", None)
    data = family.calibration_data(member, calibration.to_dict() if hasattr(calibration, "to_dict") else calibration)
    calibrate = cached_calibration(calibrate_on(data))
    jax.config.update("jax_log_compiles", True)
    for setting, method in wanted:
        cell = grid[setting, method]
        handler = CompileLog()
        logging.getLogger("jax").addHandler(handler)
        context = settings.MethodContext(params=cell.params, calibrate=calibrate, data=data, seed=cell.prng_seed,
                                         materialize=settings.materialize_for(config, cell.setting))
        start = time.perf_counter()
        settings.quantize_for_cell(member.model, cell.rules(member.quant_pattern, **options), method, context)
        seconds = time.perf_counter() - start
        logging.getLogger("jax").removeHandler(handler)
        print(f"{setting} {method}: method {seconds:.1f} s, compile {sum(handler.seconds.values()):.1f} s in "
              f"{sum(handler.count.values())} programs", flush=True)
        for name, total in handler.seconds.most_common(args.top):
            print(f"    {name}: {total:.2f} s / {handler.count[name]}")


if __name__ == "__main__":
    main()
