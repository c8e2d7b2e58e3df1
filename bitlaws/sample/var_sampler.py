"""VAR next-scale sampling with classifier-free guidance (upstream ``VAR.autoregressive_infer_cfg``).

For each scale ``si`` the transformer sees the new scale's tokens of a doubled batch ``[cond; uncond]``
(the unconditional half uses label ``num_classes``) and attends to every earlier token through a KV
cache. The guided logits are ``(1 + t) * cond - t * uncond`` with ``t = cfg * si / (SN - 1)`` (scale 0 is
unguided). Tokens are drawn after top-k / top-p masking; the chosen codes update the tokenizer's f_hat
(`VQVAE.get_next_autoregressive_input`), whose area-downsampled version, ``word_embed``-ed plus the
level/position embedding, is the next scale's input. The final f_hat is decoded to an image in [0, 1].

Each scale runs one jit-compiled step (one compilation per scale shape and sampling setting, cached
across calls).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bitlaws.models.var import VAR, KVCache


class VARSamples(NamedTuple):
    """Sampler output with the per-scale details.

    Attributes:
        images: ``[B, H, W, 3]`` float32 in [0, 1].
        tokens: Per scale int32 ``[B, pn*pn]`` sampled token indices (row-major).
        guided_logits: Per scale float32 ``[B, pn*pn, V]`` CFG-combined logits, before masking.
    """

    images: jax.Array
    tokens: list[jax.Array]
    guided_logits: list[jax.Array]


def mask_top_k_top_p(logits: jax.Array, top_k: int = 0, top_p: float = 0.0) -> jax.Array:
    """Sets logits outside the top-k and the top-p nucleus to -inf (upstream order: top-k first).

    Top-k keeps every logit >= the k-th largest (ties kept). Top-p sorts the (already top-k masked)
    logits ascending, removes those whose cumulative softmax probability is <= 1 - top_p, and never
    removes the largest.

    Args:
        logits: ``[..., V]`` float32.
        top_k: Keep the k largest (0: off; values above V act as V).
        top_p: Nucleus mass (0: off).

    Returns:
        ``[..., V]`` masked logits.
    """
    vocab = logits.shape[-1]
    if top_k > 0:
        kth_largest = jax.lax.top_k(logits, min(int(top_k), vocab))[0][..., -1:]  # [..., 1]
        logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
    if top_p > 0:
        order = jnp.argsort(logits, axis=-1)  # ascending
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        remove_sorted = cumulative <= (1.0 - top_p)
        remove_sorted = remove_sorted.at[..., -1].set(False)
        remove = jnp.take_along_axis(remove_sorted, jnp.argsort(order, axis=-1), axis=-1)
        logits = jnp.where(remove, -jnp.inf, logits)
    return logits


def sample_top_k_top_p(key: jax.Array, logits: jax.Array, top_k: int = 0,
                       top_p: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """Draws one token per position from the masked softmax.

    Args:
        key: PRNG key.
        logits: ``[..., V]`` float32.
        top_k, top_p: See `mask_top_k_top_p` (``top_k=1`` is the argmax).

    Returns:
        ``(tokens [...] int32, masked logits [..., V])``.
    """
    masked = mask_top_k_top_p(logits, top_k, top_p)
    return jax.random.categorical(key, masked, axis=-1).astype(jnp.int32), masked


def gumbel_softmax(key: jax.Array, logits: jax.Array, tau: float) -> jax.Array:
    """Soft Gumbel-softmax sample ``softmax((logits + g) / tau)``, ``g ~ Gumbel(0, 1)``; ``[..., V]``."""
    return jax.nn.softmax((logits + jax.random.gumbel(key, logits.shape, logits.dtype)) / tau, axis=-1)


def _guidance_weights(cfg: float, si: int, num_scales: int) -> jax.Array:
    """``[1 + t, t]`` float32 with ``t = cfg * si / (SN - 1)``, evaluated in float64 like upstream."""
    ratio = si / (num_scales - 1) if num_scales > 1 else 0.0
    t = cfg * ratio
    return jnp.asarray(np.array([1.0 + t, t], np.float32))


@functools.partial(jax.jit, static_argnames=("var_def", "vae_def", "si", "top_k", "top_p", "more_smooth"))
def _scale_step(var_def: nnx.GraphDef, var_state: nnx.State, vae_def: nnx.GraphDef, vae_state: nnx.State,
                x_BlC: jax.Array, cond_BD: jax.Array, cache: Optional[KVCache], f_hat: jax.Array,
                guidance: jax.Array, key: jax.Array, *, si: int, top_k: int, top_p: float,
                more_smooth: bool):
    """One scale of sampling.

    Args:
        var_def, var_state, vae_def, vae_state: The split transformer and tokenizer.
        x_BlC: ``[2B, l, C]`` this scale's input tokens (cond half, then uncond half).
        cond_BD: ``[2B, D]`` class embeddings.
        cache: KV cache of the earlier scales (None at scale 0).
        f_hat: ``[B, H, H, Cvae]`` cumulative tokenizer features.
        guidance: ``[2]`` float32 ``(1 + t, t)``.
        key: PRNG key of this scale.
        si: Scale index.
        top_k, top_p, more_smooth: Sampling settings.

    Returns:
        ``(guided logits [B, l, V], tokens [B, l], f_hat, next input [2B, l_next, C] or None, cache)``.
    """
    var = nnx.merge(var_def, var_state)
    vae = nnx.merge(vae_def, vae_state)
    num_scales = len(var.patch_nums)
    pn = var.patch_nums[si]
    batch = f_hat.shape[0]
    h_BlC, cache = var.forward_cached(x_BlC, cond_BD, cache)
    logits_2BlV = var.get_logits(h_BlC, cond_BD)  # [2B, l, V]
    guided = guidance[0] * logits_2BlV[:batch] - guidance[1] * logits_2BlV[batch:]  # [B, l, V]
    sample_key, gumbel_key = jax.random.split(key)
    tokens, masked = sample_top_k_top_p(sample_key, guided, top_k, top_p)  # [B, l]
    if more_smooth:
        ratio = si / (num_scales - 1) if num_scales > 1 else 0.0
        tau = max(0.27 * (1 - ratio * 0.95), 0.005)
        codebook = vae.embed(jnp.arange(var.vocab_size, dtype=jnp.int32)[None])[0]  # [V, Cvae]
        codes = gumbel_softmax(gumbel_key, masked * (1 + ratio), tau) @ codebook  # [B, l, Cvae]
    else:
        codes = vae.embed(tokens)  # [B, l, Cvae]
    h_map = codes.reshape(batch, pn, pn, var.Cvae)
    f_hat, next_map = vae.get_next_autoregressive_input(si, num_scales, f_hat, h_map)
    next_x = None
    if si != num_scales - 1:
        next_x = var.scale_tokens(next_map, si + 1)  # [B, l_next, C]
        next_x = jnp.concatenate([next_x, next_x], axis=0)  # [2B, l_next, C]
    return guided, tokens, f_hat, next_x, cache


@functools.partial(jax.jit, static_argnames=("var_def",))
def _start(var_def: nnx.GraphDef, var_state: nnx.State, labels_2B: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``labels [2B]`` -> ``(first-scale tokens [2B, first_l, C], cond_BD [2B, D])``."""
    var = nnx.merge(var_def, var_state)
    cond_BD = var.class_embedding(labels_2B)
    return var.start_tokens(cond_BD), cond_BD


@functools.partial(jax.jit, static_argnames=("vae_def",))
def _decode(vae_def: nnx.GraphDef, vae_state: nnx.State, f_hat: jax.Array) -> jax.Array:
    """``f_hat [B, h, w, Cvae]`` -> images ``[B, H, W, 3]`` in [0, 1]."""
    vae = nnx.merge(vae_def, vae_state)
    return (vae.fhat_to_img(f_hat) + 1.0) * 0.5


def _labels(var: VAR, batch: int, label_B: Union[None, int, Sequence[int], jax.Array],
            key: jax.Array) -> jax.Array:
    """Class labels ``[B]`` int32: given, one class for all (negative: unconditional) or uniform random."""
    if label_B is None:
        return jax.random.randint(key, (batch,), 0, var.num_classes, dtype=jnp.int32)
    if isinstance(label_B, int):
        return jnp.full((batch,), var.num_classes if label_B < 0 else label_B, jnp.int32)
    labels = jnp.asarray(label_B, jnp.int32).reshape(-1)
    if labels.shape[0] != batch:
        raise ValueError(f"label_B has {labels.shape[0]} labels for B={batch}")
    return labels


def autoregressive_infer_cfg(var: VAR, vae: Any, *, B: int, label_B: Union[None, int, Sequence[int], jax.Array],
                             key: jax.Array, cfg: float = 1.5, top_k: int = 0, top_p: float = 0.0,
                             more_smooth: bool = False,
                             return_logits: bool = False) -> Union[jax.Array, VARSamples]:
    """Generates class-conditional images with VAR (upstream ``autoregressive_infer_cfg``).

    Args:
        var: The transformer.
        vae: The tokenizer (`bitlaws.models.vqvae.VQVAE`); its ``v_patch_nums`` must equal
            ``var.patch_nums``.
        B: Number of images.
        label_B: ``[B]`` int class labels, one int for all (negative: unconditional), or None (uniform
            random classes drawn from `key`).
        key: PRNG key; the output is a deterministic function of it.
        cfg: Guidance strength (ramped linearly over the scales).
        top_k: Top-k sampling (0: off; 1: greedy).
        top_p: Nucleus sampling mass (0: off).
        more_smooth: Feed Gumbel-softmax-weighted code mixtures instead of the sampled codes (upstream's
            visual-quality option, not used for FID).
        return_logits: Also return the per-scale tokens and guided logits.

    Returns:
        ``[B, H, W, 3]`` float32 images in [0, 1], or a `VARSamples` when `return_logits`.
    """
    patch_nums = tuple(var.patch_nums)
    if tuple(getattr(vae, "v_patch_nums", patch_nums)) != patch_nums:
        raise ValueError(f"tokenizer patch numbers {tuple(vae.v_patch_nums)} != VAR's {patch_nums}")
    num_scales = len(patch_nums)
    label_key, *scale_keys = jax.random.split(key, num_scales + 1)
    labels = _labels(var, B, label_B, label_key)
    labels_2B = jnp.concatenate([labels, jnp.full_like(labels, var.num_classes)])  # [cond; uncond]

    var_def, var_state = nnx.split(var)
    vae_def, vae_state = nnx.split(vae)
    x_BlC, cond_BD = _start(var_def, var_state, labels_2B)
    side = patch_nums[-1]
    f_hat = jnp.zeros((B, side, side, var.Cvae), jnp.float32)
    cache = None
    tokens, guided_logits = [], []
    for si in range(num_scales):
        guided, idx, f_hat, x_BlC, cache = _scale_step(
            var_def, var_state, vae_def, vae_state, x_BlC, cond_BD, cache, f_hat,
            _guidance_weights(cfg, si, num_scales), scale_keys[si], si=si, top_k=int(top_k),
            top_p=float(top_p), more_smooth=bool(more_smooth))
        tokens.append(idx)
        guided_logits.append(guided)
    images = _decode(vae_def, vae_state, f_hat)
    if return_logits:
        return VARSamples(images, tokens, guided_logits)
    return images
