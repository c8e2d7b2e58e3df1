"""Token filtering and draws shared by the autoregressive samplers (VAR, LlamaGen): top-k / top-p without a sort.

XLA:CPU runs `jax.lax.top_k` with indices and `jnp.argsort` as single-threaded full sorts of the vocabulary
(2.9 s of a VAR-d16 batch-8 sample's last scale). Both filters here keep the logits at or above one threshold
per row, found by a bitwise search over the float32 order (`ordered_keys`, `largest_accepted_key`): 32 counting
passes over the row, exact (`python benchmarks/top_k_top_p.py`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bitlaws.sample import draws


def ordered_keys(x: jax.Array) -> jax.Array:
    """uint32 keys with the order of the float32 values ``x`` (``-inf`` lowest, ``+inf`` highest; -0 < +0)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    negative = (bits >> 31) == 1
    return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def largest_accepted_key(accept, shape: tuple[int, ...]) -> jax.Array:
    """The largest uint32 ``t`` (per row) with ``accept(t)``, for a predicate true on a down-set containing 0.

    Builds ``t`` bit by bit from the top, 32 fixed steps (`jax.lax.fori_loop`): exact, no sort, one pass over the
    rows per step.

    Args:
        accept: ``[..., 1] uint32 -> [..., 1] bool``, monotone (true at ``t`` implies true below ``t``).
        shape: ``[..., 1]`` shape of the result.

    Returns:
        ``[..., 1]`` uint32.
    """
    def step(i, t):
        candidate = t | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
        return jnp.where(accept(candidate), candidate, t)

    return jax.lax.fori_loop(0, 32, step, jnp.zeros(shape, jnp.uint32))


def mask_top_k_top_p(logits: jax.Array, top_k: int = 0, top_p: float = 0.0) -> jax.Array:
    """Sets logits outside the top-k and the top-p nucleus to -inf (upstream order: top-k first).

    Both filters keep the logits at or above one threshold per row, found without sorting by a bitwise search
    over the float32 order (`largest_accepted_key`: 32 counting passes over the row). Top-k's threshold is the
    k-th largest logit (exact; ties with it kept). Top-p (over the top-k survivors, renormalised) applies
    upstream's rule - sort ascending, drop the tokens whose cumulative probability is <= ``1 - top_p``, never
    the largest - as: keep every logit ``v`` for which the probability of the logits ``<= v`` exceeds
    ``1 - top_p``; the threshold is the largest ``t`` whose mass strictly below is ``<= 1 - top_p``.
    `mask_top_k_top_p_reference` is the literal form (two sorts); they keep the same tokens except where the
    order of a float sum or exactly tied logits decide (a token whose cumulative mass equals ``1 - top_p`` to
    the last bit). The sort-based form spent 3 s of a VAR-d16 batch-8 sample's last scale in XLA:CPU's sort;
    this one ~0.2 s (docs/benchmarks.md).

    Args:
        logits: ``[..., V]`` float32.
        top_k: Keep the k largest (0: off; values above V act as V); ties with the k-th largest are kept.
        top_p: Nucleus mass (0: off).

    Returns:
        ``[..., V]`` masked logits.
    """
    vocab = logits.shape[-1]
    if top_k <= 0 and top_p <= 0:
        return logits
    keys = ordered_keys(logits)  # [..., V]
    shape = logits.shape[:-1] + (1,)
    threshold = jnp.zeros(shape, jnp.uint32)  # keep all
    if 0 < top_k < vocab:
        k = int(top_k)
        threshold = largest_accepted_key(lambda t: jnp.sum(keys >= t, axis=-1, keepdims=True) >= k, shape)
    if top_p > 0:
        probs = jax.nn.softmax(jnp.where(keys >= threshold, logits, -jnp.inf), axis=-1)  # top-k survivors
        limit = jnp.float32(1.0 - top_p)
        threshold = largest_accepted_key(
            lambda t: jnp.sum(jnp.where(keys < t, probs, 0.0), axis=-1, keepdims=True) <= limit, shape)
    return jnp.where(keys >= threshold, logits, -jnp.inf)


def mask_top_k_top_p_reference(logits: jax.Array, top_k: int = 0, top_p: float = 0.0) -> jax.Array:
    """The literal upstream masking (two full sorts): the reference `mask_top_k_top_p` is tested against.

    Top-k keeps every logit >= the k-th largest (ties kept). Top-p sorts the (already top-k masked) logits
    ascending, removes those whose cumulative softmax probability is <= 1 - top_p, and never removes the largest.
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
    return draws.categorical(key, masked), masked


def gumbel_softmax(key: jax.Array, logits: jax.Array, tau: float) -> jax.Array:
    """Soft Gumbel-softmax sample ``softmax((logits + g) / tau)``, ``g ~ Gumbel(0, 1)``; ``[..., V]``."""
    return jax.nn.softmax((logits + draws.gumbel(key, logits.shape, logits.dtype)) / tau, axis=-1)
