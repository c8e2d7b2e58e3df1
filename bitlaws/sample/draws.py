"""Random draws for samplers: the values of `jax.random`'s, drawn as one flat vector (faster to compile).

With JAX's partitionable threefry (the default), element ``i`` of a draw depends only on the key and its flat
index ``i``, so ``normal(key, (n,)).reshape(shape)`` equals ``normal(key, shape)`` bit for bit. XLA:CPU
compiles the flat draw about 3.5x faster than the multi-dimensional one (`python benchmarks/draws_compile.py`
on the idle 2-core CPU: Gumbel noise ``[500, 64, 64]`` 0.34 s against 1.18 s, a normal ``[500, 16, 16, 3]`` 0.40 s
against 1.34 s), and sampling small models is mostly compilation. The tests check the equality
against `jax.random`, so a JAX release that changes the layout is caught.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp


def _flat(draw, key: jax.Array, shape: Sequence[int], dtype) -> jax.Array:
    shape = tuple(int(d) for d in shape)
    if not jax.config.jax_threefry_partitionable:  # the other layout depends on the shape: draw it as asked
        return draw(key, shape, dtype)
    return draw(key, (math.prod(shape),), dtype).reshape(shape)


def normal(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
    """``jax.random.normal(key, shape, dtype)``, bit for bit."""
    return _flat(jax.random.normal, key, shape, dtype)


def gumbel(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
    """``jax.random.gumbel(key, shape, dtype)``, bit for bit."""
    return _flat(jax.random.gumbel, key, shape, dtype)


def categorical(key: jax.Array, logits: jax.Array) -> jax.Array:
    """``jax.random.categorical(key, logits, axis=-1)`` as int32, bit for bit (the same Gumbel-max draw).

    Args:
        key: PRNG key.
        logits: ``[..., V]`` float (``-inf``: never drawn).

    Returns:
        ``[...]`` int32 indices.
    """
    return jnp.argmax(gumbel(key, logits.shape, logits.dtype) + logits, axis=-1).astype(jnp.int32)
