"""LlamaGen's VQ image tokenizer (``VQModel``, the VQ-16 / VQ-8 of the release) in Flax NNX.

Port of FoundationVision/LlamaGen ``tokenizer/tokenizer_image/vq_model.py`` (commit ``ce98ec41``). Everything is
NHWC; token indices are int32 ``[B, h*w]`` in raster (row-major) order, the order the GPT generates them in.

The encoder and the decoder are the taming-transformers (VQGAN) networks that VAR's tokenizer uses too, so they
are `bitlaws.models.vqvae.Encoder` / `Decoder` (same math: GroupNorm(32, eps 1e-6), swish, two res blocks per
encoder level and three per decoder level, single-head attention after every res block of the lowest-resolution
level and in the middle, zero pad (0,1,0,1) + stride-2 conv down, nearest x2 + conv up). Differences from the
upstream module layout, all handled by the port table `bitlaws.port.tables.llamagen_vq`:

* attention ``q``, ``k``, ``v`` (three 1x1 convs upstream) are one ``qkv`` `QLinear` whose output columns are
  q | k | v; per-output-channel weight quantization and any activation quantization of the shared input are
  unchanged by the fusion, a per-tensor weight scale is shared by the three;
* upstream's decoder stores ``conv_blocks`` lowest resolution first; ours (``up``) highest resolution first;
* ``mid.0/1/2`` are ``mid.block_1`` / ``mid.attn_1`` / ``mid.block_2``.

Quantizer (``VectorQuantizer``): with ``codebook_l2_norm`` the channel-last features and the codebook are
L2-normalised (``F.normalize``, eps 1e-12) before ``d = |z|^2 + |e|^2 - 2 z.e``; the nearest code is the first
argmin. `LlamaGenVQ.encode` returns the straight-through value ``z + (e - z)`` (a few ulps from the code
vector); `LlamaGenVQ.decode_code` decodes the exact (normalised) code vectors.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from bitlaws.models.var import l2_normalize
from bitlaws.models.vqvae import Decoder, Encoder
from bitlaws.quant.layers import QConv

VQ16_CH_MULT = (1, 1, 2, 2, 4)


class VectorQuantizer(nnx.Module):
    """Nearest-code quantizer with a ``[V, E]`` codebook (upstream ``VectorQuantizer``).

    Args:
        codebook_size: V.
        embed_dim: E.
        l2_norm: Compare (and return) L2-normalised vectors.
        rngs: NNX RNG streams (``params``).
    """

    def __init__(self, codebook_size: int, embed_dim: int, *, l2_norm: bool, rngs: nnx.Rngs):
        self.codebook_size = codebook_size
        self.embed_dim = embed_dim
        self.l2_norm = l2_norm
        self.embedding = nnx.Embed(codebook_size, embed_dim, rngs=rngs)

    def codebook(self) -> jax.Array:
        """The codebook the distances and lookups use: ``[V, E]`` float32 (normalised when ``l2_norm``)."""
        table = self.embedding.embedding[...]
        return l2_normalize(table) if self.l2_norm else table

    def __call__(self, z: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Quantizes channel-last features.

        Args:
            z: ``[B, h, w, E]`` float32 (the ``quant_conv`` output).

        Returns:
            ``(quant [B, h, w, E], idx [B, h*w] int32)``: the straight-through ``z + (e - z)`` (z normalised
            when ``l2_norm``) and the raster-order code indices.
        """
        b, h, w, e = z.shape
        if e != self.embed_dim:
            raise ValueError(f"VectorQuantizer: z has {e} channels, the codebook {self.embed_dim}")
        flat = z.reshape(b * h * w, e)  # [N, E]
        if self.l2_norm:
            flat = l2_normalize(flat)
        codebook = self.codebook()  # [V, E]
        distance = (jnp.sum(flat ** 2, axis=1, keepdims=True) + jnp.sum(codebook ** 2, axis=1)
                    - 2.0 * (flat @ codebook.T))  # [N, V]
        idx = jnp.argmin(distance, axis=1).astype(jnp.int32)  # [N]
        code = jnp.take(codebook, idx, axis=0)  # [N, E]
        quant = flat + jax.lax.stop_gradient(code - flat)
        return quant.reshape(b, h, w, e), idx.reshape(b, h * w)

    def get_codebook_entry(self, idx: jax.Array, shape: Sequence[int]) -> jax.Array:
        """Code vectors of raster-order indices: int ``[B, h*w]`` (or ``[B*h*w]``) -> ``[B, h, w, E]`` float32.

        Args:
            idx: Code indices.
            shape: ``(B, h, w, E)`` (channel-last).
        """
        if len(shape) != 4 or int(shape[3]) != self.embed_dim:
            raise ValueError(f"shape must be (B, h, w, E={self.embed_dim}), got {tuple(shape)}")
        return jnp.take(self.codebook(), idx.reshape(-1), axis=0).reshape(tuple(int(s) for s in shape))


def vq_ctor_kwargs(ctor: Mapping[str, Any]) -> dict[str, Any]:
    """`LlamaGenVQ` keyword arguments from an upstream-style constructor dict.

    Accepts our own keywords, or a fixture manifest's nesting ``{"ModelArgs": {...}, "encoder": {"kwargs":
    {...}}, "decoder": {"kwargs": {...}}}`` (upstream ``VQModel(ModelArgs(...))`` with the encoder and decoder
    rebuilt with another ``ch``); ``cls`` / ``build`` / other informational entries are dropped.

    Raises:
        ValueError: encoder and decoder with different ``ch`` or ``num_res_blocks`` (not supported), or a
            ``norm_type`` other than ``group`` / ``resamp_with_conv`` other than True.
    """
    ctor = {k: v for k, v in ctor.items() if k != "cls"}
    if "ModelArgs" not in ctor:
        kwargs = ctor
    else:
        kwargs = dict(ctor["ModelArgs"])
        parts = {name: dict(ctor[name].get("kwargs", {})) for name in ("encoder", "decoder")
                 if isinstance(ctor.get(name), Mapping)}
        for field in ("ch", "num_res_blocks", "z_channels"):
            values = {part.get(field) for part in parts.values()} - {None}
            if field == "z_channels" and "z_channels" in kwargs:
                values.add(kwargs["z_channels"])
            if len(values) > 1:
                raise ValueError(f"LlamaGenVQ: encoder and decoder {field} differ ({sorted(values)}); "
                                 f"one {field} only")
            if values:
                kwargs[field] = values.pop()
        for name, part in parts.items():
            if part.get("norm_type", "group") != "group":
                raise ValueError(f"LlamaGenVQ: {name} norm_type={part['norm_type']!r}; only 'group' is implemented")
            if not part.get("resamp_with_conv", True):
                raise ValueError(f"LlamaGenVQ: {name} resamp_with_conv=False is not implemented")
            if "ch_mult" in part:
                kwargs[f"{name}_ch_mult"] = part["ch_mult"]
        if "in_channels" in parts.get("encoder", {}):
            kwargs["in_channels"] = parts["encoder"]["in_channels"]
        if "out_channels" in parts.get("decoder", {}):
            kwargs["out_channels"] = parts["decoder"]["out_channels"]
    for field in ("encoder_ch_mult", "decoder_ch_mult"):
        if field in kwargs:
            kwargs[field] = tuple(int(m) for m in kwargs[field])
    return kwargs


class LlamaGenVQ(nnx.Module):
    """LlamaGen's ``VQModel``: images ``[B, H, W, 3]`` in [-1, 1] <-> codes ``[B, H/f, W/f]``, f = 2^(levels-1).

    Args (upstream ``ModelArgs`` plus the encoder/decoder settings upstream fixes):
        codebook_size: V (16384 released).
        codebook_embed_dim: E (8 released).
        codebook_l2_norm: Normalised codebook and features (True released).
        codebook_show_usage: Training-only usage buffer upstream; ignored.
        commit_loss_beta, entropy_loss_ratio: Training-only losses; stored for reference.
        encoder_ch_mult, decoder_ch_mult: Width multipliers per level (highest resolution first).
        z_channels: Encoder output / decoder input channels.
        dropout_p: Training-only dropout; ignored.
        ch: Base width (upstream fixes 128); a multiple of 32.
        num_res_blocks: Encoder res blocks per level (the decoder has one more).
        in_channels, out_channels: Image channels.
        rngs: NNX RNG streams (``params``).
    """

    def __init__(self, *, codebook_size: int = 16384, codebook_embed_dim: int = 8, codebook_l2_norm: bool = True,
                 codebook_show_usage: bool = True, commit_loss_beta: float = 0.25, entropy_loss_ratio: float = 0.0,
                 encoder_ch_mult: Sequence[int] = VQ16_CH_MULT, decoder_ch_mult: Sequence[int] = VQ16_CH_MULT,
                 z_channels: int = 256, dropout_p: float = 0.0, ch: int = 128, num_res_blocks: int = 2,
                 in_channels: int = 3, out_channels: int = 3, rngs: nnx.Rngs):
        del codebook_show_usage, dropout_p  # training only
        if ch % 32:
            raise ValueError(f"LlamaGenVQ: ch={ch} must be a multiple of 32 (GroupNorm with 32 groups)")
        encoder_ch_mult = tuple(int(m) for m in encoder_ch_mult)
        decoder_ch_mult = tuple(int(m) for m in decoder_ch_mult)
        if len(encoder_ch_mult) != len(decoder_ch_mult):
            raise ValueError(f"LlamaGenVQ: encoder_ch_mult {encoder_ch_mult} and decoder_ch_mult {decoder_ch_mult} "
                             f"have different numbers of levels")
        self.codebook_embed_dim = codebook_embed_dim
        self.commit_loss_beta = commit_loss_beta
        self.entropy_loss_ratio = entropy_loss_ratio
        self.downsample_factor = 2 ** (len(encoder_ch_mult) - 1)
        self.encoder = Encoder(ch=ch, z_channels=z_channels, ch_mult=encoder_ch_mult, num_res_blocks=num_res_blocks,
                               in_channels=in_channels, rngs=rngs)
        self.decoder = Decoder(ch=ch, z_channels=z_channels, ch_mult=decoder_ch_mult, num_res_blocks=num_res_blocks,
                               out_channels=out_channels, rngs=rngs)
        self.quantize = VectorQuantizer(codebook_size, codebook_embed_dim, l2_norm=codebook_l2_norm, rngs=rngs)
        self.quant_conv = QConv(z_channels, codebook_embed_dim, 1, padding="VALID", rngs=rngs)
        self.post_quant_conv = QConv(codebook_embed_dim, z_channels, 1, padding="VALID", rngs=rngs)

    def encode_features(self, img: jax.Array) -> jax.Array:
        """``quant_conv(encoder(img))``: ``[B, H, W, 3] -> [B, H/f, W/f, E]`` float32 (not normalised)."""
        return self.quant_conv(self.encoder(img))

    def encode(self, img: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Tokenizes images.

        Args:
            img: ``[B, H, W, 3]`` float32 in [-1, 1].

        Returns:
            ``(quant [B, h, w, E] float32, idx [B, h*w] int32)``: straight-through codes and raster-order indices.
        """
        return self.quantize(self.encode_features(img))

    def decode(self, quant: jax.Array) -> jax.Array:
        """``decoder(post_quant_conv(quant))``: ``[B, h, w, E] -> [B, f*h, f*w, 3]`` float32, not clamped."""
        return self.decoder(self.post_quant_conv(quant))

    def decode_code(self, idx: jax.Array, shape: Sequence[int]) -> jax.Array:
        """Decodes code indices (upstream ``decode_code``, what ``sample_c2i.py`` does with GPT tokens).

        Args:
            idx: int ``[B, h*w]`` raster-order indices.
            shape: ``(B, h, w, E)`` of the code map (channel-last; upstream passes ``[B, E, h, w]``).

        Returns:
            ``[B, f*h, f*w, 3]`` float32 images, not clamped.
        """
        return self.decode(self.quantize.get_codebook_entry(idx, shape))

    def __call__(self, img: jax.Array) -> jax.Array:
        """Reconstruction ``decode(encode(img)[0])``: ``[B, H, W, 3] -> [B, H, W, 3]``, not clamped."""
        return self.decode(self.encode(img)[0])

