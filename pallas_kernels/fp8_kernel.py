"""fp8 (E4M3) weight-only matmul: float8 weights with per-channel (or group) scales, widened in the kernel.

The `QArray` stores E4M3 values as ``float8_e4m3fn`` ``[K, N]`` (one per byte, no packing); the kernel widens
each K step to f32 (exact), casts to the activation dtype (exact for fp16/fp32; bf16 has 8 significant bits
against E4M3's 4, so exact too), accumulates in f32 and applies the scales (`dequant_matmul`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bitlaws.quant import formats
from bitlaws.quant.qarray import QArray
from pallas_kernels import common, dequant_matmul

CONFIG = common.BlockConfig(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=3)


def supports(w) -> bool:
    """A `QArray` of ``fp8_e4m3`` with tensor, channel or group scales (groups of >= 16 rows), reduction axes
    first."""
    return (isinstance(w, QArray) and isinstance(w.format, formats.FpFormat) and w.format.name == "fp8_e4m3"
            and w.spec.granularity in ("tensor", "channel", "group")
            and (w.spec.granularity != "group" or w.spec.group_size % 16 == 0)
            and w.reduce_axes == tuple(range(len(w.reduce_axes))))


def fp8_matmul_reference(x: jax.Array, w: QArray) -> jax.Array:
    """``x [M, K] @ dequantize(w) [K, N]`` in float32 (highest precision), returned in ``x.dtype``."""
    return dequant_matmul.reference(x, w)


def _check(x: jax.Array, w) -> None:
    if not (isinstance(w, QArray) and getattr(w.format, "name", None) == "fp8_e4m3"):
        raise ValueError(f"fp8_matmul: unsupported weight {w!r}; it needs an fp8_e4m3 QArray")
    dequant_matmul.check_x("fp8_matmul", x, w)


def fp8_matmul_kernel(x: jax.Array, w: QArray, *, config: common.BlockConfig = CONFIG,
                      interpret: bool = False) -> jax.Array:
    """The Pallas kernel itself (no platform dispatch)."""
    _check(x, w)
    return dequant_matmul.call(x, w, decode=lambda stored: stored.astype(jnp.float32), bits=8, packed=False,
                               group_size=w.spec.group_size if w.spec.granularity == "group" else None,
                               config=config, name="fp8_e4m3_matmul", interpret=interpret)


def fp8_matmul(x: jax.Array, w: QArray, *, config: common.BlockConfig = CONFIG, interpret: bool = False) -> jax.Array:
    """``x @ w`` for an fp8 E4M3 weight (see the module docstring); ``[M, N]`` in ``x.dtype``.

    Raises:
        ValueError: an unsupported weight (named) or mismatched K.
    """
    _check(x, w)
    return dequant_matmul.dispatch(lambda x_, w_, interpret: fp8_matmul_kernel(x_, w_, config=config,
                                                                               interpret=interpret),
                                   x, w, interpret=interpret)
