"""MXFP4 weight-only matmul: E2M1 elements, one E8M0 power-of-two scale per 32 values of K (OCP MX v1.0).

The `QArray` layout as it is: 4-bit codes ``sign << 3 | magnitude index`` packed two per byte along K, the
E8M0 exponents ``[K / 32, N]`` uint8 (decoded to f32 scales outside the kernel, an exact power of two per
block). The kernel decodes the magnitude index ``m`` arithmetically - ``m / 2`` for ``m < 2``, else
``(1 + (m & 1) / 2) * 2^((m >> 1) - 1)``, i.e. 0, 0.5, 1, 1.5, 2, 3, 4, 6 - (no table gather on the GPU),
multiplies in the activation dtype (all E2M1 values are exact there), accumulates in f32 and scales each
32-row block's partial sum (`dequant_matmul`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bitlaws.quant import formats
from bitlaws.quant.qarray import QArray
from pallas_kernels import common, dequant_matmul

CONFIG = common.BlockConfig(block_m=16, block_n=64, block_k=32, num_warps=4, num_stages=3)


def supports(w) -> bool:
    """A `QArray` of ``mxfp4`` (E2M1 elements, 32-value blocks along K), reduction axes first."""
    return (isinstance(w, QArray) and isinstance(w.format, formats.MxFormat) and w.format.element.name == "fp4_e2m1"
            and w.reduce_axes == tuple(range(len(w.reduce_axes))))


def decode_e2m1(codes: jax.Array) -> jax.Array:
    """4-bit E2M1 codes (int32) -> their values as f32: sign bit 3, magnitude index in bits 0-2."""
    m = codes & 7
    exponent = (m >> 1) - 1  # -1 for the subnormals m = 0, 1
    normal = (1.0 + 0.5 * (m & 1).astype(jnp.float32)) * (jnp.left_shift(1, jnp.maximum(exponent, 0))).astype(
        jnp.float32)
    magnitude = jnp.where(m < 2, 0.5 * m.astype(jnp.float32), normal)
    return jnp.where((codes & 8) != 0, -magnitude, magnitude)


def mxfp4_matmul_reference(x: jax.Array, w: QArray) -> jax.Array:
    """``x [M, K] @ dequantize(w) [K, N]`` in float32 (highest precision), returned in ``x.dtype``."""
    return dequant_matmul.reference(x, w)


def _check(x: jax.Array, w) -> None:
    if not supports(w):
        raise ValueError(f"mxfp4_matmul: unsupported weight {w!r}; it needs an mxfp4 QArray with its reduction "
                         f"axes first")
    dequant_matmul.check_x("mxfp4_matmul", x, w)


def mxfp4_matmul_kernel(x: jax.Array, w: QArray, *, config: common.BlockConfig = CONFIG,
                        interpret: bool = False) -> jax.Array:
    """The Pallas kernel itself (no platform dispatch)."""
    _check(x, w)
    return dequant_matmul.call(x, w, decode=decode_e2m1, bits=4, packed=True, group_size=w.format.block_size,
                               config=config, name="mxfp4_matmul", interpret=interpret)


def mxfp4_matmul(x: jax.Array, w: QArray, *, config: common.BlockConfig = CONFIG,
                 interpret: bool = False) -> jax.Array:
    """``x @ w`` for an MXFP4 weight (see the module docstring); ``[M, N]`` in ``x.dtype``.

    Raises:
        ValueError: an unsupported weight (named) or mismatched K.
    """
    _check(x, w)
    return dequant_matmul.dispatch(lambda x_, w_, interpret: mxfp4_matmul_kernel(x_, w_, config=config,
                                                                                 interpret=interpret),
                                   x, w, interpret=interpret)
