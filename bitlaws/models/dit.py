"""DiT (Diffusion Transformer, Peebles & Xie 2023) in Flax NNX, numerically matching the official PyTorch code.

The model works on NHWC latents: `DiT.__call__` maps ``x [B, H, W, C]`` float32, integer timesteps ``t [B]``
(original 0..999 scale) and class labels ``y [B]`` to ``[B, H, W, C_out]`` with ``C_out = 2C`` when
``learn_sigma`` (channels ``[0:C]`` epsilon, ``[C:2C]`` the variance interpolation value).

Parameter names mirror the upstream state dict (``x_embedder.proj``, ``t_embedder.mlp_in``/``mlp_out``,
``y_embedder.embedding_table``, ``blocks.{i}.attn.qkv`` ...) so the port table is short. The fixed 2-D
sin-cos ``pos_embed`` is not a model variable: it is recomputed with numpy (`pos_embed_2d`) and folded in as a
constant; the checkpoint's copy is ignored by the port (and checked to be equal in the tests).

Every linear and convolution is a `QLinear` / `QConv`, so the model can be quantized through the seam.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bitlaws.models import attention
from bitlaws.models.common import layer_norm
from bitlaws.quant.layers import QConv, QLinear

TIMESTEP_FREQUENCY_DIM = 256
MAX_PERIOD = 10000
NORM_EPS = 1e-6
CFG_GUIDED_CHANNELS = 3  # upstream guides model_out[:, :3], hard-coded


# ----------------------------------------------------------------------------- fixed tables


def _sincos_1d(embed_dim: int, positions: np.ndarray) -> np.ndarray:
    """MAE 1-D sin-cos table: ``[M] -> [M, embed_dim]`` float64, laid out as ``[sin | cos]``."""
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / MAX_PERIOD**omega  # [D/2]
    angles = np.outer(positions.reshape(-1).astype(np.float64), omega)  # [M, D/2]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


@functools.lru_cache(maxsize=16)
def pos_embed_2d(embed_dim: int, grid_size: int) -> np.ndarray:
    """The fixed DiT/MAE 2-D sin-cos position table.

    The first ``embed_dim/2`` channels encode the column index, the last ``embed_dim/2`` the row index
    (as ``np.meshgrid(grid_w, grid_h)`` orders them upstream); tokens are row-major.

    Args:
        embed_dim: D (a multiple of 4).
        grid_size: Tokens per side.

    Returns:
        ``[1, grid_size**2, D]`` float32 (read-only; cached).
    """
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs embed_dim divisible by 4, got {embed_dim}")
    coords = np.arange(grid_size, dtype=np.float32)
    cols, rows = np.meshgrid(coords, coords)  # each [G, G]; cols varies along axis 1
    table = np.concatenate([_sincos_1d(embed_dim // 2, cols), _sincos_1d(embed_dim // 2, rows)], axis=1)
    table = table.astype(np.float32)[None]  # [1, G*G, D]
    table.setflags(write=False)
    return table


@functools.lru_cache(maxsize=4)
def _timestep_frequencies(half: int) -> np.ndarray:
    """``exp(-ln(10000) * arange(half) / half)`` evaluated in float32 like upstream: ``[half]`` float32."""
    steps = np.arange(half, dtype=np.float32)
    exponent = (np.float32(-math.log(MAX_PERIOD)) * steps) / np.float32(half)
    return np.exp(exponent).astype(np.float32)


def timestep_embedding(t: jax.Array, dim: int = TIMESTEP_FREQUENCY_DIM) -> jax.Array:
    """Sinusoidal timestep features, ``[cos | sin]`` (cos first).

    Args:
        t: ``[B]`` integer or float timesteps.
        dim: Feature size (an odd size gets one zero column, as upstream).

    Returns:
        ``[B, dim]`` float32.
    """
    freqs = jnp.asarray(_timestep_frequencies(dim // 2))  # [dim/2]
    args = t.astype(jnp.float32)[:, None] * freqs[None]  # [B, dim/2]
    embedding = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        embedding = jnp.concatenate([embedding, jnp.zeros_like(embedding[:, :1])], axis=-1)
    return embedding


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """``x * (1 + scale) + shift`` with ``x [B, N, D]`` and ``shift``/``scale [B, D]``."""
    return x * (1 + scale[:, None]) + shift[:, None]


# ----------------------------------------------------------------------------- embedders


class PatchEmbed(nnx.Module):
    """p x p stride-p convolution: ``[B, H, W, C] -> [B, (H/p)*(W/p), D]`` (tokens row-major)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int, *, rngs: nnx.Rngs):
        self.proj = QConv(in_channels, hidden_size, patch_size, strides=patch_size, padding="VALID", rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.proj(x)  # [B, H/p, W/p, D]
        return x.reshape(x.shape[0], -1, x.shape[-1])


class TimestepEmbedder(nnx.Module):
    """Sinusoidal features (256) -> Linear -> SiLU -> Linear: ``[B] -> [B, D]``."""

    def __init__(self, hidden_size: int, *, frequency_dim: int = TIMESTEP_FREQUENCY_DIM, rngs: nnx.Rngs):
        self.frequency_dim = frequency_dim
        self.mlp_in = QLinear(frequency_dim, hidden_size, rngs=rngs)
        self.mlp_out = QLinear(hidden_size, hidden_size, rngs=rngs)

    def __call__(self, t: jax.Array) -> jax.Array:
        features = timestep_embedding(t, self.frequency_dim)  # [B, 256]
        return self.mlp_out(jax.nn.silu(self.mlp_in(features)))


class LabelEmbedder(nnx.Module):
    """Class-label table with an extra null row (index ``num_classes``) when dropout is enabled.

    Labels are replaced by the null class with probability ``dropout_prob`` only in training with a key,
    or where ``force_drop_ids == 1``.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float, *, rngs: nnx.Rngs):
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        rows = num_classes + int(dropout_prob > 0)
        self.embedding_table = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (rows, hidden_size)))

    def drop_labels(self, labels: jax.Array, key: Optional[jax.Array],
                    force_drop_ids: Optional[jax.Array] = None) -> jax.Array:
        """Returns ``[B]`` labels with dropped entries set to the null class."""
        if force_drop_ids is None:
            drop = jax.random.uniform(key, labels.shape) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return jnp.where(drop, self.num_classes, labels)

    def __call__(self, labels: jax.Array, *, train: bool = False, key: Optional[jax.Array] = None,
                 force_drop_ids: Optional[jax.Array] = None) -> jax.Array:
        """``[B]`` int -> ``[B, D]`` float32."""
        use_dropout = self.dropout_prob > 0
        if (train and use_dropout and key is not None) or force_drop_ids is not None:
            labels = self.drop_labels(labels, key, force_drop_ids)
        return self.embedding_table[...][labels]


# ----------------------------------------------------------------------------- transformer


class Attention(nnx.Module):
    """timm ``Attention``: fused qkv with bias, heads split as ``(3, H, hd)``, scale ``hd**-0.5``."""

    def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.attention_impl = attention.DEFAULT  # `bitlaws.models.attention.set_attention` changes it
        self.qkv = QLinear(dim, 3 * dim, rngs=rngs)
        self.proj = QLinear(dim, dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, N, D] -> [B, N, D]``."""
        b, n, d = x.shape
        head_dim = d // self.num_heads
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # each [B, N, H, hd]
        out = attention.attend(q, k, v, scale=head_dim**-0.5, impl=self.attention_impl)  # [B, N, H, hd]
        return self.proj(out.reshape(b, n, d))


class Mlp(nnx.Module):
    """fc1 -> GELU (tanh approximation) -> fc2."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
        self.fc1 = QLinear(dim, hidden, rngs=rngs)
        self.fc2 = QLinear(hidden, dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


class DiTBlock(nnx.Module):
    """adaLN-Zero block; modulation chunks: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, *, rngs: nnx.Rngs):
        self.attn = Attention(hidden_size, num_heads, rngs=rngs)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), rngs=rngs)
        self.adaLN_modulation = QLinear(hidden_size, 6 * hidden_size, rngs=rngs)

    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        """``x [B, N, D]``, conditioning ``c [B, D]`` -> ``[B, N, D]``."""
        mod = self.adaLN_modulation(jax.nn.silu(c))  # [B, 6D]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
        x = x + gate_msa[:, None] * self.attn(modulate(layer_norm(x, NORM_EPS), shift_msa, scale_msa))
        return x + gate_mlp[:, None] * self.mlp(modulate(layer_norm(x, NORM_EPS), shift_mlp, scale_mlp))


class FinalLayer(nnx.Module):
    """adaLN (shift, scale) then Linear to ``p*p*C_out`` per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, *, rngs: nnx.Rngs):
        self.linear = QLinear(hidden_size, patch_size * patch_size * out_channels, rngs=rngs)
        self.adaLN_modulation = QLinear(hidden_size, 2 * hidden_size, rngs=rngs)

    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        """``[B, N, D] -> [B, N, p*p*C_out]``."""
        shift, scale = jnp.split(self.adaLN_modulation(jax.nn.silu(c)), 2, axis=-1)
        return self.linear(modulate(layer_norm(x, NORM_EPS), shift, scale))


class DiT(nnx.Module):
    """Diffusion Transformer with adaLN-Zero conditioning (upstream constructor argument names).

    Args:
        input_size: Latent side length (32 for 256px images through the SD VAE).
        patch_size: p.
        in_channels: Latent channels C.
        hidden_size: D.
        depth: Number of blocks.
        num_heads: Attention heads.
        mlp_ratio: MLP hidden size / D.
        class_dropout_prob: Label dropout in training (> 0 adds the null class row).
        num_classes: Number of classes; the null class has index ``num_classes``.
        learn_sigma: Output 2C channels (eps and variance values) instead of C.
        rngs: NNX RNG streams for initialisation (ported weights overwrite everything).
    """

    def __init__(self, *, input_size: int = 32, patch_size: int = 2, in_channels: int = 4,
                 hidden_size: int = 1152, depth: int = 28, num_heads: int = 16, mlp_ratio: float = 4.0,
                 class_dropout_prob: float = 0.1, num_classes: int = 1000, learn_sigma: bool = True,
                 rngs: nnx.Rngs):
        if input_size % patch_size:
            raise ValueError(f"input_size={input_size} is not divisible by patch_size={patch_size}")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.hidden_size = hidden_size
        self.num_classes = num_classes
        self.learn_sigma = learn_sigma
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size, rngs=rngs)
        self.t_embedder = TimestepEmbedder(hidden_size, rngs=rngs)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob, rngs=rngs)
        self.blocks = nnx.List([DiTBlock(hidden_size, num_heads, mlp_ratio, rngs=rngs) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, rngs=rngs)

    @property
    def grid_size(self) -> int:
        return self.input_size // self.patch_size

    def pos_embed(self) -> np.ndarray:
        """The fixed position table ``[1, N, D]`` float32 (numpy constant, not a model variable)."""
        return pos_embed_2d(self.hidden_size, self.grid_size)

    def unpatchify(self, tokens: jax.Array) -> jax.Array:
        """``[B, h*w, p*p*C_out]`` (each token read as (p_row, p_col, channel)) -> ``[B, h*p, w*p, C_out]``."""
        b, n, _ = tokens.shape
        side, p, c = int(round(math.sqrt(n))), self.patch_size, self.out_channels
        if side * side != n:
            raise ValueError(f"unpatchify expects a square token grid, got {n} tokens")
        x = tokens.reshape(b, side, side, p, p, c)
        x = jnp.einsum("nhwpqc->nhpwqc", x)
        return x.reshape(b, side * p, side * p, c)

    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array, *, train: bool = False,
                 dropout_key: Optional[jax.Array] = None,
                 force_drop_ids: Optional[jax.Array] = None) -> jax.Array:
        """Predicts noise (and variance values).

        Args:
            x: ``[B, H, W, C]`` float32 latents.
            t: ``[B]`` integer timesteps on the original 0..999 scale.
            y: ``[B]`` integer labels (``num_classes`` = null class).
            train: Enables label dropout (needs `dropout_key`).
            dropout_key: PRNG key for label dropout.
            force_drop_ids: ``[B]`` optional; entries equal to 1 use the null class.

        Returns:
            ``[B, H, W, C_out]`` float32.
        """
        tokens = self.x_embedder(x) + jnp.asarray(self.pos_embed())  # [B, N, D]
        c = self.t_embedder(t) + self.y_embedder(y, train=train, key=dropout_key,
                                                 force_drop_ids=force_drop_ids)  # [B, D]
        for block in self.blocks:
            tokens = block(tokens, c)
        return self.unpatchify(self.final_layer(tokens, c))

    def forward_with_cfg(self, x: jax.Array, t: jax.Array, y: jax.Array, cfg_scale) -> jax.Array:
        """Classifier-free guidance exactly as upstream.

        Only the first half of `x` is used (duplicated); `y` holds the conditional labels then the null ones.
        Guidance is applied to the first 3 channels only (hard-coded upstream) and copied to both halves; the
        remaining channels keep each half's own prediction.

        Args:
            x: ``[2B, H, W, C]`` float32 (second half ignored).
            t: ``[2B]`` timesteps.
            y: ``[2B]`` labels.
            cfg_scale: Guidance scale (python float or scalar array).

        Returns:
            ``[2B, H, W, C_out]`` float32.
        """
        half = x[: x.shape[0] // 2]
        out = self(jnp.concatenate([half, half], axis=0), t, y)
        eps, rest = out[..., :CFG_GUIDED_CHANNELS], out[..., CFG_GUIDED_CHANNELS:]
        cond_eps, uncond_eps = jnp.split(eps, 2, axis=0)
        guided = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return jnp.concatenate([jnp.concatenate([guided, guided], axis=0), rest], axis=-1)
