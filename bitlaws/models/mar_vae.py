"""MAR's KL-16 tokenizer (LDM's KL autoencoder, ``models/vae.py`` of LTH14/mar) as a `kl_vae.AutoencoderKL`.

The LDM network is the SD VAE's up to two choices, both expressible in our diffusers-layout `AutoencoderKL`:

* the encoder puts single-head attention after every resnet of each level whose nominal resolution
  (``resolution / 2**level``) is in ``attn_resolutions`` (`AutoencoderKL`'s ``down_attention``);
* widths are ``ch * ch_mult[i]`` and there are ``len(ch_mult)`` levels (KL-16: 5 levels, 16x downsampling).

The decoder has attention only in its mid block (upstream ``attn_resolutions=()``), ``num_res_blocks + 1``
resnets per level; GroupNorm(32, eps 1e-6) everywhere. `MarAutoencoderKL` takes the upstream constructor
arguments; ``encode`` returns the posterior (``mean``, ``logvar`` clamped to [-30, 20], ``std``), ``decode`` maps
unscaled latents to images. Everything is NHWC. MAR feeds the transformer ``posterior.sample() * 0.2325`` and
decodes ``tokens / 0.2325`` (`LATENT_SCALE`).
"""

from __future__ import annotations

from typing import Sequence

from flax import nnx

from bitlaws.models.kl_vae import AutoencoderKL

LATENT_SCALE = 0.2325
"""MAR's latent scaling (not SD's 0.18215): tokens = posterior sample * 0.2325, images = decode(tokens / 0.2325)."""


def down_attention(levels: int, resolution: int, attn_resolutions: Sequence[int]) -> tuple[bool, ...]:
    """Which LDM encoder levels have attention: those whose nominal resolution ``resolution / 2**level`` is listed."""
    return tuple(resolution // 2**level in tuple(attn_resolutions) for level in range(levels))


class MarAutoencoderKL(AutoencoderKL):
    """LDM/MAR ``AutoencoderKL`` with its upstream constructor arguments; inputs and outputs NHWC float32.

    Defaults are the released KL-16 (``AutoencoderKL(embed_dim=16, ch_mult=(1, 1, 2, 2, 4))``: ch 128,
    resolution 256, encoder attention at the 16x16 level).

    Args:
        embed_dim: Latent channels E (``quant_conv``: 2E -> 2E, ``post_quant_conv``: E -> E).
        ch_mult: Width multipliers per level (highest resolution first).
        ch: Base width (a multiple of 32).
        num_res_blocks: Resnets per encoder level (the decoder uses one more).
        attn_resolutions: Nominal resolutions whose encoder level has attention.
        resolution: Nominal input resolution (only decides where the encoder attention goes).
        in_channels, out_ch: Image channels.
        use_variational: Must be True (the released model; False changes ``quant_conv``'s shape).
        rngs: NNX RNG streams for the (to be overwritten) initial weights.

    Raises:
        ValueError: naming a bad argument.
    """

    def __init__(self, *, embed_dim: int = 16, ch_mult: Sequence[int] = (1, 1, 2, 2, 4), ch: int = 128,
                 num_res_blocks: int = 2, attn_resolutions: Sequence[int] = (16,), resolution: int = 256,
                 in_channels: int = 3, out_ch: int = 3, use_variational: bool = True, rngs: nnx.Rngs):
        if not use_variational:
            raise ValueError("use_variational: only True (the released KL-16) is implemented")
        if not ch_mult:
            raise ValueError("ch_mult: needs at least one level")
        if ch % 32:
            raise ValueError(f"ch: GroupNorm(32) needs a multiple of 32, got {ch}")
        levels = len(ch_mult)
        self.embed_dim = embed_dim
        super().__init__(
            in_channels=in_channels, out_channels=out_ch,
            down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
            down_attention=down_attention(levels, resolution, attn_resolutions),
            block_out_channels=tuple(ch * m for m in ch_mult), layers_per_block=num_res_blocks,
            latent_channels=embed_dim, norm_num_groups=32, sample_size=resolution,
            scaling_factor=LATENT_SCALE, rngs=rngs)
