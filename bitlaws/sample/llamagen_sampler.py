"""LlamaGen class-conditional generation with classifier-free guidance (upstream ``autoregressive/models/generate.py``).

With ``cfg_scale > 1`` the batch is ``[cond; null]`` (null label ``num_classes``); the class token is prefilled at
position 0, then each step feeds the last sampled token to **both** halves through the KV cache. Per step:

* guided logits ``uncond + (cond - uncond) * cfg_scale`` (float32, upstream's operand order); with
  ``cfg_interval > -1`` decode step ``i`` (0-based, after the prefill) uses the conditional logits alone once
  ``i > cfg_interval`` (the prefill is always guided);
* ``logits / max(temperature, 1e-5)``; top-k (``top_k > 0``: logits below the k-th largest -> -inf, ties at the
  threshold kept); top-p (``top_p < 1``: the HuggingFace rule on the top-k survivors: sorted descending, a token
  is kept when the probability mass before it is <= ``top_p``; the first always; ties at the threshold kept);
  softmax;
* the token is ``argmax(probs / q)`` with ``q ~ Exp(1)`` (the exponential race CPU ``torch.multinomial`` runs:
  with the ``q`` it drew, given as `exp_noise`, the tokens are reproduced exactly), or ``argmax(probs)`` with
  ``sample_logits=False``.

The whole loop (prefill and a `jax.lax.scan` over the decode steps) is one compiled program per model
structure, batch and sampling setting.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from bitlaws.models.llamagen import LlamaGen
from bitlaws.sample.filtering import largest_accepted_key, mask_top_k_top_p, ordered_keys
from bitlaws.xla_options import COMPILER_OPTIONS


class LlamaGenSamples(NamedTuple):
    """Generation output.

    Attributes:
        tokens: int32 ``[B, N]`` generated tokens (raster order).
        guided_logits: ``[B, N, V]`` float32 logits fed to the sampling step (after CFG, before temperature),
            or None unless ``return_logits``.
        probs: ``[B, N, V]`` float32 sampling probabilities (after temperature / top-k / top-p), or None.
        cond_logits: ``[B, N, V]`` float32 raw logits of the conditional half, or None.
        uncond_logits: ``[B, N, V]`` float32 raw logits of the null-class half (None without CFG or logits).
    """

    tokens: jax.Array
    guided_logits: Optional[jax.Array] = None
    probs: Optional[jax.Array] = None
    cond_logits: Optional[jax.Array] = None
    uncond_logits: Optional[jax.Array] = None


def mask_top_p(logits: jax.Array, top_p: float) -> jax.Array:
    """Nucleus filtering with upstream's (HuggingFace) rule; ``top_p >= 1`` leaves `logits` unchanged.

    Sorted descending, token i is kept when the cumulative probability of the tokens before it is <= ``top_p``
    (the largest is always kept); the kept set is the logits at or above the last kept one's value: the largest
    ``t`` whose mass at or above exceeds ``top_p``, found without a sort (`filtering.largest_accepted_key`).

    Args:
        logits: ``[..., V]`` float32 (may hold -inf).
        top_p: Nucleus mass.

    Returns:
        ``[..., V]`` with the removed logits set to -inf.
    """
    if top_p >= 1.0:
        return logits
    keys = ordered_keys(logits)  # [..., V]
    probs = jax.nn.softmax(logits, axis=-1)
    limit = jnp.float32(top_p)
    threshold = largest_accepted_key(
        lambda t: jnp.sum(jnp.where(keys >= t, probs, 0.0), axis=-1, keepdims=True) > limit,
        logits.shape[:-1] + (1,))
    return jnp.where(keys >= threshold, logits, -jnp.inf)


def sampling_probs(logits: jax.Array, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Upstream ``sample``'s probabilities: temperature, top-k, top-p, softmax. ``[..., V] -> [..., V]`` float32."""
    logits = logits / max(float(temperature), 1e-5)
    if top_k > 0:
        logits = mask_top_k_top_p(logits, top_k, 0.0)
    return jax.nn.softmax(mask_top_p(logits, top_p), axis=-1)


def pick_tokens(probs: jax.Array, exp_noise: Optional[jax.Array]) -> jax.Array:
    """``argmax(probs / exp_noise)`` (a multinomial draw), or ``argmax(probs)`` without noise: ``[B, V] -> [B]``."""
    scores = probs if exp_noise is None else probs / exp_noise
    return jnp.argmax(scores, axis=-1).astype(jnp.int32)


def _check(model: LlamaGen, labels, num_tokens: int, top_k: int, top_p: float, exp_noise, forced_tokens) -> None:
    if labels.ndim != 1:
        raise ValueError(f"labels must be [B], got shape {tuple(labels.shape)}")
    if not 1 <= num_tokens <= model.block_size:
        raise ValueError(f"max_new_tokens={num_tokens} must be in [1, block_size={model.block_size}]")
    if top_k < 0:
        raise ValueError(f"top_k={top_k} must be >= 0 (0: off)")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1] (1: off)")
    expected = (labels.shape[0], num_tokens, model.vocab_size)
    if exp_noise is not None and tuple(exp_noise.shape) != expected:
        raise ValueError(f"exp_noise must have shape [B, N, V] = {expected}, got {tuple(exp_noise.shape)}")
    if forced_tokens is not None and tuple(forced_tokens.shape) != expected[:2]:
        raise ValueError(f"forced_tokens must have shape [B, N] = {expected[:2]}, got {tuple(forced_tokens.shape)}")


@functools.partial(jax.jit, static_argnames=("graphdef", "num_tokens", "cfg_scale", "cfg_interval", "temperature",
                                             "top_k", "top_p", "sample_logits", "return_logits"),
                   compiler_options=COMPILER_OPTIONS)
def _generate(graphdef: nnx.GraphDef, state: nnx.State, labels: jax.Array, key: jax.Array,
              exp_noise: Optional[jax.Array], forced_tokens: Optional[jax.Array], *, num_tokens: int,
              cfg_scale: float, cfg_interval: int, temperature: float, top_k: int, top_p: float,
              sample_logits: bool, return_logits: bool) -> LlamaGenSamples:
    model = nnx.merge(graphdef, state)
    batch = labels.shape[0]
    cfg = cfg_scale > 1.0
    rows = jnp.concatenate([labels, jnp.full_like(labels, model.null_class)]) if cfg else labels  # [R]

    def step(raw: jax.Array, guided_on, index):
        """Raw logits ``[R, V]`` of step `index` -> (token [B], records)."""
        cond = raw[:batch]
        uncond = raw[batch:] if cfg else cond
        guided = jnp.where(guided_on, uncond + (cond - uncond) * cfg_scale, cond) if cfg else cond
        probs = sampling_probs(guided, temperature, top_k, top_p)  # [B, V]
        noise = None
        if sample_logits:
            noise = (exp_noise[:, index] if exp_noise is not None
                     else jax.random.exponential(jax.random.fold_in(key, index), probs.shape, jnp.float32))
        token = pick_tokens(probs, noise)
        records = (guided, probs, cond, uncond) if return_logits else ()
        return token, records

    cache = model.empty_cache(rows.shape[0])
    raw, cache = model.prefill(rows, cache)
    token, first = step(raw, True, 0)
    fed = token if forced_tokens is None else forced_tokens[:, 0]

    def body(carry, index):
        cache, fed = carry
        raw, cache = model.decode_step(jnp.concatenate([fed, fed]) if cfg else fed, cache, index - 1)
        guided_on = True if cfg_interval <= -1 else (index - 1) <= cfg_interval
        token, records = step(raw, guided_on, index)
        nxt = token if forced_tokens is None else forced_tokens[:, index]
        return (cache, nxt), (token, records)

    _, (tokens, records) = jax.lax.scan(body, (cache, fed), jnp.arange(1, num_tokens))
    tokens = jnp.concatenate([token[:, None], jnp.moveaxis(tokens, 0, 1)], axis=1)  # [B, N]
    if not return_logits:
        return LlamaGenSamples(tokens)
    stacked = [jnp.concatenate([f[:, None], jnp.moveaxis(r, 0, 1)], axis=1) for f, r in zip(first, records)]
    guided, probs, cond, uncond = stacked
    return LlamaGenSamples(tokens, guided, probs, cond, uncond if cfg else None)


def generate(model: LlamaGen, labels: jax.Array, key: Optional[jax.Array] = None, *,
             max_new_tokens: Optional[int] = None, cfg_scale: float = 1.0, cfg_interval: int = -1,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, sample_logits: bool = True,
             exp_noise: Optional[jax.Array] = None, forced_tokens: Optional[jax.Array] = None,
             return_logits: bool = False) -> LlamaGenSamples:
    """Generates image tokens (upstream ``generate(model, cond, max_new_tokens, cfg_scale=..., ...)``).

    Args:
        model: The GPT.
        labels: int ``[B]`` class labels.
        key: PRNG key of the Exp(1) draws (needed when sampling without `exp_noise`).
        max_new_tokens: N (default: ``block_size``).
        cfg_scale: Guidance; > 1 runs the ``[cond; null]`` batch.
        cfg_interval: -1: always guided; else decode steps after this index use the conditional logits.
        temperature, top_k, top_p: Sampling settings (``top_k=0`` / ``top_p=1``: off).
        sample_logits: False: ``argmax(probs)`` (no randomness).
        exp_noise: ``[B, N, V]`` float32 Exp(1) variates to use instead of drawing them from `key`.
        forced_tokens: int ``[B, N]``: feed these tokens instead of the sampled ones (the KV-cache path
            teacher-forced, to check per-step logits against a recorded run); the sampled ones are returned.
        return_logits: Also return the per-step guided logits, probabilities and raw logits.

    Returns:
        `LlamaGenSamples` (tokens int32 ``[B, N]``).

    Raises:
        ValueError: a bad shape or setting (the argument is named).
    """
    labels = jnp.asarray(labels, jnp.int32)
    num_tokens = model.block_size if max_new_tokens is None else int(max_new_tokens)
    _check(model, labels, num_tokens, int(top_k), float(top_p), exp_noise, forced_tokens)
    if sample_logits and exp_noise is None and key is None:
        raise ValueError("key is required to sample (sample_logits=True) without exp_noise")
    key = jax.random.key(0) if key is None else key
    exp_noise = None if exp_noise is None or not sample_logits else jnp.asarray(exp_noise, jnp.float32)
    forced_tokens = None if forced_tokens is None else jnp.asarray(forced_tokens, jnp.int32)
    graphdef, state = nnx.split(model)
    return _generate(graphdef, state, labels, key, exp_noise, forced_tokens, num_tokens=num_tokens,
                     cfg_scale=float(cfg_scale), cfg_interval=int(cfg_interval), temperature=float(temperature),
                     top_k=int(top_k), top_p=float(top_p), sample_logits=bool(sample_logits),
                     return_logits=bool(return_logits))
