"""Peak memory of quantizing a released-size model: random-weight VAR-d30 (2.0B parameters) to packed W4A16.

Goal ([6/12]): quantizing must not hold more than one extra copy of the float weights; the peak resident
memory while `quantize_model(..., mode="packed")` runs should stay within 1.5x the float32 model's bytes.
A sampler thread reads ``VmRSS`` from ``/proc/self/status`` every 20 ms, so the peak of each phase (build,
quantize) is measured separately. Printed: parameter count, float32 bytes, RSS before / peak during each
phase, and the ratios peak / float bytes.

Usage::

    python benchmarks/quantize_memory.py                 # VAR-d30, int4 g128 weights on every block linear
    python benchmarks/quantize_memory.py --depth 16      # VAR-d16 (310M), quicker
"""

from __future__ import annotations

import argparse
import math
import platform
import threading
import time

import jax
from flax import nnx

from bitlaws import configlib
from bitlaws.models.common import random_model
from bitlaws.models.var import VAR, var_ctor_kwargs
from bitlaws.port.convert import REPO_CONFIGS, model_ctor
from bitlaws.quant import QuantRule, QuantSpec, bit_accounting, quantize_model

GIB = 2.0**30


def rss_bytes() -> int:
    """Resident set size of this process, from /proc (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class PeakRss:
    """Context manager sampling the RSS every `interval` seconds; ``.peak`` and ``.start`` in bytes."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.peak, self.start = interval, 0, 0
        self._stop = threading.Event()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self):
        self.start = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=30, choices=(16, 20, 24, 30))
    parser.add_argument("--format", default="int4")
    parser.add_argument("--group-size", type=int, default=128)
    args = parser.parse_args()

    config = configlib.load_config(str(REPO_CONFIGS / f"var_d{args.depth}.py"))
    ctor = var_ctor_kwargs(model_ctor(config.var), model_ctor(config.vqvae))
    print(f"host: {platform.node()} ({platform.processor() or platform.machine()}), jax {jax.__version__}, "
          f"devices {jax.devices()}")
    with PeakRss() as build:
        model = random_model(lambda: VAR(**ctor, rngs=nnx.Rngs(0)))
    params = sum(math.prod(v.get_value().shape) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    float_bytes = 4 * params
    rules = [QuantRule(module_path=r"blocks\.\d+\.(attn|ffn)\..*",
                       weight=QuantSpec(format=args.format, granularity="group", group_size=args.group_size))]
    start = time.perf_counter()
    with PeakRss() as quant:
        qmodel = quantize_model(model, rules, mode="packed")
        jax.block_until_ready(jax.tree.leaves(nnx.state(qmodel)))
    quant_s = time.perf_counter() - start
    report = bit_accounting(qmodel)
    print(f"VAR-d{args.depth}: {params / 1e9:.3f}B parameters, float32 {float_bytes / GIB:.2f} GiB; "
          f"packed W{args.format[-1]}A16 g{args.group_size} storage {report.storage_bytes / GIB:.2f} GiB")
    print(f"build:    RSS {build.start / GIB:.2f} -> peak {build.peak / GIB:.2f} GiB")
    print(f"quantize: RSS {quant.start / GIB:.2f} -> peak {quant.peak / GIB:.2f} GiB in {quant_s:.1f} s")
    print(f"peak during quantize / float32 model bytes = {quant.peak / float_bytes:.3f} (goal <= 1.5); "
          f"extra over the float model = {(quant.peak - quant.start) / float_bytes:.3f}x its bytes")


if __name__ == "__main__":
    main()
