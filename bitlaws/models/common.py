"""Building blocks shared by several models."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class GroupNorm(nnx.Module):
    """GroupNorm over NHWC inputs with per-channel affine ``scale`` / ``bias`` (PyTorch ``nn.GroupNorm``).

    Statistics are computed the direct way in float32 (mean, then mean of squared deviations: PyTorch's
    biased variance), which is what parity with the upstream models needs.

    Args:
        channels: C; must be divisible by `num_groups`.
        num_groups: G.
        eps: Added to the variance.
    """

    def __init__(self, channels: int, *, num_groups: int = 32, eps: float = 1e-6):
        if channels % num_groups:
            raise ValueError(f"GroupNorm: {num_groups} groups do not divide {channels} channels")
        self.num_groups = num_groups
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((channels,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, H, W, C] -> [B, H, W, C]`` (same dtype)."""
        b, h, w, c = x.shape
        grouped = x.astype(jnp.float32).reshape(b, h, w, self.num_groups, c // self.num_groups)
        mean = grouped.mean(axis=(1, 2, 4), keepdims=True)  # [B, 1, 1, G, 1]
        var = jnp.square(grouped - mean).mean(axis=(1, 2, 4), keepdims=True)
        normed = ((grouped - mean) * jax.lax.rsqrt(var + self.eps)).reshape(b, h, w, c)
        return (normed * self.scale[...] + self.bias[...]).astype(x.dtype)


def layer_norm(x: jax.Array, eps: float) -> jax.Array:
    """LayerNorm over the last axis without affine parameters (biased variance), ``[..., C] -> [..., C]``."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    centered = x - mean
    var = jnp.mean(centered * centered, axis=-1, keepdims=True)
    return centered * jax.lax.rsqrt(var + eps)


def random_model(make_model, seed: int = 0):
    """Builds ``make_model()`` abstractly and fills every state leaf with numpy-drawn random values.

    Each leaf of shape ``(d0, ...)`` gets ``N(0, 1) / sqrt(d0)`` in float32. This avoids eager random
    initialisation, which compiles one XLA kernel per parameter shape and is slow on CPU; benchmarks and
    tests of random-weight models (real sizes included) use it.

    Args:
        make_model: Zero-argument model constructor.
        seed: numpy seed.

    Returns:
        The concrete model.
    """
    graphdef, state = nnx.split(nnx.eval_shape(make_model))
    rng = np.random.default_rng(seed)
    for _, var in nnx.to_flat_state(state):
        abstract = var.get_value()
        shape = abstract.shape
        value = rng.standard_normal(shape, dtype=np.float32) / np.float32(np.sqrt(max(shape[0], 1) if shape else 1))
        var.set_value(jnp.asarray(value, abstract.dtype))
    return nnx.merge(graphdef, state)
