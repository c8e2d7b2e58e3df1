"""MAR (Li et al. 2024, "Autoregressive Image Generation without Vector Quantization") in Flax NNX.

A masked autoencoder over continuous VAE tokens (LTH14/mar ``models/mar.py``) that produces, for every
position, a conditioning vector ``z`` for the diffusion-loss head (`bitlaws.models.mar_diffloss`).

Tokens: `patchify` turns NHWC latents ``[B, H, W, C]`` into ``[B, L, C*p*p]`` with upstream's channel-major
layout inside a token (``(c, p_row, p_col)``), L = ``(img_size / vae_stride / patch_size)^2``, rows row-major.

Mask convention: ``mask [B, L]`` float, **1 = masked** (unknown; dropped from the encoder, to be predicted).

Encoder: ``z_proj`` -> prepend ``buffer_size`` rows all holding the class embedding -> ``+ encoder_pos_embed``
-> ``z_proj_ln`` -> timm Blocks (pre-norm, fused qkv with bias, exact-erf GELU MLP, LayerNorm eps 1e-6) ->
``encoder_norm``. Upstream drops the masked rows (same count per row) before the blocks. Here the blocks run on
all ``buffer + L`` rows and attention ignores the masked rows' keys (a mask in `bitlaws.models.attention.attend`),
which computes exactly the kept rows' values (rows are independent except through attention) with shapes that
never depend on the mask, so one compiled program serves every masking ratio of the sampler. `forward_mae_encoder` gathers the kept rows
(stable argsort) to give upstream's ``[B, buffer + #unmasked, D]``.

Decoder: ``decoder_embed`` -> the kept rows in a grid of ``mask_token`` (masked positions) ->
``+ decoder_pos_embed`` -> Blocks -> ``decoder_norm`` -> drop the buffer rows -> ``+ diffusion_pos_embed`` = z.

Parameter names follow the upstream state dict (``encoder_blocks.{i}.attn.qkv`` ...); every linear layer is
a `QLinear` (the diffusion head's too), so quantization rules apply unchanged.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bitlaws.models import attention, dit
from bitlaws.models.mar_diffloss import LayerNorm, SimpleMLPAdaLN
from bitlaws.quant.layers import QLinear

NORM_EPS = 1e-6


class Attention(dit.Attention):
    """timm ``Attention`` (DiT's layer: fused qkv with bias, heads ``(3, H, hd)``, scale ``hd**-0.5``), key mask."""

    def __call__(self, x: jax.Array, keep: Optional[jax.Array] = None) -> jax.Array:
        """``x [B, N, D]``, ``keep [B, N]`` bool (False: the row is not attended to) -> ``[B, N, D]``."""
        b, n, d = x.shape
        head_dim = d // self.num_heads
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, head_dim)  # q, k, v: each [B, N, H, hd]
        mask = None if keep is None else keep[:, None, None, :]  # [B, 1, 1, N]
        out = attention.attend(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], scale=head_dim**-0.5, mask=mask,
                               impl=self.attention_impl)  # [B, N, H, hd]
        return self.proj(out.reshape(b, n, d))


class Mlp(dit.Mlp):
    """timm ``Mlp``: fc1 -> exact (erf) GELU -> fc2 (DiT's layer uses the tanh approximation)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class Block(nnx.Module):
    """timm ``Block`` (pre-norm): ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, *, eps: float, rngs: nnx.Rngs):
        self.norm1 = LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, rngs=rngs)
        self.norm2 = LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), rngs=rngs)

    def __call__(self, x: jax.Array, keep: Optional[jax.Array] = None) -> jax.Array:
        """``[B, N, D] -> [B, N, D]`` (`keep` as in `Attention`)."""
        x = x + self.attn(self.norm1(x), keep)
        return x + self.mlp(self.norm2(x))


def _learned(shape: tuple[int, ...], rngs: nnx.Rngs) -> nnx.Param:
    return nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), shape))


class MAR(nnx.Module):
    """MAR transformer plus its diffusion head ``diffloss`` (upstream constructor argument names).

    Args:
        img_size: Image side in pixels.
        vae_stride: VAE downsampling factor.
        patch_size: Latent pixels per token side p.
        encoder_embed_dim, encoder_depth, encoder_num_heads: Encoder width D, blocks, heads.
        decoder_embed_dim, decoder_depth, decoder_num_heads: Decoder width, blocks, heads.
        mlp_ratio: MLP hidden size / width.
        vae_embed_dim: Latent channels C (tokens have ``C * p * p`` features).
        mask_ratio_min: Lower end of the training masking-ratio distribution (metadata for training).
        label_drop_prob: Probability of replacing the class embedding by ``fake_latent`` in training.
        class_num: Rows of the class-embedding table.
        attn_dropout, proj_dropout: Training dropout rates (not applied: this port runs in eval mode).
        buffer_size: Class-embedding rows prepended to the encoder sequence.
        diffloss_d, diffloss_w: Depth and width of the diffusion MLP.
        num_sampling_steps: Respacing of the sampling diffusion (``"100"``; metadata for the sampler).
        diffusion_batch_mul: Training repeats of each token for the diffusion loss (metadata).
        grad_checkpointing: Accepted for upstream compatibility (no effect).
        norm_eps: LayerNorm eps of the blocks and the encoder/decoder norms (released builders: 1e-6).
        rngs: NNX RNG streams for initialisation (ported weights overwrite everything).

    Raises:
        ValueError: naming a bad argument.
    """

    def __init__(self, *, img_size: int = 256, vae_stride: int = 16, patch_size: int = 1,
                 encoder_embed_dim: int = 1024, encoder_depth: int = 16, encoder_num_heads: int = 16,
                 decoder_embed_dim: int = 1024, decoder_depth: int = 16, decoder_num_heads: int = 16,
                 mlp_ratio: float = 4.0, vae_embed_dim: int = 16, mask_ratio_min: float = 0.7,
                 label_drop_prob: float = 0.1, class_num: int = 1000, attn_dropout: float = 0.1,
                 proj_dropout: float = 0.1, buffer_size: int = 64, diffloss_d: int = 3, diffloss_w: int = 1024,
                 num_sampling_steps: str = "100", diffusion_batch_mul: int = 4, grad_checkpointing: bool = False,
                 norm_eps: float = NORM_EPS, rngs: nnx.Rngs):
        if img_size % (vae_stride * patch_size):
            raise ValueError(f"img_size: {img_size} is not divisible by vae_stride * patch_size = "
                             f"{vae_stride * patch_size}")
        if buffer_size < 0:
            raise ValueError(f"buffer_size: must be >= 0, got {buffer_size}")
        del attn_dropout, proj_dropout, grad_checkpointing  # eval-mode port
        self.img_size, self.vae_stride, self.patch_size = img_size, vae_stride, patch_size
        self.vae_embed_dim = vae_embed_dim
        self.seq_h = self.seq_w = img_size // vae_stride // patch_size
        self.seq_len = self.seq_h * self.seq_w
        self.token_embed_dim = vae_embed_dim * patch_size**2
        self.buffer_size = buffer_size
        self.num_classes = class_num
        self.label_drop_prob = label_drop_prob
        self.mask_ratio_min = mask_ratio_min
        self.num_sampling_steps = str(num_sampling_steps)
        self.diffusion_batch_mul = diffusion_batch_mul
        enc, dec, rows = encoder_embed_dim, decoder_embed_dim, self.seq_len + buffer_size

        self.class_emb = nnx.Embed(class_num, enc, rngs=rngs)
        self.fake_latent = _learned((1, enc), rngs)
        self.z_proj = QLinear(self.token_embed_dim, enc, rngs=rngs)
        self.z_proj_ln = LayerNorm(enc, eps=NORM_EPS)  # upstream hard-codes 1e-6 here
        self.encoder_pos_embed_learned = _learned((1, rows, enc), rngs)
        self.encoder_blocks = nnx.List([Block(enc, encoder_num_heads, mlp_ratio, eps=norm_eps, rngs=rngs)
                                        for _ in range(encoder_depth)])
        self.encoder_norm = LayerNorm(enc, eps=norm_eps)

        self.decoder_embed = QLinear(enc, dec, rngs=rngs)
        self.mask_token = _learned((1, 1, dec), rngs)
        self.decoder_pos_embed_learned = _learned((1, rows, dec), rngs)
        self.decoder_blocks = nnx.List([Block(dec, decoder_num_heads, mlp_ratio, eps=norm_eps, rngs=rngs)
                                        for _ in range(decoder_depth)])
        self.decoder_norm = LayerNorm(dec, eps=norm_eps)
        self.diffusion_pos_embed_learned = _learned((1, self.seq_len, dec), rngs)

        self.diffloss = SimpleMLPAdaLN(in_channels=self.token_embed_dim, model_channels=diffloss_w,
                                       out_channels=2 * self.token_embed_dim, z_channels=dec,
                                       num_res_blocks=diffloss_d, rngs=rngs)

    # ------------------------------------------------------------------ tokens

    def patchify(self, x: jax.Array) -> jax.Array:
        """Latents ``[B, H, W, C]`` (NHWC) -> tokens ``[B, (H/p)*(W/p), C*p*p]`` (features ``(c, p_row, p_col)``)."""
        b, h, w, c = x.shape
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"x: spatial size {h}x{w} is not divisible by patch_size={p}")
        x = x.reshape(b, h // p, p, w // p, p, c)
        x = jnp.einsum("nhpwqc->nhwcpq", x)
        return x.reshape(b, (h // p) * (w // p), c * p * p)

    def unpatchify(self, tokens: jax.Array) -> jax.Array:
        """Tokens ``[B, L, C*p*p]`` -> latents ``[B, h*p, w*p, C]`` (NHWC); the inverse of `patchify`."""
        b = tokens.shape[0]
        p, c, h, w = self.patch_size, self.vae_embed_dim, self.seq_h, self.seq_w
        x = tokens.reshape(b, h, w, c, p, p)
        x = jnp.einsum("nhwcpq->nhpwqc", x)
        return x.reshape(b, h * p, w * p, c)

    # ------------------------------------------------------------------ conditioning

    def class_embedding(self, labels: jax.Array) -> jax.Array:
        """``[B]`` int labels -> ``[B, D_enc]``."""
        return self.class_emb(labels)

    def uncond_embedding(self, batch: int) -> jax.Array:
        """``fake_latent`` repeated: ``[batch, D_enc]`` (the unconditional / dropped-label embedding)."""
        return jnp.broadcast_to(self.fake_latent[...], (batch, self.fake_latent.shape[-1]))

    def drop_labels(self, class_embedding: jax.Array, drop_rand: jax.Array) -> jax.Array:
        """Training label dropout as upstream: rows with ``drop_rand < label_drop_prob`` use ``fake_latent``.

        Args:
            class_embedding: ``[B, D_enc]``.
            drop_rand: ``[B]`` uniform draws (upstream ``torch.rand(B)``).
        """
        drop = (drop_rand < self.label_drop_prob).astype(class_embedding.dtype)[:, None]  # [B, 1]
        return drop * self.fake_latent[...] + (1 - drop) * class_embedding

    # ------------------------------------------------------------------ encoder / decoder

    def _keep(self, mask: jax.Array) -> jax.Array:
        """``mask [B, L]`` (1 = masked) -> ``[B, buffer + L]`` bool, True for rows the encoder keeps."""
        buffer = jnp.ones((mask.shape[0], self.buffer_size), bool)
        return jnp.concatenate([buffer, mask < 0.5], axis=1)

    def encode(self, tokens: jax.Array, mask: jax.Array, class_embedding: jax.Array) -> jax.Array:
        """The encoder on every row; masked rows take no part (their own outputs are meaningless).

        Args:
            tokens: ``[B, L, C*p*p]`` float32.
            mask: ``[B, L]`` float, 1 = masked.
            class_embedding: ``[B, D_enc]``.

        Returns:
            ``[B, buffer + L, D_enc]``; rows of masked positions are to be ignored.
        """
        x = self.z_proj(tokens)  # [B, L, D]
        b, _, d = x.shape
        buffer = jnp.broadcast_to(class_embedding[:, None, :].astype(x.dtype), (b, self.buffer_size, d))
        x = self.z_proj_ln(jnp.concatenate([buffer, x], axis=1) + self.encoder_pos_embed_learned[...])
        keep = self._keep(mask)
        for block in self.encoder_blocks:
            x = block(x, keep)
        return self.encoder_norm(x)

    def decode(self, encoded: jax.Array, mask: jax.Array) -> jax.Array:
        """The decoder from `encode`'s full-length output.

        Args:
            encoded: ``[B, buffer + L, D_enc]`` (masked rows ignored).
            mask: ``[B, L]`` float, 1 = masked.

        Returns:
            z ``[B, L, D_dec]`` float32: the diffusion head's conditioning for every position.
        """
        x = self.decoder_embed(encoded)
        x = jnp.where(self._keep(mask)[..., None], x, self.mask_token[...].astype(x.dtype))
        x = x + self.decoder_pos_embed_learned[...]
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_norm(x)[:, self.buffer_size:]
        return x + self.diffusion_pos_embed_learned[...]

    def __call__(self, tokens: jax.Array, mask: jax.Array, class_embedding: jax.Array) -> jax.Array:
        """z ``[B, L, D_dec]`` from tokens ``[B, L, C*p*p]``, mask ``[B, L]`` and class embedding ``[B, D_enc]``."""
        return self.decode(self.encode(tokens, mask, class_embedding), mask)

    def _kept_order(self, mask: jax.Array, num_masked: Optional[int]) -> tuple[jax.Array, int]:
        """Positions of the kept rows (ascending, stable argsort) ``[B, buffer + L - n]`` and the kept count."""
        if num_masked is None:
            counts = np.asarray(mask).sum(axis=1)  # needs a concrete mask
            if counts.size and not (counts == counts[0]).all():
                raise ValueError(f"mask: every row must mask the same number of tokens, got {counts.tolist()}")
            num_masked = int(round(float(counts[0]))) if counts.size else 0
        kept = self.buffer_size + self.seq_len - num_masked
        order = jnp.argsort(~self._keep(mask), axis=1, stable=True)[:, :kept]
        return order, kept

    def forward_mae_encoder(self, tokens: jax.Array, mask: jax.Array, class_embedding: jax.Array, *,
                            num_masked: Optional[int] = None) -> jax.Array:
        """Upstream's encoder output: only the kept rows, ``[B, buffer + L - num_masked, D_enc]``.

        Args:
            tokens, mask, class_embedding: As `encode`.
            num_masked: Masked tokens per row (the same for every row); None: read from a concrete `mask`.
        """
        order, _ = self._kept_order(mask, num_masked)
        return jnp.take_along_axis(self.encode(tokens, mask, class_embedding), order[..., None], axis=1)

    def forward_mae_decoder(self, encoded_kept: jax.Array, mask: jax.Array) -> jax.Array:
        """Upstream's decoder: kept rows ``[B, buffer + L - n, D_enc]`` scattered back -> z ``[B, L, D_dec]``."""
        b, kept, d = encoded_kept.shape
        order, _ = self._kept_order(mask, self.buffer_size + self.seq_len - kept)
        full = jnp.zeros((b, self.buffer_size + self.seq_len, d), encoded_kept.dtype)
        full = full.at[jnp.arange(b)[:, None], order].set(encoded_kept)
        return self.decode(full, mask)


def param_count(model: nnx.Module) -> int:
    """Number of parameters (`nnx.Param` elements) of a concrete or abstract (`nnx.eval_shape`) model."""
    return int(sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))))
