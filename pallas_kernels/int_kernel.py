"""W2/W3/W4/W8 x A16 matmul: packed integer weights with group (or channel) scales, dequantized in the kernel.

The `QArray` layout as it is (`dequant_matmul`): codes ``q - qmin`` packed along K (2-bit: 4 per byte, 3-bit:
8 per 3 bytes - the project's packing, no re-layout - 4-bit: 2 per byte), 8-bit weights as stored int8/uint8.
Decoded values ``q - z`` are exact in every activation dtype (|q - z| <= 255), f32 accumulation, the scale
applied per group of K (or per column at the end).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bitlaws.quant import formats
from bitlaws.quant.qarray import QArray
from pallas_kernels import common, dequant_matmul

SUPPORTED_BITS = (2, 3, 4, 8)
CONFIG = common.BlockConfig(block_m=16, block_n=64, block_k=128, num_warps=4, num_stages=3)


def supports(w) -> bool:
    """Whether `w` is a weight this kernel multiplies: a `QArray` of a 2/3/4/8-bit integer format with tensor,
    channel or group scales (groups a multiple of the smallest K step) and its reduction axes first."""
    if not (isinstance(w, QArray) and isinstance(w.format, formats.IntFormat) and w.format.bits in SUPPORTED_BITS
            and w.spec.granularity in ("tensor", "channel", "group")
            and w.reduce_axes == tuple(range(len(w.reduce_axes)))):
        return False
    return w.spec.granularity != "group" or \
        w.spec.group_size % dequant_matmul.block_k_floor(w.format.bits, w.format.bits < 8) == 0


def int_matmul_reference(x: jax.Array, w: QArray) -> jax.Array:
    """``x [M, K] @ dequantize(w) [K, N]`` in float32 (highest precision), returned in ``x.dtype``."""
    return dequant_matmul.reference(x, w)


def _check(x: jax.Array, w) -> None:
    if not (isinstance(w, QArray) and isinstance(w.format, formats.IntFormat) and w.format.bits in SUPPORTED_BITS):
        raise ValueError(f"int_matmul: unsupported weight {w!r}; it needs an int/uint {SUPPORTED_BITS}-bit QArray "
                         f"with tensor, channel or group scales and its reduction axes first")
    dequant_matmul.check_x("int_matmul", x, w)


def int_matmul_kernel(x: jax.Array, w: QArray, *, config: common.BlockConfig = CONFIG,
                      interpret: bool = False) -> jax.Array:
    """The Pallas kernel itself (no platform dispatch): Triton on GPU, or the interpreter with `interpret`."""
    _check(x, w)
    fmt = w.format
    packed = fmt.bits < 8
    qmin = fmt.qmin

    def decode(codes):  # [rows, bn] int32 -> q as f32 (sub-byte codes are q - qmin; 8-bit storage is q)
        return (codes + qmin).astype(jnp.float32) if packed else codes.astype(jnp.int32).astype(jnp.float32)

    return dequant_matmul.call(x, w, decode=decode, bits=fmt.bits, packed=packed,
                               group_size=w.spec.group_size if w.spec.granularity == "group" else None,
                               config=config, name=f"w{fmt.bits}a16_matmul", interpret=interpret)


def int_matmul(x: jax.Array, w: QArray, *, config: common.BlockConfig = CONFIG, interpret: bool = False) -> jax.Array:
    """``x @ w`` for a packed 2/3/4/8-bit integer weight, dequantized in the kernel.

    Args:
        x: ``[M, K]`` bf16 / fp16 / fp32 activations.
        w: `QArray` of a ``[K, N]`` kernel (or a kernel whose reduction axes come first), int/uint 2/3/4/8 bits,
            tensor / channel / group scales (zero points for ``uint``).
        config: Tuning config (blocks are shrunk to divide the shapes where possible).
        interpret: Run the Pallas interpreter (any platform; tests). Otherwise the Triton kernel on CUDA and
            `int_matmul_reference` elsewhere, chosen when the program is lowered (`common.on_platform`).

    Returns:
        ``[M, N]`` in ``x.dtype``.

    Raises:
        ValueError: an unsupported weight (named), a group size the kernel cannot step through, or ``x``'s K
            differing from the weight's.
    """
    _check(x, w)
    return dequant_matmul.dispatch(lambda x_, w_, interpret: int_matmul_kernel(x_, w_, config=config,
                                                                               interpret=interpret),
                                   x, w, interpret=interpret)
