"""VAR (Visual AutoRegressive modelling, next-scale prediction) transformer in Flax NNX.

A GPT-style decoder over the multi-scale token maps of the VAR tokenizer (`bitlaws.models.vqvae.VQVAE`).
The sequence is all scales concatenated (scale order, row-major inside a scale), ``L = sum(pn**2)``
tokens. Token 0..first_l-1 is the class embedding (start of sequence); the tokens of scale k+1 are the
``word_embed``-ed cumulative tokenizer feature map f_hat, area-downsampled to ``pn[k+1]``. Every block is
conditioned on the class embedding by adaptive LayerNorm.

Upstream behaviour reproduced (FoundationVision/VAR ``models/var.py``, ``models/basic_var.py``):

* AdaLN block: ``ada_lin = SiLU -> Linear(C, 6C)`` chunked as (gamma1, gamma2, scale1, scale2, shift1,
  shift2); ``x += attn(LN(x) * (1 + scale1) + shift1) * gamma1``; ``x += ffn(LN(x) * (1 + scale2) +
  shift2) * gamma2``; LayerNorm without affine parameters.
* Attention: ``mat_qkv`` without bias plus the bias ``(q_bias, 0, v_bias)``; with ``attn_l2_norm`` q and
  k are L2-normalised per head, q is multiplied by ``exp(min(scale_mul_1H11, ln 100))`` and the softmax
  scale is 1, otherwise it is ``0.25 / sqrt(head_dim)``.
* Teacher forcing uses the block-causal mask (a token sees its own and every earlier scale).
* Head: ``head(LN(x) * (1 + scale) + shift)`` with (scale, shift) from ``head_nm.ada_lin``.

The tokenizer is not part of this module's state: the sampler (`bitlaws.sample.var_sampler`) takes it
as a separate argument. Only its vocabulary size and channel count (``Cvae``) are needed here.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bitlaws.models import attention
from bitlaws.models.common import layer_norm
from bitlaws.quant.layers import QLinear

KVCache = tuple[tuple[jax.Array, jax.Array], ...]
"""Per block ``(k, v)``, each ``[B, l_seen, H, head_dim]`` float32 (k already L2-normalised)."""

MAX_SCALE_MUL = float(np.log(np.float32(100.0)))  # upstream: torch.log(torch.tensor(100)).item()


@functools.lru_cache(maxsize=None)
def scale_layout(patch_nums: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The scale index of every token and the teacher-forcing mask.

    Args:
        patch_nums: Side length of each scale's token map.

    Returns:
        ``(level [L] int32, attn_bias [L, L] float32)``: ``attn_bias[i, j]`` is 0 where query token i may
        attend to key token j (``level[j] <= level[i]``) and -inf elsewhere.
    """
    level = np.concatenate([np.full(pn * pn, i, np.int32) for i, pn in enumerate(patch_nums)])  # [L]
    allowed = level[:, None] >= level[None, :]  # [L, L]
    bias = np.where(allowed, np.float32(0.0), np.float32(-np.inf)).astype(np.float32)
    level.setflags(write=False)
    bias.setflags(write=False)
    return level, bias


def scale_bounds(patch_nums: Sequence[int]) -> list[tuple[int, int]]:
    """``[(begin, end)]`` token offsets of each scale in the concatenated sequence."""
    bounds, begin = [], 0
    for pn in patch_nums:
        bounds.append((begin, begin + pn * pn))
        begin += pn * pn
    return bounds


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """``x / max(||x||, eps)`` over the last axis (PyTorch ``F.normalize``)."""
    norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    return x / jnp.maximum(norm, eps)


def dropout(x: jax.Array, rate: float, key: Optional[jax.Array]) -> jax.Array:
    """Inverted dropout; identity when `key` is None or `rate` is 0."""
    if key is None or rate <= 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0)


def drop_path(x: jax.Array, rate: float, key: Optional[jax.Array]) -> jax.Array:
    """Stochastic depth: drops the whole residual branch per sample (``x`` is ``[B, ...]``)."""
    if key is None or rate <= 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(keep, x / (1.0 - rate), 0.0)


def _split(key: Optional[jax.Array], n: int) -> list[Optional[jax.Array]]:
    return [None] * n if key is None else list(jax.random.split(key, n))


def var_ctor_kwargs(var_ctor: Mapping[str, Any], vqvae_ctor: Optional[Mapping[str, Any]] = None) -> dict:
    """VAR keyword arguments from upstream-style constructor dicts (e.g. a fixture manifest's ``ctor``).

    Drops ``cls`` and ``vae_local`` (upstream passes the tokenizer object; we keep it out of the model)
    and, given the tokenizer's constructor dict, fills ``vocab_size`` and ``Cvae`` (= ``z_channels``).

    Args:
        var_ctor: ``models.var.VAR`` keyword arguments.
        vqvae_ctor: ``models.vqvae.VQVAE`` keyword arguments, or None to leave the sizes to the caller.

    Returns:
        Keyword arguments for `VAR` (without ``rngs``).
    """
    kwargs = {k: v for k, v in var_ctor.items() if k not in ("cls", "vae_local")}
    if "patch_nums" in kwargs:
        kwargs["patch_nums"] = tuple(int(p) for p in kwargs["patch_nums"])
    if vqvae_ctor is not None:
        kwargs.setdefault("vocab_size", int(vqvae_ctor["vocab_size"]))
        kwargs.setdefault("Cvae", int(vqvae_ctor["z_channels"]))
    return kwargs


class SelfAttention(nnx.Module):
    """Multi-head self-attention with VAR's qkv bias layout, optional L2-normalised q/k and a KV cache.

    Args:
        embed_dim: C.
        num_heads: H (divides C).
        attn_drop_rate: Dropout on attention probabilities (training only).
        proj_drop_rate: Dropout after the output projection (training only).
        attn_l2_norm: Cosine attention with a learned per-head temperature.
        rngs: NNX RNG streams.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, attn_drop_rate: float = 0.0,
                 proj_drop_rate: float = 0.0, attn_l2_norm: bool = True, rngs: nnx.Rngs):
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.attn_l2_norm = attn_l2_norm
        self.attn_drop_rate = attn_drop_rate
        self.proj_drop_rate = proj_drop_rate
        self.attention_impl = attention.DEFAULT  # `bitlaws.models.attention.set_attention` changes it
        if attn_l2_norm:
            self.scale_mul_1H11 = nnx.Param(jnp.full((1, num_heads, 1, 1), math.log(4.0), jnp.float32))
        self.mat_qkv = QLinear(embed_dim, 3 * embed_dim, use_bias=False, rngs=rngs)
        self.q_bias = nnx.Param(jnp.zeros((embed_dim,), jnp.float32))
        self.v_bias = nnx.Param(jnp.zeros((embed_dim,), jnp.float32))
        self.proj = QLinear(embed_dim, embed_dim, rngs=rngs)

    @property
    def softmax_scale(self) -> float:
        return 1.0 if self.attn_l2_norm else 0.25 / math.sqrt(self.head_dim)

    def __call__(self, x: jax.Array, *, attn_bias: Optional[np.ndarray] = None,
                 cache: Optional[tuple[jax.Array, jax.Array]] = None,
                 cache_at: Optional[tuple[jax.Array, jax.Array]] = None, kv_extent: Optional[int] = None,
                 key: Optional[jax.Array] = None) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """Attends the new tokens to the cached ones and themselves.

        Args:
            x: ``[B, l, C]`` float32 new tokens.
            attn_bias: ``[l, l_total]`` additive mask (0 / -inf), or None for full attention.
            cache: Fixed-capacity ``(k, v)`` buffers, each heads-first ``[B, H, capacity, hd]`` (`VAR.empty_cache`: the
                layout the attention matmuls read without a transpose of the whole buffer), with
                `cache_at`; or None (no cache: attend to `x` only).
            cache_at: ``(offset, valid)`` int32 scalars (traced): write this call's k/v at row `offset` of
                `cache` and attend to its first ``offset + valid`` rows only. Rows of `x` past `valid` are
                padding (they are written too; later calls overwrite them, no query sees them).
            kv_extent: Static bound ``>= offset + valid`` (with a cache): attention reads only the first
                `kv_extent` rows of the buffers (the sampler passes the last row its padded-length group can
                see, so early scales do not score the whole capacity). None: the whole capacity.
            key: PRNG key enabling dropout (training), or None.

        Returns:
            ``(out [B, l, C], (k, v))``: this call's keys and values ``[B, l, H, hd]``, or the updated buffers
            ``[B, H, capacity, hd]`` with a cache.

        Raises:
            ValueError: `cache` without `cache_at` or the reverse.
        """
        if (cache is None) != (cache_at is None):
            raise ValueError("SelfAttention: cache and cache_at go together (fixed-capacity buffers from "
                             "VAR.empty_cache and the (offset, valid) of this call)")
        b, l, c = x.shape
        zero_k_bias = jnp.zeros_like(self.q_bias[...])
        qkv_bias = jnp.concatenate([self.q_bias[...], zero_k_bias, self.v_bias[...]])  # [3C]
        qkv = (self.mat_qkv(x) + qkv_bias).reshape(b, l, 3, self.num_heads, self.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, l, H, hd] each
        if self.attn_l2_norm:
            scale_mul = jnp.exp(jnp.minimum(self.scale_mul_1H11[...], MAX_SCALE_MUL))  # [1, H, 1, 1]
            q = l2_normalize(q) * scale_mul.reshape(1, 1, self.num_heads, 1)
            k = l2_normalize(k)
        heads_first = cache is not None
        if heads_first:
            offset, valid = cache_at
            k = jax.lax.dynamic_update_slice_in_dim(cache[0], jnp.swapaxes(k, 1, 2), offset, axis=2)  # [B, H, cap, hd]
            v = jax.lax.dynamic_update_slice_in_dim(cache[1], jnp.swapaxes(v, 1, 2), offset, axis=2)
        mask = None if attn_bias is None else jnp.asarray(attn_bias) == 0  # [l, l_total] True: may attend
        keys, values = k, v
        if heads_first:
            if kv_extent is not None:
                keys, values = k[:, :, :kv_extent], v[:, :, :kv_extent]  # [B, H, extent, hd]
            visible = (jnp.arange(keys.shape[2]) < offset + valid)[None, :]  # [1, extent]
            mask = visible if mask is None else mask & visible
        attn_key, proj_key = _split(key, 2)
        if attn_key is not None and self.attn_drop_rate > 0:
            probs = attention.attention_probs(q, keys, scale=self.softmax_scale, mask=mask,
                                              heads_first=heads_first)  # [B, H, l, l_total]
            probs = dropout(probs, self.attn_drop_rate, attn_key)
            out = jnp.einsum("bhlm,bhmd->blhd" if heads_first else "bhlm,bmhd->blhd", probs, values)
        else:
            out = attention.attend(q, keys, values, scale=self.softmax_scale, mask=mask,
                                   impl=self.attention_impl, heads_first=heads_first)
        out = out.reshape(b, l, c)  # [B, l, C]
        return dropout(self.proj(out), self.proj_drop_rate, proj_key), (k, v)


class FFN(nnx.Module):
    """fc1 -> GELU (tanh approximation) -> fc2 -> dropout."""

    def __init__(self, embed_dim: int, hidden_dim: int, *, drop_rate: float = 0.0, rngs: nnx.Rngs):
        self.drop_rate = drop_rate
        self.fc1 = QLinear(embed_dim, hidden_dim, rngs=rngs)
        self.fc2 = QLinear(hidden_dim, embed_dim, rngs=rngs)

    def __call__(self, x: jax.Array, key: Optional[jax.Array] = None) -> jax.Array:
        """``[B, l, C] -> [B, l, C]``."""
        return dropout(self.fc2(jax.nn.gelu(self.fc1(x), approximate=True)), self.drop_rate, key)


class AdaLNSelfAttn(nnx.Module):
    """One transformer block with adaptive LayerNorm conditioning.

    Args:
        embed_dim: C.
        cond_dim: D, the conditioning width (= C in VAR).
        num_heads: H.
        mlp_ratio: FFN hidden width / C.
        drop_rate, attn_drop_rate, drop_path_rate: Training-time regularisation.
        norm_eps: LayerNorm epsilon.
        shared_aln: Use the model-wide `shared_ada_lin` output plus this block's ``ada_gss`` offset instead
            of an own ``ada_lin``.
        attn_l2_norm: See `SelfAttention`.
        rngs: NNX RNG streams.
    """

    def __init__(self, embed_dim: int, cond_dim: int, num_heads: int, *, mlp_ratio: float = 4.0,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 norm_eps: float = 1e-6, shared_aln: bool = False, attn_l2_norm: bool = True,
                 rngs: nnx.Rngs):
        self.embed_dim = embed_dim
        self.norm_eps = norm_eps
        self.shared_aln = shared_aln
        self.drop_path_rate = drop_path_rate
        self.attn = SelfAttention(embed_dim, num_heads, attn_drop_rate=attn_drop_rate,
                                  proj_drop_rate=drop_rate, attn_l2_norm=attn_l2_norm, rngs=rngs)
        self.ffn = FFN(embed_dim, round(embed_dim * mlp_ratio), drop_rate=drop_rate, rngs=rngs)
        if shared_aln:
            init = jax.random.normal(rngs.params(), (1, 1, 6, embed_dim), jnp.float32)
            self.ada_gss = nnx.Param(init / math.sqrt(embed_dim))
        else:
            self.ada_lin = QLinear(cond_dim, 6 * embed_dim, rngs=rngs)

    def modulation(self, cond: jax.Array) -> list[jax.Array]:
        """The six modulation tensors, each ``[B, 1, C]``.

        Args:
            cond: ``[B, D]`` class embedding, or with ``shared_aln`` the shared ``[B, 1, 6, C]`` output.

        Returns:
            ``[gamma1, gamma2, scale1, scale2, shift1, shift2]``.
        """
        if self.shared_aln:
            mod = self.ada_gss[...] + cond  # [B, 1, 6, C]
        else:
            mod = self.ada_lin(jax.nn.silu(cond)).reshape(-1, 1, 6, self.embed_dim)  # [B, 1, 6, C]
        return [mod[:, :, i] for i in range(6)]

    def __call__(self, x: jax.Array, cond: jax.Array, *, attn_bias: Optional[np.ndarray] = None,
                 cache: Optional[tuple[jax.Array, jax.Array]] = None,
                 cache_at: Optional[tuple[jax.Array, jax.Array]] = None, kv_extent: Optional[int] = None,
                 key: Optional[jax.Array] = None) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """``x [B, l, C]`` -> ``(x [B, l, C], (k, v))``; see `SelfAttention` for the cache and mask."""
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.modulation(cond)
        attn_key, ffn_key, path1_key, path2_key = _split(key, 4)
        h = layer_norm(x, self.norm_eps) * (scale1 + 1) + shift1
        h, kv = self.attn(h, attn_bias=attn_bias, cache=cache, cache_at=cache_at, kv_extent=kv_extent,
                          key=attn_key)
        x = x + drop_path(h * gamma1, self.drop_path_rate, path1_key)
        h = layer_norm(x, self.norm_eps) * (scale2 + 1) + shift2
        x = x + drop_path(self.ffn(h, ffn_key) * gamma2, self.drop_path_rate, path2_key)
        return x, kv


class AdaLNBeforeHead(nnx.Module):
    """``LN(x) * (1 + scale) + shift`` with (scale, shift) from ``SiLU -> Linear(D, 2C)``."""

    def __init__(self, embed_dim: int, cond_dim: int, *, norm_eps: float = 1e-6, rngs: nnx.Rngs):
        self.embed_dim = embed_dim
        self.norm_eps = norm_eps
        self.ada_lin = QLinear(cond_dim, 2 * embed_dim, rngs=rngs)

    def __call__(self, x: jax.Array, cond_BD: jax.Array) -> jax.Array:
        """``x [B, l, C]``, ``cond_BD [B, D]`` -> ``[B, l, C]``."""
        mod = self.ada_lin(jax.nn.silu(cond_BD)).reshape(-1, 1, 2, self.embed_dim)  # [B, 1, 2, C]
        scale, shift = mod[:, :, 0], mod[:, :, 1]
        return layer_norm(x, self.norm_eps) * (scale + 1) + shift


def _recomputed_in_backward(fn):
    """`fn` (array pytrees in, array out) whose backward pass recomputes its forward pass from the saved inputs.

    `jax.checkpoint`'s contract, kept on every backend: `jax.checkpoint` only guards its recomputation with
    optimization barriers, which XLA:CPU removes before CSE, so there the recomputation merged with the forward
    pass and every block's activations (the ``[B, H, L, L]`` attention matrices ...) stayed alive: no memory was
    saved (VAR-d16 QAT at batch 8: 25.2 GB of temporaries with it, 25.7 GB without). Here the recomputation's inputs
    depend on the cotangent (minus an exact +0 computed from one of its elements), so XLA can neither merge it
    with the forward pass nor run it before the backward pass reaches the block. Values and gradients are those
    of `fn` (``a - (+0) == a`` for every float, -0 and nan included). Reverse mode only (`jax.custom_vjp`).
    """

    @jax.custom_vjp
    def recomputed(*args):
        return fn(*args)

    def forward(*args):
        return fn(*args), args

    def backward(args, cotangent):
        leaf = jax.tree.leaves(cotangent)[0]
        first = leaf[(0,) * leaf.ndim]  # one element (an index, not a reshape: no gather of a sharded array)
        zero = (first != first).astype(jnp.float32) * 0.0  # +0.0 that XLA cannot constant-fold

        def tied(a):
            return a - zero.astype(a.dtype) if jnp.issubdtype(a.dtype, jnp.inexact) else a

        _, pullback = jax.vjp(fn, *jax.tree.map(tied, args))
        return pullback(cotangent)

    recomputed.defvjp(forward, backward)
    return recomputed


def _rematerialized(block: nnx.Module, x: jax.Array, cond: jax.Array, attn_bias, key) -> jax.Array:
    """``block(x, cond)[0]`` whose backward pass recomputes the block's activations (`_recomputed_in_backward`)."""
    graphdef, state = nnx.split(block)

    def run(state, x, cond, key):
        out, _ = nnx.merge(graphdef, state)(x, cond, attn_bias=attn_bias, key=key)
        return out

    return _recomputed_in_backward(run)(state, x, cond, key)


class VAR(nnx.Module):
    """The VAR transformer (upstream constructor arguments).

    Args:
        vae: A VQVAE-like object providing ``vocab_size`` and ``Cvae`` (or ``cvae``), or None (then pass
            both sizes).
            It is only read for its sizes and is not stored (use the sampler to generate images).
        vocab_size: V, tokenizer codebook size (overrides ``vae.vocab_size``).
        Cvae: Tokenizer latent channels (overrides ``vae.Cvae``).
        num_classes: Number of classes; the class table has one extra (unconditional) row.
        depth: Number of blocks.
        embed_dim: C.
        num_heads: H.
        mlp_ratio: FFN hidden width / C.
        drop_rate, attn_drop_rate, drop_path_rate: Training regularisation (drop path grows linearly
            from 0 to ``drop_path_rate`` over the blocks).
        norm_eps: LayerNorm epsilon.
        shared_aln: One AdaLN projection shared by all blocks (plus a per-block learned offset).
        cond_drop_rate: Probability of replacing the label by the unconditional class (training only).
        attn_l2_norm: Cosine attention (see `SelfAttention`).
        patch_nums: Token-map side length per scale.
        flash_if_available, fused_if_available: Accepted for upstream compatibility; ignored.
        rngs: NNX RNG streams (``params``).
    """

    def __init__(self, *, vae: Any = None, vocab_size: Optional[int] = None, Cvae: Optional[int] = None,
                 num_classes: int = 1000, depth: int = 16, embed_dim: int = 1024, num_heads: int = 16,
                 mlp_ratio: float = 4.0, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, norm_eps: float = 1e-6, shared_aln: bool = False,
                 cond_drop_rate: float = 0.1, attn_l2_norm: bool = True,
                 patch_nums: Sequence[int] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
                 flash_if_available: bool = True, fused_if_available: bool = True, rngs: nnx.Rngs):
        del flash_if_available, fused_if_available
        vocab_size = vocab_size if vocab_size is not None else getattr(vae, "vocab_size", None)
        if Cvae is None:
            Cvae = getattr(vae, "Cvae", getattr(vae, "cvae", None))
        if vocab_size is None or Cvae is None:
            raise ValueError("VAR needs vocab_size and Cvae: pass them or a tokenizer as `vae`")
        self.vocab_size, self.Cvae = int(vocab_size), int(Cvae)
        self.num_classes, self.depth = num_classes, depth
        self.embed_dim = self.cond_dim = embed_dim
        self.num_heads = num_heads
        self.norm_eps = norm_eps
        self.shared_aln = shared_aln
        self.cond_drop_rate = cond_drop_rate
        self.patch_nums = tuple(int(p) for p in patch_nums)
        # Training memory: recompute each block in the backward pass instead of keeping its activations (the
        # attention matrices alone are [B, H, L, L] per block). Off by default; QAT turns it on (``remat=True``).
        # The blocks must not mutate state under it (training and fake modes do not; calibration does).
        self.remat_blocks = False
        self.seq_len = sum(pn * pn for pn in self.patch_nums)
        self.first_l = self.patch_nums[0] ** 2

        init_std = math.sqrt(1.0 / embed_dim / 3.0)
        normal = nnx.initializers.truncated_normal(init_std)
        self.word_embed = QLinear(self.Cvae, embed_dim, rngs=rngs)
        self.class_emb = nnx.Param(normal(rngs.params(), (num_classes + 1, embed_dim), jnp.float32))
        self.pos_start = nnx.Param(normal(rngs.params(), (1, self.first_l, embed_dim), jnp.float32))
        self.pos_1LC = nnx.Param(normal(rngs.params(), (1, self.seq_len, embed_dim), jnp.float32))
        self.lvl_embed = nnx.Param(normal(rngs.params(), (len(self.patch_nums), embed_dim), jnp.float32))
        if shared_aln:
            self.shared_ada_lin = QLinear(self.cond_dim, 6 * embed_dim, rngs=rngs)
        path_rates = np.linspace(0.0, drop_path_rate, depth) if depth > 0 else []
        self.blocks = nnx.List([
            AdaLNSelfAttn(embed_dim, self.cond_dim, num_heads, mlp_ratio=mlp_ratio, drop_rate=drop_rate,
                          attn_drop_rate=attn_drop_rate, drop_path_rate=float(rate), norm_eps=norm_eps,
                          shared_aln=shared_aln, attn_l2_norm=attn_l2_norm, rngs=rngs)
            for rate in path_rates])
        self.head_nm = AdaLNBeforeHead(embed_dim, self.cond_dim, norm_eps=norm_eps, rngs=rngs)
        self.head = QLinear(embed_dim, self.vocab_size, rngs=rngs)

    # ----------------------------------------------------------------------------------- embeddings

    def lvl_pos(self) -> jax.Array:
        """``lvl_embed[level] + pos_1LC``: ``[1, L, C]`` added to every token."""
        level, _ = scale_layout(self.patch_nums)
        return self.lvl_embed[...][level][None] + self.pos_1LC[...]

    def class_embedding(self, label_B: jax.Array) -> jax.Array:
        """``label_B [B]`` int (``num_classes`` = unconditional) -> ``cond_BD [B, D]``."""
        return jnp.take(self.class_emb[...], jnp.asarray(label_B, jnp.int32), axis=0)

    def block_condition(self, cond_BD: jax.Array) -> jax.Array:
        """What the blocks receive: ``cond_BD`` itself, or the shared AdaLN output ``[B, 1, 6, C]``."""
        if not self.shared_aln:
            return cond_BD
        return self.shared_ada_lin(jax.nn.silu(cond_BD)).reshape(-1, 1, 6, self.embed_dim)

    # ----------------------------------------------------------------------------------- forward

    def get_logits(self, h_BlC: jax.Array, cond_BD: jax.Array) -> jax.Array:
        """``h [B, l, C]`` -> logits ``[B, l, V]`` float32."""
        return self.head(self.head_nm(h_BlC, cond_BD))

    def drop_labels(self, label_B: jax.Array, key: jax.Array) -> jax.Array:
        """Replaces each label by the unconditional class with probability ``cond_drop_rate``."""
        drop = jax.random.uniform(key, label_B.shape) < self.cond_drop_rate
        return jnp.where(drop, self.num_classes, label_B)

    def __call__(self, label_B: jax.Array, x_BLCv_wo_first_l: jax.Array, *,
                 key: Optional[jax.Array] = None) -> jax.Array:
        """Teacher-forced logits of every scale.

        Args:
            label_B: ``[B]`` int class labels.
            x_BLCv_wo_first_l: ``[B, L - first_l, Cvae]`` float32 inputs of scales 1.. (the tokenizer's
                ``idx_bl_to_var_input``).
            key: PRNG key for training: label dropout (``cond_drop_rate``), dropout and drop path. None
                (evaluation) makes the call deterministic.

        Returns:
            ``[B, L, V]`` float32 logits.
        """
        label_B = jnp.asarray(label_B, jnp.int32)
        label_key, *block_keys = _split(key, 1 + len(self.blocks))
        if label_key is not None and self.cond_drop_rate > 0:
            label_B = self.drop_labels(label_B, label_key)
        cond_BD = self.class_embedding(label_B)  # [B, D]
        b = x_BLCv_wo_first_l.shape[0]
        sos = jnp.broadcast_to(cond_BD[:, None, :], (b, self.first_l, self.embed_dim)) + self.pos_start[...]
        words = self.word_embed(x_BLCv_wo_first_l)  # [B, L - first_l, C]
        x = jnp.concatenate([sos, words], axis=1) + self.lvl_pos()  # [B, L, C]
        _, attn_bias = scale_layout(self.patch_nums)
        cond = self.block_condition(cond_BD)
        for block, block_key in zip(self.blocks, block_keys):
            if self.remat_blocks:
                x = _rematerialized(block, x, cond, attn_bias, block_key)
            else:
                x, _ = block(x, cond, attn_bias=attn_bias, key=block_key)
        return self.get_logits(x, cond_BD)

    def forward_cached(self, x_BlC: jax.Array, cond_BD: jax.Array, cache: Optional[KVCache] = None,
                       cache_at: Optional[tuple[jax.Array, jax.Array]] = None,
                       kv_extent: Optional[int] = None) -> tuple[jax.Array, KVCache]:
        """Runs the blocks on one scale's tokens with a KV cache (inference, no mask).

        Args:
            x_BlC: ``[B, l, C]`` the new scale's input tokens.
            cond_BD: ``[B, D]`` class embeddings.
            cache: Fixed-capacity buffers (`empty_cache`, then what the previous scale returned).
            cache_at: ``(offset, valid)`` of this scale: see `SelfAttention` (one program then serves every scale
                whose padded length is ``l``).
            kv_extent: Static number of cache rows attention reads (``>= offset + valid``; None: all).

        Returns:
            ``(h [B, l, C] final hidden states, cache including these tokens)``; feed ``h`` to `get_logits`.
        """
        cond = self.block_condition(cond_BD)
        new_cache = []
        for i, block in enumerate(self.blocks):
            x_BlC, kv = block(x_BlC, cond, cache=None if cache is None else cache[i], cache_at=cache_at,
                              kv_extent=kv_extent)
            new_cache.append(kv)
        return x_BlC, tuple(new_cache)

    def empty_cache(self, batch: int, capacity: int) -> KVCache:
        """Zero fixed-capacity KV buffers for `forward_cached` with ``cache_at``: per block ``(k, v)``, each
        heads-first ``[batch, H, capacity, head_dim]`` float32."""
        cache = []
        for block in self.blocks:
            shape = (batch, block.attn.num_heads, capacity, block.attn.head_dim)
            cache.append((jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.float32)))
        return tuple(cache)

    def padded_scale_tokens(self, f_BlCv: jax.Array, cond_BD: jax.Array, offset: jax.Array,
                            valid: jax.Array) -> jax.Array:
        """Input tokens of the scale starting at token `offset` (traced), padded by repeating its last token.

        Args:
            f_BlCv: ``[B, l, Cvae]`` the scale's downsampled tokenizer features, row-major, rows past `valid`
                repeating the last one (ignored at scale 0).
            cond_BD: ``[2B, D]`` class embeddings (cond half, then uncond half).
            offset: int32 first token of the scale (0: the first scale, class embedding + ``pos_start``).
            valid: int32 number of real tokens (``pn**2``), ``1 <= valid <= l``.

        Returns:
            ``[2B, l, C]``: ``class + pos_start + lvl/pos`` (scale 0) or ``word_embed(f) + lvl/pos`` for rows ``< valid``; every later
            row equals row ``valid - 1`` exactly (so per-tensor max/min activation scales are unchanged).
        """
        b, l, _ = f_BlCv.shape
        rows = jnp.minimum(jnp.arange(l), valid - 1)  # [l]: padding repeats the last real row
        lvl_pos = jnp.take(self.lvl_pos()[0], offset + rows, axis=0)[None]  # [1, l, C]
        start = cond_BD[:, None, :] + jnp.take(self.pos_start[...][0], jnp.minimum(rows, self.first_l - 1),
                                               axis=0)[None]  # [2B, l, C]
        embedded = self.word_embed(f_BlCv)  # [B, l, C]
        later = jnp.concatenate([embedded, embedded], axis=0) + lvl_pos  # [2B, l, C]
        return jnp.where(offset == 0, start + lvl_pos, later)
