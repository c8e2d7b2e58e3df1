"""MAR's diffusion-loss head `SimpleMLPAdaLN` (LTH14/mar ``models/diffloss.py``) in Flax NNX.

A small MLP denoiser for one token at a time: ``x [N, C]`` (noisy token latent), original-scale timesteps
``t [N]`` and the transformer's conditioning ``c [N, D_z]`` -> ``[N, 2C]`` (eps, then the learned-range variance
values). ``y = time_embed(t) + cond_embed(c)`` modulates every residual block (adaLN: shift, scale, gate) and the
final layer (shift, scale; DiT's `FinalLayer`). The time embedding is DiT's: 256 sinusoidal features
``[cos | sin]`` of the original timestep, Linear-SiLU-Linear (`bitlaws.models.dit.TimestepEmbedder`).

Every linear layer is a `QLinear`, so the quantization rules of the transformer apply here unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from bitlaws.models.common import layer_norm
from bitlaws.models.dit import FinalLayer, TimestepEmbedder
from bitlaws.quant.layers import QLinear

NORM_EPS = 1e-6


class LayerNorm(nnx.Module):
    """PyTorch ``nn.LayerNorm`` over the last axis with affine ``scale`` / ``bias``: ``[..., D] -> [..., D]``."""

    def __init__(self, dim: int, *, eps: float = NORM_EPS):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        return layer_norm(x, self.eps) * self.scale[...] + self.bias[...]


def _modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """``x * (1 + scale) + shift``, all ``[N, W]``."""
    return x * (1 + scale) + shift


class ResBlock(nnx.Module):
    """``x + gate * mlp(modulate(in_ln(x), shift, scale))`` with ``(shift, scale, gate) = Linear(SiLU(y))``."""

    def __init__(self, width: int, *, rngs: nnx.Rngs):
        self.in_ln = LayerNorm(width)
        self.mlp_in = QLinear(width, width, rngs=rngs)
        self.mlp_out = QLinear(width, width, rngs=rngs)
        self.adaLN_modulation = QLinear(width, 3 * width, rngs=rngs)

    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        """``x [N, W]``, ``y [N, W]`` -> ``[N, W]``."""
        shift, scale, gate = jnp.split(self.adaLN_modulation(jax.nn.silu(y)), 3, axis=-1)
        h = _modulate(self.in_ln(x), shift, scale)
        return x + gate * self.mlp_out(jax.nn.silu(self.mlp_in(h)))


class SimpleMLPAdaLN(nnx.Module):
    """The diffusion-loss MLP (upstream argument names).

    Args:
        in_channels: Token channels C.
        model_channels: Width W.
        out_channels: Output channels (2C: eps and variance values).
        z_channels: Conditioning width (MAR's decoder width).
        num_res_blocks: Depth.
        rngs: NNX RNG streams for initialisation (ported weights overwrite everything).
    """

    def __init__(self, *, in_channels: int, model_channels: int, out_channels: int, z_channels: int,
                 num_res_blocks: int, rngs: nnx.Rngs):
        if out_channels < in_channels:
            raise ValueError(f"out_channels={out_channels} must hold the {in_channels} eps channels")
        self.in_channels = in_channels
        self.time_embed = TimestepEmbedder(model_channels, rngs=rngs)
        self.cond_embed = QLinear(z_channels, model_channels, rngs=rngs)
        self.input_proj = QLinear(in_channels, model_channels, rngs=rngs)
        self.res_blocks = nnx.List([ResBlock(model_channels, rngs=rngs) for _ in range(num_res_blocks)])
        self.final_layer = FinalLayer(model_channels, 1, out_channels, rngs=rngs)  # DiT's, one "token" per row

    def __call__(self, x: jax.Array, t: jax.Array, c: jax.Array) -> jax.Array:
        """``x [N, C]`` float32, ``t [N]`` int (original 0..999 scale), ``c [N, D_z]`` -> ``[N, out]`` float32."""
        h = self.input_proj(x)
        y = self.time_embed(t) + self.cond_embed(c)  # [N, W]
        for block in self.res_blocks:
            h = block(h, y)
        return self.final_layer(h[:, None], y)[:, 0]  # LayerNorm (no affine), adaLN (shift, scale), Linear

    def forward_with_cfg(self, x: jax.Array, t: jax.Array, c: jax.Array, cfg_scale) -> jax.Array:
        """Classifier-free guidance as upstream: only the first half of `x` is used (duplicated).

        `c` holds the conditional rows then the unconditional ones. All C eps channels are guided
        (``uncond + cfg * (cond - uncond)``, copied to both halves); the variance channels keep each half's own.

        Args:
            x: ``[2N, C]`` (second half ignored).
            t: ``[2N]`` timesteps.
            c: ``[2N, D_z]``.
            cfg_scale: Guidance scale (python float or scalar / ``[1]`` array).

        Returns:
            ``[2N, out]`` float32.
        """
        half = x[: x.shape[0] // 2]
        out = self(jnp.concatenate([half, half], axis=0), t, c)
        eps, rest = out[:, : self.in_channels], out[:, self.in_channels:]
        cond_eps, uncond_eps = jnp.split(eps, 2, axis=0)
        guided = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return jnp.concatenate([jnp.concatenate([guided, guided], axis=0), rest], axis=-1)
