"""Scaled dot-product attention with a choice of implementation, shared by the models' attention layers.

=============================  ====================================================================================
implementation                 what runs
=============================  ====================================================================================
``"xla"`` (default)            two einsums and a float32 softmax, written out (bit-stable across JAX releases; the
                               parity fixtures were checked with it; the only one with attention dropout)
``"dot_product_attention"``    `jax.nn.dot_product_attention` with ``implementation=None``: JAX picks its fused
                               path where the backend has one (cuDNN flash attention on recent NVIDIA GPUs for
                               bf16/fp16 inputs) and its XLA path otherwise
``"cudnn"``                    `jax.nn.dot_product_attention(implementation="cudnn")`: cuDNN or an error
=============================  ====================================================================================

The implementation is a static attribute of each attention layer (``attention_impl``), chosen for a whole model
with `set_attention` (sampling configs: ``sampling.attention``); it changes which kernels run, not the maths:
the tests check every implementation available here against ``"xla"``.

KV caches are kept heads-first, ``[B, KV, capacity, hd]`` (``heads_first=True``): the ``"xla"`` path's two
batched matmuls then read the cache as it lies. A ``[B, capacity, KV, hd]`` cache made XLA transpose the whole
buffer twice per layer and call — on the 2-core CPU a third of a VAR-d16 scale's time (docs/benchmarks.md).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

IMPLEMENTATIONS = ("xla", "dot_product_attention", "cudnn")
DEFAULT = "xla"


def check_implementation(impl: str) -> str:
    """Returns `impl` if known, else raises a one-line ValueError listing the choices."""
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {impl!r} is not one of {', '.join(IMPLEMENTATIONS)}")
    return impl


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float, mask: Optional[jax.Array] = None,
           impl: str = DEFAULT, heads_first: bool = False) -> jax.Array:
    """``softmax(scale q k^T + mask) v`` per head.

    Args:
        q: ``[B, l, H, hd]`` queries.
        k, v: ``[B, m, KV, hd]`` keys and values (``[B, KV, m, hd]`` with `heads_first`); ``KV`` divides ``H``
            (grouped-query attention when smaller: query head ``j`` uses kv head ``j // (H / KV)``).
        scale: Multiplier of the logits.
        mask: Optional boolean ``[l, m]`` (or broadcastable to ``[B, H, l, m]``): True where a query may
            attend; every query needs at least one True.
        impl: One of `IMPLEMENTATIONS`.
        heads_first: `k` and `v` are ``[B, KV, m, hd]`` (the layout of the models' KV caches).

    Returns:
        ``[B, l, H, hd]`` in the dtype of `q`.
    """
    if impl == "xla":
        if not heads_first:
            k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
        return _attend_xla(q, k, v, scale=scale, mask=mask)
    check_implementation(impl)
    if heads_first:
        k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    if mask is not None:
        mask = jnp.broadcast_to(mask, (q.shape[0], q.shape[2], q.shape[1], k.shape[1]))
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale,
                                        implementation=None if impl == "dot_product_attention" else "cudnn")


def attention_probs(q: jax.Array, k: jax.Array, *, scale: float, mask: Optional[jax.Array] = None,
                    heads_first: bool = False) -> jax.Array:
    """The ``"xla"`` attention weights ``[B, H, l, m]`` float32 (for layers that apply dropout to them).

    ``q [B, l, H, hd]``; ``k [B, m, H, hd]`` (``[B, H, m, hd]`` with `heads_first`).
    """
    spec = "blhd,bhmd->bhlm" if heads_first else "blhd,bmhd->bhlm"
    logits = jnp.einsum(spec, q * scale, k).astype(jnp.float32)  # [B, H, l, m]
    if mask is not None:
        logits = jnp.where(mask, logits, -jnp.inf)
    return jax.nn.softmax(logits, axis=-1)


def _attend_xla(q, k, v, *, scale, mask):
    """``q [B, l, H, hd]``, heads-first ``k, v [B, KV, m, hd]`` -> ``[B, l, H, hd]``."""
    heads, kv_heads = q.shape[2], k.shape[1]
    if heads % kv_heads:
        raise ValueError(f"attend: {kv_heads} key/value heads do not divide {heads} query heads")
    if kv_heads == heads:
        probs = attention_probs(q, k, scale=scale, mask=mask, heads_first=True)
        return jnp.einsum("bhlm,bhmd->blhd", probs.astype(v.dtype), v)  # [B, l, H, hd]
    b, l, _, d = q.shape
    grouped = q.reshape(b, l, kv_heads, heads // kv_heads, d)  # query head j = (j // rep, j % rep)
    logits = jnp.einsum("blgrd,bgmd->bgrlm", grouped * scale, k).astype(jnp.float32)  # [B, KV, rep, l, m]
    if mask is not None:
        logits = jnp.where(mask, logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bgrlm,bgmd->blgrd", probs.astype(v.dtype), v).reshape(b, l, heads, d)  # [B, l, H, hd]


def set_attention(model: nnx.Module, impl: str) -> int:
    """Sets ``attention_impl`` on every attention layer of `model` (in place); returns how many were set.

    Raises:
        ValueError: an unknown `impl`, or a model without attention layers that take the option.
    """
    check_implementation(impl)
    count = 0
    for _, module in nnx.iter_modules(model):
        if hasattr(module, "attention_impl"):
            module.attention_impl = impl
            count += 1
    if not count:
        raise ValueError(f"{type(model).__name__} has no attention layer with an attention_impl option")
    return count
