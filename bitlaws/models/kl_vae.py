"""The KL-regularised autoencoder of Stable Diffusion (diffusers ``AutoencoderKL``) in Flax NNX.

Layout follows diffusers so that ``AutoencoderKL(**json.load(open('config.json')), rngs=...)`` works and
the port tables are mostly renames. Everything is NHWC; every convolution and linear layer is a seam
layer (`QConv` / `QLinear`).

Architecture (``L`` = ``layers_per_block``, ``C_i`` = ``block_out_channels[i]``):

* Encoder: ``conv_in`` 3x3 -> down blocks (``L`` resnets each, optionally each followed by attention
  (``down_attention``); all but the last end with a zero pad (0,1,0,1) + 3x3 stride-2 conv) -> mid block
  (resnet, attention, resnet) -> GroupNorm-SiLU-``conv_out`` to ``2 * latent_channels`` (mean and
  log-variance). The SD VAE has no down-block attention; LDM/MAR's KL-16 has it at the lowest resolution.
* ``quant_conv`` / ``post_quant_conv``: 1x1 convs on the moments / the latent.
* Decoder: ``conv_in`` 3x3 -> mid block -> up blocks in reversed channel order (``L + 1`` resnets each;
  all but the last end with nearest x2 + 3x3 conv) -> GroupNorm-SiLU-``conv_out``.
* Resnet: GN-SiLU-conv3x3-GN-SiLU-conv3x3 plus the input (through a 1x1 ``conv_shortcut`` when the
  channel count changes). All GroupNorms use eps 1e-6.
* Attention: GroupNorm, one head over all C channels, q/k/v/out linear layers, scale C^-0.5, residual.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from flax import struct

from bitlaws.models.common import GroupNorm
from bitlaws.quant.layers import QConv, QLinear

NORM_EPS = 1e-6
LOGVAR_RANGE = (-30.0, 20.0)

_DOWN_BLOCK = "DownEncoderBlock2D"
_UP_BLOCK = "UpDecoderBlock2D"

# Config entries diffusers writes that do not change this architecture (any value is accepted).
_IGNORED_CONFIG = frozenset({
    "shift_factor", "latents_mean", "latents_std", "force_upcast",
})


@struct.dataclass
class DiagonalGaussian:
    """The posterior ``N(mean, exp(logvar))`` returned by `AutoencoderKL.encode` (a pytree).

    Attributes:
        mean: ``[B, h, w, latent]`` float32.
        logvar: ``[B, h, w, latent]`` float32, clamped to [-30, 20].
        std: ``[B, h, w, latent]`` float32, ``exp(0.5 * logvar)``.
    """

    mean: jax.Array
    logvar: jax.Array
    std: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
        """Splits ``[..., 2 * latent]`` moments into (mean, raw logvar) and clamps the logvar."""
        mean, logvar = jnp.split(moments, 2, axis=-1)
        logvar = jnp.clip(logvar, *LOGVAR_RANGE)
        return cls(mean=mean, logvar=logvar, std=jnp.exp(0.5 * logvar))

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def mode(self) -> jax.Array:
        """The most likely latent (the mean), ``[B, h, w, latent]``."""
        return self.mean

    def sample(self, key: jax.Array) -> jax.Array:
        """A reparameterised draw ``mean + std * eps``, ``[B, h, w, latent]`` float32."""
        eps = jax.random.normal(key, self.mean.shape, self.mean.dtype)
        return self.mean + self.std * eps


class ResnetBlock(nnx.Module):
    """GN-SiLU-conv-GN-SiLU-conv with a (1x1-projected when channels change) residual."""

    def __init__(self, in_channels: int, out_channels: int, *, groups: int, rngs: nnx.Rngs):
        self.norm1 = GroupNorm(in_channels, num_groups=groups)
        self.conv1 = QConv(in_channels, out_channels, 3, padding=1, rngs=rngs)
        self.norm2 = GroupNorm(out_channels, num_groups=groups)
        self.conv2 = QConv(out_channels, out_channels, 3, padding=1, rngs=rngs)
        self.conv_shortcut = (QConv(in_channels, out_channels, 1, padding="VALID", rngs=rngs)
                              if in_channels != out_channels else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, H, W, C_in] -> [B, H, W, C_out]``."""
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return shortcut + h


class AttentionBlock(nnx.Module):
    """Single-head spatial self-attention over all C channels with a residual (diffusers ``Attention``)."""

    def __init__(self, channels: int, *, groups: int, rngs: nnx.Rngs):
        self.group_norm = GroupNorm(channels, num_groups=groups)
        self.to_q = QLinear(channels, channels, rngs=rngs)
        self.to_k = QLinear(channels, channels, rngs=rngs)
        self.to_v = QLinear(channels, channels, rngs=rngs)
        self.to_out = QLinear(channels, channels, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, H, W, C] -> [B, H, W, C]``."""
        b, h, w, c = x.shape
        tokens = self.group_norm(x).reshape(b, h * w, c)  # [B, N, C]
        q, k, v = self.to_q(tokens), self.to_k(tokens), self.to_v(tokens)  # [B, N, C] each
        logits = jnp.einsum("bqc,bkc->bqk", q, k) * (c ** -0.5)  # [B, N, N]
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
        attended = jnp.einsum("bqk,bkc->bqc", weights, v)  # [B, N, C]
        return x + self.to_out(attended).reshape(b, h, w, c)


class MidBlock(nnx.Module):
    """Resnet, (optional) attention, resnet at constant width."""

    def __init__(self, channels: int, *, groups: int, add_attention: bool, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock(channels, channels, groups=groups, rngs=rngs)
                                 for _ in range(2)])
        self.attention = AttentionBlock(channels, groups=groups, rngs=rngs) if add_attention else None

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, H, W, C] -> [B, H, W, C]``."""
        x = self.resnets[0](x)
        if self.attention is not None:
            x = self.attention(x)
        return self.resnets[1](x)


class DownBlock(nnx.Module):
    """``num_layers`` resnets (each optionally followed by attention), then (optionally) pad (0,1,0,1) + 3x3
    stride-2 conv."""

    def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, groups: int,
                 add_downsample: bool, rngs: nnx.Rngs, add_attention: bool = False):
        self.resnets = nnx.List([
            ResnetBlock(in_channels if j == 0 else out_channels, out_channels, groups=groups, rngs=rngs)
            for j in range(num_layers)])
        self.attentions = (nnx.List([AttentionBlock(out_channels, groups=groups, rngs=rngs)
                                     for _ in range(num_layers)]) if add_attention else None)
        self.downsample = (QConv(out_channels, out_channels, 3, strides=2, padding=((0, 1), (0, 1)), rngs=rngs)
                           if add_downsample else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, H, W, C_in] -> [B, H/2, W/2, C_out]`` (or ``[B, H, W, C_out]`` without downsampling)."""
        for j, resnet in enumerate(self.resnets):
            x = resnet(x)
            if self.attentions is not None:
                x = self.attentions[j](x)
        if self.downsample is not None:
            x = self.downsample(x)
        return x


class UpBlock(nnx.Module):
    """``num_layers`` resnets, then (optionally) nearest x2 + 3x3 conv."""

    def __init__(self, in_channels: int, out_channels: int, *, num_layers: int, groups: int,
                 add_upsample: bool, rngs: nnx.Rngs):
        self.resnets = nnx.List([
            ResnetBlock(in_channels if j == 0 else out_channels, out_channels, groups=groups, rngs=rngs)
            for j in range(num_layers)])
        self.upsample = (QConv(out_channels, out_channels, 3, padding=1, rngs=rngs)
                         if add_upsample else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, H, W, C_in] -> [B, 2H, 2W, C_out]`` (or ``[B, H, W, C_out]`` without upsampling)."""
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsample is not None:
            x = self.upsample(x, upsample=2)  # nearest x2, then the conv
        return x


class Encoder(nnx.Module):
    """Image ``[B, H, W, in]`` -> moments ``[B, H/f, W/f, 2 * latent]`` with f = 2^(levels - 1)."""

    def __init__(self, in_channels: int, latent_channels: int, block_out_channels: Sequence[int], *,
                 layers_per_block: int, groups: int, mid_attention: bool, rngs: nnx.Rngs,
                 down_attention: Sequence[bool] = ()):
        self.conv_in = QConv(in_channels, block_out_channels[0], 3, padding=1, rngs=rngs)
        blocks = []
        for i, out_channels in enumerate(block_out_channels):
            in_ch = block_out_channels[max(i - 1, 0)]
            blocks.append(DownBlock(in_ch, out_channels, num_layers=layers_per_block, groups=groups,
                                    add_downsample=i < len(block_out_channels) - 1, rngs=rngs,
                                    add_attention=bool(down_attention) and down_attention[i]))
        self.down_blocks = nnx.List(blocks)
        top = block_out_channels[-1]
        self.mid_block = MidBlock(top, groups=groups, add_attention=mid_attention, rngs=rngs)
        self.conv_norm_out = GroupNorm(top, num_groups=groups)
        self.conv_out = QConv(top, 2 * latent_channels, 3, padding=1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """Latent ``[B, h, w, latent]`` -> image ``[B, h*f, w*f, out]``."""

    def __init__(self, latent_channels: int, out_channels: int, block_out_channels: Sequence[int], *,
                 layers_per_block: int, groups: int, mid_attention: bool, rngs: nnx.Rngs):
        reversed_channels = list(reversed(block_out_channels))
        self.conv_in = QConv(latent_channels, reversed_channels[0], 3, padding=1, rngs=rngs)
        self.mid_block = MidBlock(reversed_channels[0], groups=groups, add_attention=mid_attention, rngs=rngs)
        blocks = []
        for i, out_ch in enumerate(reversed_channels):
            in_ch = reversed_channels[max(i - 1, 0)]
            blocks.append(UpBlock(in_ch, out_ch, num_layers=layers_per_block + 1, groups=groups,
                                  add_upsample=i < len(reversed_channels) - 1, rngs=rngs))
        self.up_blocks = nnx.List(blocks)
        self.conv_norm_out = GroupNorm(block_out_channels[0], num_groups=groups)
        self.conv_out = QConv(block_out_channels[0], out_channels, 3, padding=1, rngs=rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


def _check_config(down_block_types: Sequence[str], up_block_types: Sequence[str],
                  block_out_channels: Sequence[int], act_fn: str, extra: dict[str, Any]) -> None:
    """Raises a clear error for any config value this port does not implement."""
    levels = len(block_out_channels)
    if len(down_block_types) != levels or len(up_block_types) != levels:
        raise ValueError(f"AutoencoderKL: need one down and one up block per entry of block_out_channels "
                         f"({levels}), got {len(down_block_types)} down / {len(up_block_types)} up")
    unsupported = sorted({t for t in down_block_types if t != _DOWN_BLOCK}
                         | {t for t in up_block_types if t != _UP_BLOCK})
    if unsupported:
        raise NotImplementedError(f"AutoencoderKL: only {_DOWN_BLOCK}/{_UP_BLOCK} blocks are implemented, "
                                  f"got {unsupported}")
    if act_fn != "silu":
        raise NotImplementedError(f"AutoencoderKL: only act_fn='silu' is implemented, got {act_fn!r}")
    for name, value in extra.items():
        if name.startswith("_") or name in _IGNORED_CONFIG:
            continue  # diffusers bookkeeping (_class_name, _diffusers_version) or runtime-only settings
        raise TypeError(f"AutoencoderKL: unknown config entry {name}={value!r}")


class AutoencoderKL(nnx.Module):
    """diffusers ``AutoencoderKL`` (SD VAE); inputs and outputs are NHWC float32.

    The defaults are the Stable Diffusion VAE's (not diffusers' single-level defaults).

    Args:
        in_channels, out_channels: Image channels.
        down_block_types, up_block_types: Only ``DownEncoderBlock2D`` / ``UpDecoderBlock2D``.
        block_out_channels: Width of each resolution level (highest resolution first).
        layers_per_block: Resnets per encoder level (the decoder uses one more).
        act_fn: Only ``'silu'``.
        latent_channels: Channels of the latent.
        norm_num_groups: GroupNorm groups (must divide every width).
        sample_size: Nominal image size (metadata only).
        scaling_factor: Latent scale used by diffusion models (metadata only: `decode` does not apply it).
        use_quant_conv, use_post_quant_conv: Whether the 1x1 convs around the latent exist.
        mid_block_add_attention: Whether the mid blocks have their attention layer.
        down_attention: Per encoder level, whether every resnet is followed by single-head attention (LDM's
            ``attn_resolutions``, e.g. MAR's KL-16 at its lowest resolution); empty: none (the SD VAE).
        rngs: NNX RNG streams (``params``) for the (to be overwritten) initial weights.
        **config: Further diffusers config entries; ones that do not affect the network
            (``shift_factor``, ``latents_mean``, ``latents_std``, ``force_upcast``, ``_*``) are ignored,
            anything else raises.
    """

    def __init__(self, *, in_channels: int = 3, out_channels: int = 3,
                 down_block_types: Sequence[str] = (_DOWN_BLOCK,) * 4,
                 up_block_types: Sequence[str] = (_UP_BLOCK,) * 4,
                 block_out_channels: Sequence[int] = (128, 256, 512, 512), layers_per_block: int = 2,
                 act_fn: str = "silu", latent_channels: int = 4, norm_num_groups: int = 32,
                 sample_size: int = 256, scaling_factor: float = 0.18215, use_quant_conv: bool = True,
                 use_post_quant_conv: bool = True, mid_block_add_attention: bool = True,
                 down_attention: Sequence[bool] = (), rngs: nnx.Rngs, **config: Any):
        _check_config(down_block_types, up_block_types, block_out_channels, act_fn, config)
        block_out_channels = tuple(int(c) for c in block_out_channels)
        self.block_out_channels = block_out_channels
        self.latent_channels = latent_channels
        self.sample_size = sample_size
        self.scaling_factor = float(scaling_factor)
        common = dict(layers_per_block=layers_per_block, groups=norm_num_groups,
                      mid_attention=mid_block_add_attention, rngs=rngs)
        if down_attention and len(down_attention) != len(block_out_channels):
            raise ValueError(f"down_attention: needs one flag per level ({len(block_out_channels)}), "
                             f"got {len(down_attention)}")
        self.encoder = Encoder(in_channels, latent_channels, block_out_channels, **common,
                               down_attention=tuple(bool(a) for a in down_attention))
        self.decoder = Decoder(latent_channels, out_channels, block_out_channels, **common)
        moments = 2 * latent_channels
        self.quant_conv = (QConv(moments, moments, 1, padding="VALID", rngs=rngs)
                           if use_quant_conv else None)
        self.post_quant_conv = (QConv(latent_channels, latent_channels, 1, padding="VALID", rngs=rngs)
                                if use_post_quant_conv else None)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    def encode_moments(self, x: jax.Array) -> jax.Array:
        """Image ``[B, H, W, in]`` float32 -> moments ``[B, H/f, W/f, 2 * latent]`` (mean, raw logvar)."""
        moments = self.encoder(x)
        return moments if self.quant_conv is None else self.quant_conv(moments)

    def encode(self, x: jax.Array) -> DiagonalGaussian:
        """Image ``[B, H, W, in]`` float32 -> posterior over ``[B, H/f, W/f, latent]`` latents."""
        return DiagonalGaussian.from_moments(self.encode_moments(x))

    def decode(self, z: jax.Array) -> jax.Array:
        """Latent ``[B, h, w, latent]`` float32 -> image ``[B, h*f, w*f, out]`` (no scaling, no clamp)."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x: jax.Array, key: Optional[jax.Array] = None) -> jax.Array:
        """Reconstruction ``[B, H, W, in] -> [B, H, W, out]`` from the posterior mean (or a sample if `key`)."""
        posterior = self.encode(x)
        z = posterior.mode() if key is None else posterior.sample(key)
        return self.decode(z)
