"""Side-by-side timing shared by the A/B benchmarks (`conv_forms.py`, `xla_options_ab.py`).

Variants of one workload run interleaved in one process - alternating their order every repeat - so host noise
hits them alike; a ratio between two variants is only meaningful when measured this way.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp


def timed(fn: Callable, args: Sequence[Any]) -> float:
    """Seconds of one ``fn(*args)`` call, waiting for its results."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def interleaved(variants: Mapping[str, Callable], args: Sequence[Any], repeats: int) -> dict[str, list[float]]:
    """``{label: [seconds per call]}``: every variant called `repeats` times, in alternating order."""
    labels = list(variants)
    times = {label: [] for label in labels}
    for r in range(repeats):
        for label in (labels if r % 2 == 0 else labels[::-1]):
            times[label].append(timed(variants[label], args))
    return times


def max_rel_diff(a: Any, b: Any) -> float:
    """Largest ``|a - b| / max |a|`` over the leaves of two pytrees of arrays."""
    return max(float(jnp.max(jnp.abs(x - y)) / jnp.maximum(jnp.max(jnp.abs(x)), 1e-30))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
