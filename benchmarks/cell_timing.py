"""Where the time of a demo sweep cell goes: method, first sampler call (compilation), steady call, metric.

Runs the cells of one (model, setting) of a sweep config in one process, in grid order (so later cells reuse
what earlier ones compiled, as in a sweep worker), and prints per cell: the method's time (quantization,
calibration, training), the first sampling call (mostly XLA compilation of a new sampler program), a second
identical call (the steady state), the DFD scoring, and the DFD. ``--log-compiles`` adds JAX's per-program
compile times, summed per program name.

Usage::

    python benchmarks/cell_timing.py configs/sweeps/demo.py var-d1 W4A16 rtn
    python benchmarks/cell_timing.py configs/sweeps/demo_ptq.py var-d4 W4A8 rtn omniquant smoothquant
"""

from __future__ import annotations

import argparse
import collections
import logging
import re
import time

import jax
import numpy as np

import bitlaws.ptq  # noqa: F401  (registers the PTQ methods)
import bitlaws.qat  # noqa: F401  (registers the QAT methods)
from bitlaws import configlib
from bitlaws.demo import dit_family, family, metric, var_family  # noqa: F401  (registers the families)
from bitlaws.quant import cached_calibration, calibrate_on
from bitlaws.sweep import settings
from bitlaws.sweep.grid import expand_grid


class CompileLog(logging.Handler):
    """Sums JAX's compile-time log lines per program name (``jax_log_compiles`` on)."""

    pattern = re.compile(r"Finished XLA compilation of (\S+) in ([0-9.e-]+) sec")

    def __init__(self):
        super().__init__()
        self.seconds, self.count = collections.Counter(), collections.Counter()

    def emit(self, record):
        match = self.pattern.search(record.getMessage())
        if match:
            self.seconds[match.group(1)] += float(match.group(2))
            self.count[match.group(1)] += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("model")
    parser.add_argument("setting")
    parser.add_argument("methods", nargs="+")
    parser.add_argument("--log-compiles", action="store_true")
    args = parser.parse_args()
    handler = None
    if args.log_compiles:
        jax.config.update("jax_log_compiles", True)
        handler = CompileLog()
        logging.getLogger("jax").addHandler(handler)
    config = configlib.load_config(args.config)
    cells = [c for c in expand_grid(config) if c.model == args.model and c.setting == args.setting
             and c.method in args.methods]
    options = settings.quant_options(config)
    calibration = config.demo.get("calibration", None)
    calibration = calibration.to_dict() if hasattr(calibration, "to_dict") else calibration
    start = time.perf_counter()
    member = family.load_member(args.model)
    print(f"device {jax.devices()[0].device_kind}; load {time.perf_counter() - start:.1f} s")
    data = calibrate = None
    labels = np.repeat(np.arange(10, dtype=np.int32), int(config.demo.n_per_class))
    for cell in cells:
        rules = cell.rules(member.quant_pattern, **options)
        method = settings.get_method(cell.method)
        if data is None and rules and (method.needs_data or any(r.act is not None and r.act.static for r in rules)):
            start = time.perf_counter()
            data = family.calibration_data(member, calibration)
            calibrate = cached_calibration(calibrate_on(data))
            print(f"calibration data {time.perf_counter() - start:.1f} s")
        start = time.perf_counter()
        context = settings.MethodContext(params=cell.params, calibrate=calibrate, data=data, seed=cell.prng_seed,
                                         materialize=settings.materialize_for(config, cell.setting))
        model = settings.quantize_for_cell(member.model, rules, cell.method, context)
        method_s = time.perf_counter() - start
        calls = []
        for _ in range(2):
            start = time.perf_counter()
            images = np.clip(np.asarray(member.sample(model, labels, jax.random.key(cell.model_seed))), -1, 1)
            calls.append(time.perf_counter() - start)
        start = time.perf_counter()
        scores = metric.evaluate_samples(images, labels, reference_split="all")
        print(f"{cell.key}: method {method_s:.1f} s, first sample call {calls[0]:.1f} s, steady {calls[1]:.1f} s, "
              f"metric {time.perf_counter() - start:.1f} s, DFD {float(scores['dfd']):.4f}", flush=True)
    if handler is not None:
        print("compile seconds per program:")
        for name, seconds in handler.seconds.most_common(12):
            print(f"  {name}: {seconds:.1f} s in {handler.count[name]} compilations")


if __name__ == "__main__":
    main()
