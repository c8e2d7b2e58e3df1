"""Compile time of `jax.random` draws against `bitlaws.sample.draws` (same values, drawn flat), side by side.

Usage::

    python benchmarks/draws_compile.py
"""

from __future__ import annotations

import time

import jax
import numpy as np

from bitlaws.sample import draws

CASES = (("gumbel", (500, 64, 64), jax.random.gumbel, draws.gumbel),
         ("normal", (500, 16, 16, 3), jax.random.normal, draws.normal))


def _compile_seconds(fn, key) -> float:
    start = time.perf_counter()
    jax.jit(fn).lower(key).compile()
    return time.perf_counter() - start


def main() -> None:
    key = jax.random.key(0)
    for name, shape, theirs, ours in CASES:
        same = np.array_equal(np.asarray(theirs(key, shape)), np.asarray(ours(key, shape)))
        a = _compile_seconds(lambda k: theirs(k, shape), key)
        b = _compile_seconds(lambda k: ours(k, shape), key)
        print(f"{name} {shape}: jax.random {a:.2f} s, draws {b:.2f} s, ratio {a / b:.1f}x, identical values {same}")


if __name__ == "__main__":
    main()
