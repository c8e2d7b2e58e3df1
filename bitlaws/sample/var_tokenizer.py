"""VAR's tokenizer step, one program for every scale: draw a scale's tokens, add their codes to f_hat, make the
next scale's input rows.

Upstream's step (`VQVAE.get_next_autoregressive_input` after the draw) has the scale in its shapes: ``pn**2``
logits rows, a ``pn x pn`` code map bicubic-upsampled to the ``S x S`` f_hat, the Phi conv of the scale, an area
downsample to the next ``pn``. Compiled per scale that was 10 programs for VAR-d16 (~0.6-1 s of XLA each on the
2-core CPU, most of it the top-k/top-p search and the Gumbel draw). Here every shape is the largest scale's and
the scale is data: `ScaleTables` holds, per scale, the number of real rows, index tables that move rows between
the row-major token layout and the ``S x S`` map, and the resampling matrices zero-padded to ``S x S`` (bicubic
``pn -> S``, identity at the last scale; area ``S -> pn_next``). Zero padding adds exact zeros, so values equal
the per-scale form up to the order XLA sums in.

Tokens are drawn in chunks of `chunk_rows` rows (a loop over the real rows only; chunk ``c`` draws from
``fold_in(key, c)``), so the largest scale's shape costs nothing at the small scales and the draws do not depend
on how much the transformer padded the scale.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bitlaws.models.vqvae import area_matrix, bicubic_matrix, resample
from bitlaws.sample.filtering import gumbel_softmax, sample_top_k_top_p

CHUNK_TARGET = 256
"""`chunk_rows` aims at about this many (batch x row) logits rows per drawn chunk."""


class ScaleTables(NamedTuple):
    """What makes the shared tokenizer program run scale ``si`` (host arrays, `scale_tables`).

    With ``S`` the last patch number (f_hat is ``S x S``) and ``L`` its square (every scale's padded row count):

    Attributes:
        valid: int32 ``pn**2``, this scale's real token rows.
        map_rows: int32 ``[S*S]``: for each position of the ``S x S`` map (row-major), the token row that
            holds it, or ``L`` (a zero row) outside the ``pn x pn`` corner.
        upsample: float32 ``[S, S]``: ``bicubic_matrix(pn, S)`` with zero columns past ``pn`` (the identity at
            the last scale, which upstream adds without resampling).
        phi: int32 index of the scale's Phi conv (`VectorQuantizer2.phi_index`).
        downsample: float32 ``[S, S]``: ``area_matrix(S, pn_next)`` with zero rows past ``pn_next`` (zeros at the
            last scale).
        next_rows: int32 ``[L]``: for each input row of the next scale, its map position (rows past
            ``pn_next**2`` repeat the last real one, as `VAR.padded_scale_tokens` expects).
        smooth_scale: float32 ``1 + si / (SN - 1)`` (``more_smooth``'s logit scale).
        smooth_tau: float32 ``max(0.27 (1 - 0.95 si / (SN - 1)), 0.005)`` (``more_smooth``'s temperature).
    """

    valid: np.ndarray
    map_rows: np.ndarray
    upsample: np.ndarray
    phi: np.ndarray
    downsample: np.ndarray
    next_rows: np.ndarray
    smooth_scale: np.ndarray
    smooth_tau: np.ndarray


def scale_ratio(si: int, num_scales: int) -> float:
    """``si / (SN - 1)`` (0 with one scale): the position of scale ``si`` that CFG and ``more_smooth`` ramp with."""
    return si / (num_scales - 1) if num_scales > 1 else 0.0


@functools.lru_cache(maxsize=256)
def _tables(patch_nums: tuple[int, ...], si: int, phi: int) -> ScaleTables:
    num_scales, side = len(patch_nums), patch_nums[-1]
    pn = patch_nums[si]
    last = si == num_scales - 1
    positions = np.arange(side * side)
    i, j = positions // side, positions % side
    map_rows = np.where((i < pn) & (j < pn), i * pn + j, side * side).astype(np.int32)
    downsample = np.zeros((side, side), np.float32)
    next_rows = np.zeros(side * side, np.int32)
    if last:
        upsample = np.eye(side, dtype=np.float32)
    else:
        upsample = np.zeros((side, side), np.float32)
        upsample[:, :pn] = bicubic_matrix(pn, side)
        nxt = patch_nums[si + 1]
        downsample[:nxt] = area_matrix(side, nxt)
        rows = np.minimum(np.arange(side * side), nxt * nxt - 1)
        next_rows = ((rows // nxt) * side + rows % nxt).astype(np.int32)
    ratio = scale_ratio(si, num_scales)
    tables = ScaleTables(valid=np.int32(pn * pn), map_rows=map_rows, upsample=upsample, phi=np.int32(phi),
                         downsample=downsample, next_rows=next_rows, smooth_scale=np.float32(1 + ratio),
                         smooth_tau=np.float32(max(0.27 * (1 - ratio * 0.95), 0.005)))
    for array in (map_rows, upsample, downsample, next_rows):
        array.setflags(write=False)
    return tables


def scale_tables(vae: Any, si: int) -> ScaleTables:
    """The `ScaleTables` of scale ``si`` of the tokenizer `vae` (cached; read-only arrays).

    `vae` is a `bitlaws.models.vqvae.VQVAE` or anything with its sampling interface: ``v_patch_nums``,
    ``embed``, ``phi_index``, ``phi_at`` (and ``fhat_to_img`` for the decode).
    """
    patch_nums = tuple(int(p) for p in vae.v_patch_nums)
    if not 0 <= si < len(patch_nums):
        raise ValueError(f"scale index {si} outside the tokenizer's {len(patch_nums)} scales")
    return _tables(patch_nums, int(si), int(vae.phi_index(si)))


def chunk_rows(length: int, batch: int) -> int:
    """Token rows per drawn chunk: the largest divisor of `length` with ``batch * rows <= CHUNK_TARGET`` (>= 1)."""
    target = max(1, CHUNK_TARGET // max(int(batch), 1))
    return max(d for d in range(1, int(length) + 1) if length % d == 0 and d <= target)


def draw_tokens(vae: Any, tables: ScaleTables, guided: jax.Array, key: jax.Array, *, top_k: int, top_p: float,
                more_smooth: bool, chunk: int) -> tuple[jax.Array, jax.Array]:
    """Draws the scale's tokens and their codes, chunk by chunk over the real rows.

    Args:
        vae: The tokenizer (`bitlaws.models.vqvae.VQVAE`).
        tables: The scale's `ScaleTables` (traced).
        guided: ``[B, L, V]`` float32 CFG-combined logits; rows past ``tables.valid`` are padding.
        key: PRNG key of the scale; chunk ``c`` draws from ``fold_in(key, c)``.
        top_k, top_p, more_smooth: Sampling settings (`bitlaws.sample.filtering`).
        chunk: Rows per chunk (`chunk_rows`), a divisor of ``L``.

    Returns:
        ``(tokens [B, L] int32, codes [B, L, Cvae] float32)``; rows past the last drawn chunk are zero, rows
        between ``valid`` and it are draws from padding rows (unused).
    """
    batch, length, vocab = guided.shape
    if length % chunk:
        raise ValueError(f"chunk of {chunk} rows does not divide the {length} logits rows")
    codebook = vae.embed(jnp.arange(vocab, dtype=jnp.int32)[None])[0] if more_smooth else None  # [V, Cvae]

    def body(c, carry):
        tokens, codes = carry
        start = c * chunk
        logits = jax.lax.dynamic_slice_in_dim(guided, start, chunk, axis=1)  # [B, chunk, V]
        sample_key, gumbel_key = jax.random.split(jax.random.fold_in(key, c))
        drawn, masked = sample_top_k_top_p(sample_key, logits, top_k, top_p)  # [B, chunk]
        if more_smooth:
            mixed = gumbel_softmax(gumbel_key, masked * tables.smooth_scale, tables.smooth_tau) @ codebook
        else:
            mixed = vae.embed(drawn)  # [B, chunk, Cvae]
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, drawn, start, axis=1)
        codes = jax.lax.dynamic_update_slice_in_dim(codes, mixed.astype(codes.dtype), start, axis=1)
        return tokens, codes

    num_chunks = (tables.valid + chunk - 1) // chunk
    channels = jax.eval_shape(vae.embed, jnp.zeros((1, 1), jnp.int32)).shape[-1]
    init = (jnp.zeros((batch, length), jnp.int32), jnp.zeros((batch, length, channels), jnp.float32))
    return jax.lax.fori_loop(0, num_chunks, body, init)


def update_f_hat(vae: Any, tables: ScaleTables, codes: jax.Array, f_hat: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Adds the scale's codes to f_hat and makes the next scale's input rows (upstream
    `get_next_autoregressive_input`, with the scale given by `tables`).

    Args:
        vae: The tokenizer.
        tables: The scale's `ScaleTables` (traced).
        codes: ``[B, L, Cvae]`` the scale's codes, row-major in its first ``valid`` rows.
        f_hat: ``[B, S, S, Cvae]`` cumulative features.

    Returns:
        ``(f_hat [B, S, S, Cvae], next rows [B, L, Cvae])`` (the rows are unused after the last scale).
    """
    batch, side, _, channels = f_hat.shape
    padded = jnp.concatenate([codes, jnp.zeros((batch, 1, channels), codes.dtype)], axis=1)  # row L: zeros
    h_map = jnp.take(padded, tables.map_rows, axis=1).reshape(batch, side, side, channels)
    f_hat = f_hat + vae.phi_at(tables.phi, resample(h_map, tables.upsample, tables.upsample))
    next_map = resample(f_hat, tables.downsample, tables.downsample).reshape(batch, side * side, channels)
    return f_hat, jnp.take(next_map, tables.next_rows, axis=1)


def tokenizer_step(vae: Any, tables: ScaleTables, guided: jax.Array, f_hat: jax.Array, key: jax.Array, *,
                   top_k: int, top_p: float, more_smooth: bool,
                   chunk: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`draw_tokens` then `update_f_hat`: ``(tokens [B, L], f_hat [B, S, S, Cvae], next rows [B, L, Cvae])``."""
    tokens, codes = draw_tokens(vae, tables, guided, key, top_k=top_k, top_p=top_p, more_smooth=more_smooth,
                                chunk=chunk)
    f_hat, rows = update_f_hat(vae, tables, codes, f_hat)
    return tokens, f_hat, rows

