"""LlamaGen's class-conditional GPT (``autoregressive/models/gpt.py``, ``Transformer`` with ``model_type='c2i'``).

A Llama-style decoder over the raster-order tokens of the VQ tokenizer (`bitlaws.models.llamagen_vq`). The
sequence is ``[class embedding, tok_embeddings(tokens[:-1])]``; row i of the logits predicts token i. Upstream
behaviour reproduced (FoundationVision/LlamaGen commit ``ce98ec41``):

* pre-norm blocks ``h = x + wo(attn(RMSNorm(x)))``, ``out = h + w2(silu(w1 n) * w3 n)`` with ``n = RMSNorm(h)``;
  RMSNorm ``x * rsqrt(mean(x^2) + eps) * weight`` computed in float32; no biases anywhere; SwiGLU hidden width
  ``find_multiple(int(ffn_dim_multiplier * int(2 * 4 * dim / 3)), multiple_of)``;
* fused ``wqkv`` split q | k | v (``dim | n_kv_head*hd | n_kv_head*hd``); grouped-query attention when
  ``n_kv_head < n_head`` (query head j uses kv head ``j // (n_head // n_kv_head)``, upstream's
  ``repeat_interleave``); softmax scale ``1/sqrt(hd)``, causal;
* 2-D RoPE on interleaved pairs (``x[2i], x[2i+1]``) in float32: token t at ``(row, col) = (t // g, t % g)`` of the
  ``g x g`` grid gets the ``hd/2`` angles ``[row * f, col * f]`` with the ``hd/4`` frequencies
  ``f = 1 / base^(arange(0, hd/2, 2) / (hd/2))``; the class-token row of the table is all zeros (not cos 1,
  sin 0), so the class token's q and k are exactly zero;
* class table with ``num_classes + 1`` rows when ``class_dropout_prob > 0`` (null class = ``num_classes``).

The KV cache (`LlamaGen.empty_cache`, `LlamaGen.forward_cached`) keeps the ``n_kv_head`` heads (not the repeated
ones, unlike upstream's cache, which makes upstream's ``generate()`` fail for GQA). The RoPE table is recomputed,
never read from a checkpoint.
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
from bitlaws.models.dit import LabelEmbedder
from bitlaws.quant.layers import QLinear

KVCache = tuple[tuple[jax.Array, jax.Array], ...]
"""Per layer ``(k, v)``, each ``[B, capacity, n_kv_head, head_dim]`` float32 (k already rotated)."""


def find_multiple(n: int, k: int) -> int:
    """The smallest multiple of `k` that is >= `n` (upstream ``find_multiple``)."""
    return n if n % k == 0 else n + k - n % k


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: Optional[float] = None) -> int:
    """SwiGLU hidden width: ``find_multiple(int(m * int(2 * 4 * dim / 3)), multiple_of)`` (m only when given)."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return find_multiple(hidden, multiple_of)


@functools.lru_cache(maxsize=None)
def rope_table_2d(grid_size: int, head_dim: int, base: float = 10000.0, cls_token_num: int = 1) -> np.ndarray:
    """Upstream ``precompute_freqs_cis_2d``: the (cos, sin) of every token's rotation angles.

    Args:
        grid_size: g (the token map is g x g).
        head_dim: hd (a multiple of 4).
        base: RoPE base.
        cls_token_num: Leading all-zero rows (class tokens).

    Returns:
        ``[cls_token_num + g*g, hd/2, 2]`` float32 (read-only); ``[..., 0]`` cos, ``[..., 1]`` sin.
    """
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs head_dim divisible by 4, got head_dim={head_dim}")
    half = head_dim // 2
    exponents = np.arange(0, half, 2, dtype=np.float32)[: half // 2] / np.float32(half)
    freqs = (np.float32(1.0) / np.power(np.float32(base), exponents)).astype(np.float32)  # [hd/4]
    t = np.arange(grid_size, dtype=np.float32)
    angles_1d = np.outer(t, freqs).astype(np.float32)  # [g, hd/4]
    rows = np.broadcast_to(angles_1d[:, None, :], (grid_size, grid_size, half // 2))
    cols = np.broadcast_to(angles_1d[None, :, :], (grid_size, grid_size, half // 2))
    angles = np.concatenate([rows, cols], axis=-1).reshape(grid_size * grid_size, half)  # [g*g, hd/2]
    table = np.stack([np.cos(angles), np.sin(angles)], axis=-1).astype(np.float32)  # [g*g, hd/2, 2]
    table = np.concatenate([np.zeros((cls_token_num, half, 2), np.float32), table])
    table.setflags(write=False)
    return table


def apply_rotary(x: jax.Array, table: jax.Array) -> jax.Array:
    """Rotates interleaved pairs ``(x[2i], x[2i+1])`` in float32.

    Args:
        x: ``[B, L, H, hd]``.
        table: ``[L, hd/2, 2]`` (cos, sin) rows of the tokens' positions.

    Returns:
        ``[B, L, H, hd]`` in the dtype of `x`.
    """
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)  # [B, L, H, hd/2, 2]
    cos, sin = table[None, :, None, :, 0], table[None, :, None, :, 1]  # [1, L, 1, hd/2]
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = jnp.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)


class RMSNorm(nnx.Module):
    """``x * rsqrt(mean(x^2) + eps) * weight``, normalised in float32 (upstream ``RMSNorm``)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[..., dim] -> [..., dim]``."""
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return normed.astype(x.dtype) * self.weight[...]


class FeedForward(nnx.Module):
    """SwiGLU ``w2(silu(w1 x) * w3 x)`` without biases."""

    def __init__(self, dim: int, hidden_dim: int, *, rngs: nnx.Rngs):
        self.w1 = QLinear(dim, hidden_dim, use_bias=False, rngs=rngs)
        self.w3 = QLinear(dim, hidden_dim, use_bias=False, rngs=rngs)
        self.w2 = QLinear(hidden_dim, dim, use_bias=False, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[..., dim] -> [..., dim]``."""
        return self.w2(jax.nn.silu(self.w1(x)) * self.w3(x))


class Attention(nnx.Module):
    """Causal multi-head (or grouped-query) attention with a fused ``wqkv`` and 2-D RoPE.

    Args:
        dim: Model width (``n_head * head_dim``).
        n_head: Query heads H.
        n_kv_head: Key/value heads (divides H).
        rngs: NNX RNG streams.
    """

    def __init__(self, dim: int, n_head: int, n_kv_head: int, *, rngs: nnx.Rngs):
        self.dim = dim
        self.n_head = n_head
        self.n_kv_head = n_kv_head
        self.head_dim = dim // n_head
        self.attention_impl = attention.DEFAULT  # `bitlaws.models.attention.set_attention` changes it
        self.wqkv = QLinear(dim, (n_head + 2 * n_kv_head) * self.head_dim, use_bias=False, rngs=rngs)
        self.wo = QLinear(dim, dim, use_bias=False, rngs=rngs)

    def qkv(self, x: jax.Array, table: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Rotated queries ``[B, l, H, hd]`` and keys / values ``[B, l, KV, hd]`` of ``x [B, l, dim]``."""
        b, l, _ = x.shape
        kv = self.n_kv_head * self.head_dim
        fused = self.wqkv(x)  # [B, l, dim + 2 kv]
        q = fused[..., :self.dim].reshape(b, l, self.n_head, self.head_dim)
        k = fused[..., self.dim:self.dim + kv].reshape(b, l, self.n_kv_head, self.head_dim)
        v = fused[..., self.dim + kv:].reshape(b, l, self.n_kv_head, self.head_dim)
        return apply_rotary(q, table), apply_rotary(k, table), v

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, visible: jax.Array, *,
               heads_first: bool = False) -> jax.Array:
        """Softmax attention with kv heads shared by groups of query heads.

        Args:
            q: ``[B, l, H, hd]``.
            k, v: ``[B, m, KV, hd]`` (``[B, KV, m, hd]`` with `heads_first`: the KV cache's layout).
            visible: bool ``[l, m]``: which keys each query sees.

        Returns:
            ``[B, l, dim]`` (before ``wo``).
        """
        b, l = q.shape[:2]
        out = attention.attend(q, k, v, scale=1.0 / math.sqrt(self.head_dim), mask=visible,
                               impl=self.attention_impl, heads_first=heads_first)  # [B, l, H, hd]
        return out.reshape(b, l, self.dim)

    def __call__(self, x: jax.Array, table: jax.Array) -> jax.Array:
        """Causal self-attention over ``x [B, L, dim]`` with RoPE rows ``table [L, hd/2, 2]``; ``[B, L, dim]``."""
        q, k, v = self.qkv(x, table)
        length = x.shape[1]
        causal = np.tril(np.ones((length, length), bool))
        return self.wo(self.attend(q, k, v, causal))

    def cached(self, x: jax.Array, table: jax.Array, cache: tuple[jax.Array, jax.Array],
               pos: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """Attention of ``l`` new tokens at positions ``pos .. pos+l-1`` through a fixed-capacity KV cache.

        Args:
            x: ``[B, l, dim]``.
            table: ``[l, hd/2, 2]`` RoPE rows of the new positions.
            cache: ``(k, v)`` each heads-first ``[B, KV, capacity, hd]``.
            pos: int32 scalar (may be traced): position of the first new token.

        Returns:
            ``(out [B, l, dim], updated cache)``.
        """
        q, k, v = self.qkv(x, table)
        keys = jax.lax.dynamic_update_slice_in_dim(cache[0], jnp.swapaxes(k, 1, 2).astype(cache[0].dtype), pos, axis=2)
        values = jax.lax.dynamic_update_slice_in_dim(cache[1], jnp.swapaxes(v, 1, 2).astype(cache[1].dtype), pos,
                                                     axis=2)
        query_pos = pos + jnp.arange(x.shape[1])  # [l]
        visible = jnp.arange(keys.shape[2])[None, :] <= query_pos[:, None]  # [l, capacity]
        return self.wo(self.attend(q, keys, values, visible, heads_first=True)), (keys, values)


class TransformerBlock(nnx.Module):
    """Pre-norm attention and SwiGLU FFN, each with a residual."""

    def __init__(self, dim: int, n_head: int, n_kv_head: int, hidden_dim: int, norm_eps: float, *,
                 rngs: nnx.Rngs):
        self.attention_norm = RMSNorm(dim, norm_eps)
        self.attention = Attention(dim, n_head, n_kv_head, rngs=rngs)
        self.ffn_norm = RMSNorm(dim, norm_eps)
        self.feed_forward = FeedForward(dim, hidden_dim, rngs=rngs)

    def __call__(self, x: jax.Array, table: jax.Array) -> jax.Array:
        """``[B, L, dim] -> [B, L, dim]``."""
        h = x + self.attention(self.attention_norm(x), table)
        return h + self.feed_forward(self.ffn_norm(h))

    def cached(self, x: jax.Array, table: jax.Array, cache: tuple[jax.Array, jax.Array],
               pos: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """The block on new tokens through the KV cache (see `Attention.cached`)."""
        attended, cache = self.attention.cached(self.attention_norm(x), table, cache, pos)
        h = x + attended
        return h + self.feed_forward(self.ffn_norm(h)), cache


class LlamaGen(nnx.Module):
    """LlamaGen's class-conditional GPT (upstream ``Transformer(ModelArgs(...))`` with ``model_type='c2i'``).

    Keyword arguments are upstream's ``ModelArgs`` fields; the dropout rates, ``initializer_range``,
    ``caption_dim``, ``max_batch_size`` and ``max_seq_len`` are training/allocation settings and are accepted
    and ignored (the model is inference-only; the KV cache is sized by `empty_cache`).

    Args:
        dim: Width D.
        n_layer: Blocks.
        n_head: Query heads (divides D).
        n_kv_head: Key/value heads (None: ``n_head``; must divide ``n_head``).
        multiple_of, ffn_dim_multiplier: SwiGLU width (see `ffn_hidden_dim`).
        rope_base: RoPE base.
        norm_eps: RMSNorm eps.
        num_classes: Classes; the null class (CFG) is ``num_classes``.
        class_dropout_prob: > 0 adds the null-class row to the class table.
        model_type: Only ``'c2i'``.
        vocab_size: Tokenizer codebook size V.
        cls_token_num: Class tokens (only 1 for c2i).
        block_size: Image tokens L = g*g (g the token grid side).
        rngs: NNX RNG streams (``params``).
    """

    def __init__(self, *, dim: int = 4096, n_layer: int = 32, n_head: int = 32, n_kv_head: Optional[int] = None,
                 multiple_of: int = 256, ffn_dim_multiplier: Optional[float] = None, rope_base: float = 10000,
                 norm_eps: float = 1e-5, initializer_range: float = 0.02, token_dropout_p: float = 0.1,
                 attn_dropout_p: float = 0.0, resid_dropout_p: float = 0.1, ffn_dropout_p: float = 0.1,
                 drop_path_rate: float = 0.0, num_classes: int = 1000, caption_dim: int = 2048,
                 class_dropout_prob: float = 0.1, model_type: str = "c2i", vocab_size: int = 16384,
                 cls_token_num: int = 1, block_size: int = 256, max_batch_size: int = 32, max_seq_len: int = 2048,
                 rngs: nnx.Rngs):
        del initializer_range, token_dropout_p, attn_dropout_p, resid_dropout_p, ffn_dropout_p, drop_path_rate
        del caption_dim, max_batch_size, max_seq_len
        n_kv_head = n_head if n_kv_head is None else n_kv_head
        if model_type != "c2i":
            raise ValueError(f"model_type={model_type!r}: only the class-conditional 'c2i' GPT is implemented")
        if cls_token_num != 1:
            raise ValueError(f"cls_token_num={cls_token_num}: a c2i model has one class token")
        if dim % n_head:
            raise ValueError(f"dim={dim} is not divisible by n_head={n_head}")
        if n_kv_head <= 0 or n_head % n_kv_head:
            raise ValueError(f"n_kv_head={n_kv_head} must divide n_head={n_head}")
        grid = math.isqrt(block_size)
        if grid * grid != block_size:
            raise ValueError(f"block_size={block_size} must be a square (g*g image tokens)")
        self.dim, self.n_layer, self.n_head, self.n_kv_head = dim, n_layer, n_head, n_kv_head
        self.head_dim = dim // n_head
        self.vocab_size = vocab_size
        self.num_classes = num_classes
        self.block_size = block_size
        self.rope_base = float(rope_base)
        self.hidden_dim = ffn_hidden_dim(dim, multiple_of, ffn_dim_multiplier)
        rope_table_2d(grid, self.head_dim, self.rope_base, 1)  # validates head_dim
        self.cls_embedding = LabelEmbedder(num_classes, dim, class_dropout_prob, rngs=rngs)
        self.tok_embeddings = nnx.Embed(vocab_size, dim, rngs=rngs)
        self.layers = nnx.List([TransformerBlock(dim, n_head, n_kv_head, self.hidden_dim, norm_eps, rngs=rngs)
                                for _ in range(n_layer)])
        self.norm = RMSNorm(dim, norm_eps)
        self.output = QLinear(dim, vocab_size, use_bias=False, rngs=rngs)

    @property
    def null_class(self) -> int:
        """The label of the unconditional (CFG) class."""
        return self.num_classes

    def freqs_cis(self) -> np.ndarray:
        """The RoPE table ``[1 + block_size, hd/2, 2]`` float32 (upstream's ``freqs_cis`` buffer)."""
        return rope_table_2d(math.isqrt(self.block_size), self.head_dim, self.rope_base, 1)

    def logits(self, h: jax.Array) -> jax.Array:
        """Final norm and ``output``: ``[B, l, D] -> [B, l, V]`` float32."""
        return self.output(self.norm(h)).astype(jnp.float32)

    def embed(self, tokens: jax.Array, labels: jax.Array) -> jax.Array:
        """The input sequence ``[class embedding, tok_embeddings(tokens[:, :-1])]``: ``[B, L, D]``."""
        classes = self.cls_embedding(labels)[:, None, :]  # [B, 1, D]
        return jnp.concatenate([classes, self.tok_embeddings(tokens[:, :-1])], axis=1)

    def __call__(self, tokens: jax.Array, labels: jax.Array) -> jax.Array:
        """Teacher-forced logits.

        Args:
            tokens: int ``[B, L]`` image tokens (raster order), ``1 <= L <= block_size``; the last one is not fed.
            labels: int ``[B]`` class labels (``num_classes`` = null class).

        Returns:
            ``[B, L, V]`` float32: row i predicts ``tokens[:, i]`` (row 0 from the class token alone).
        """
        if tokens.ndim != 2 or not 1 <= tokens.shape[1] <= self.block_size:
            raise ValueError(f"tokens must be [B, L] with 1 <= L <= block_size={self.block_size}, "
                             f"got shape {tuple(tokens.shape)}")
        h = self.embed(tokens, labels)  # [B, L, D]
        table = jnp.asarray(self.freqs_cis()[:h.shape[1]])
        for layer in self.layers:
            h = layer(h, table)
        return self.logits(h)

    def empty_cache(self, batch: int, capacity: Optional[int] = None) -> KVCache:
        """Zeroed KV buffers for `forward_cached`: per layer heads-first ``[batch, n_kv_head, capacity, hd]`` float32.

        Args:
            batch: Rows (2B with CFG).
            capacity: Positions held (default ``1 + block_size``: the class token and every image token).
        """
        capacity = 1 + self.block_size if capacity is None else capacity
        shape = (batch, self.n_kv_head, capacity, self.head_dim)
        return tuple((jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32)) for _ in self.layers)

    def forward_cached(self, h: jax.Array, cache: KVCache, pos: jax.Array) -> tuple[jax.Array, KVCache]:
        """Runs ``l`` new input embeddings at positions ``pos .. pos+l-1`` through the KV cache.

        Args:
            h: ``[B, l, D]`` input embeddings (the class embedding at position 0, tokens after).
            cache: From `empty_cache` (or a previous call).
            pos: int32 scalar (may be traced).

        Returns:
            ``(logits [B, l, V] float32, updated cache)``.
        """
        table = jax.lax.dynamic_slice_in_dim(jnp.asarray(self.freqs_cis()), pos, h.shape[1], axis=0)
        new_cache = []
        for layer, layer_cache in zip(self.layers, cache):
            h, layer_cache = layer.cached(h, table, layer_cache, pos)
            new_cache.append(layer_cache)
        return self.logits(h), tuple(new_cache)

    def prefill(self, labels: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """The class token at position 0: ``labels [B]`` -> ``(logits [B, V], cache)`` (predicts token 0)."""
        logits, cache = self.forward_cached(self.cls_embedding(labels)[:, None, :], cache, jnp.int32(0))
        return logits[:, 0], cache

    def decode_step(self, token: jax.Array, cache: KVCache, index: jax.Array) -> tuple[jax.Array, KVCache]:
        """Feeds image token `index` (at position ``index + 1``): ``token [B]`` -> ``(logits [B, V], cache)``.

        The logits predict token ``index + 1``.
        """
        logits, cache = self.forward_cached(self.tok_embeddings(token)[:, None, :], cache, index + 1)
        return logits[:, 0], cache


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean token cross-entropy (upstream's ``targets`` loss): ``[B, L, V]``, int ``[B, L]`` -> scalar float32."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32), axis=-1)
    return -jnp.mean(picked)
