"""W8A8 matmul: int8 activations x int8 weights -> int32, then per-token x per-channel scales.

``y[m, n] = s_x[m] * s_w[n] * sum_k xq[m, k] * wq[k, n]``: the integer sum is exact in int32 (|xq|, |wq| <= 127,
so K up to 2^31 / 127^2 = 133 143 terms), the scales are applied once per output in f32. Operands: the int8
codes of the activation with one float32 scale per row (`quantize_rows`: what the seam's fake quantization
computes, per token or per tensor) and a per-channel int8 `QArray` weight (``[K, N]`` view, stored as is).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from bitlaws.quant import calibrate, formats
from bitlaws.quant.qarray import QArray, quantize
from bitlaws.quant.spec import QuantSpec
from pallas_kernels import common

CONFIG = common.BlockConfig(block_m=64, block_n=64, block_k=64, num_warps=4, num_stages=3)


def _is_int8(fmt) -> bool:
    return isinstance(fmt, formats.IntFormat) and fmt.bits == 8 and fmt.signed


def supports(w, act_spec: Optional[QuantSpec]) -> bool:
    """Whether (weight, activation spec) is W8A8 this kernel runs: a per-channel (or per-tensor) int8 `QArray`
    and a symmetric int8 activation spec, dynamic per token or static per tensor."""
    if not (isinstance(w, QArray) and _is_int8(w.format) and w.spec.granularity in ("channel", "tensor")
            and w.reduce_axes == tuple(range(len(w.reduce_axes)))):
        return False
    if act_spec is None or not _is_int8(act_spec.format) or act_spec.format.is_mx:
        return False
    return (act_spec.granularity == "token" and not act_spec.static) or \
        (act_spec.granularity == "tensor" and act_spec.static)


def quantize_rows(x: jax.Array, act_spec: QuantSpec, params=None) -> tuple[jax.Array, jax.Array]:
    """``x [M, K]`` -> ``(codes [M, K] int8, scale [M, 1] float32)`` with the seam's activation quantization:
    ``codes * scale == fake_quant(x)`` exactly (dynamic per-token scales from `bitlaws.quant.qarray.quantize`,
    or the calibrated per-tensor scale of a static spec in `params`)."""
    if act_spec.static:
        scale = params.scale.astype(jnp.float32).reshape(1, 1)
        codes = calibrate.quantize_grouped(x.astype(jnp.float32)[None], scale[None], None, act_spec.format)[0]
        return codes.astype(jnp.int8), jnp.broadcast_to(scale, (x.shape[0], 1))
    qa = quantize(x, act_spec, reduce_axes=(-1,))  # view [K, M]: one scale per row of x
    return qa.values.T, qa.scale_f32.reshape(-1, 1)


def w8a8_matmul_reference(codes: jax.Array, row_scale: jax.Array, w: QArray) -> jax.Array:
    """Plain jnp: the exact int32 product, then ``* s_x * s_w`` in float32 ``[M, N]``."""
    k, n = common.kernel_view_shape(w)
    wq = w.values.reshape(k, n).astype(jnp.int32)
    acc = jnp.dot(codes.astype(jnp.int32), wq, preferred_element_type=jnp.int32)
    col_scale = jnp.broadcast_to(common.effective_scales(w), (1, n))
    return acc.astype(jnp.float32) * row_scale.astype(jnp.float32) * col_scale


def _kernel(x_ref, w_ref, sx_ref, sw_ref, o_ref, *, k_steps: int, block_k: int):
    block_m, block_n = o_ref.shape

    def step(kb, acc):  # acc [bm, bn] int32
        x = x_ref[:, pl.ds(kb * block_k, block_k)]  # [bm, bk] int8
        w = w_ref[pl.ds(kb * block_k, block_k), :]  # [bk, bn] int8
        return acc + jnp.dot(x, w, preferred_element_type=jnp.int32)

    acc = jax.lax.fori_loop(0, k_steps, step, jnp.zeros((block_m, block_n), jnp.int32))
    o_ref[...] = (acc.astype(jnp.float32) * sx_ref[...] * sw_ref[...]).astype(o_ref.dtype)


def w8a8_matmul_kernel(codes: jax.Array, row_scale: jax.Array, w: QArray, *, out_dtype=jnp.float32,
                       config: common.BlockConfig = CONFIG, interpret: bool = False) -> jax.Array:
    """The Pallas kernel (no platform dispatch) on int8 codes ``[M, K]`` and row scales ``[M, 1]``."""
    m, k = codes.shape
    _, n = common.kernel_view_shape(w)
    cfg = config.for_m(m)
    block_k = common.largest_block(k, cfg.block_k) or cfg.block_k
    block_n = common.largest_block(n, cfg.block_n) or cfg.block_n
    x = common.pad_axis(common.pad_axis(codes, 1, block_k), 0, cfg.block_m)  # [Mp, Kp] int8 (zeros)
    sx = common.pad_axis(row_scale.astype(jnp.float32), 0, cfg.block_m)  # [Mp, 1]
    wq = common.pad_axis(common.pad_axis(w.values.reshape(k, n), 0, block_k), 1, block_n)  # [Kp, Np] int8
    sw = common.pad_axis(jnp.broadcast_to(common.effective_scales(w), (1, n)), 1, block_n, 1.0)  # [1, Np]
    k_pad = x.shape[1]
    out = pl.pallas_call(
        functools.partial(_kernel, k_steps=k_pad // block_k, block_k=block_k),
        out_shape=jax.ShapeDtypeStruct((x.shape[0], wq.shape[1]), out_dtype),
        grid=(x.shape[0] // cfg.block_m, wq.shape[1] // block_n),
        in_specs=[pl.BlockSpec((cfg.block_m, k_pad), lambda i, j: (i, 0)),
                  pl.BlockSpec((k_pad, block_n), lambda i, j: (0, j)),
                  pl.BlockSpec((cfg.block_m, 1), lambda i, j: (i, 0)),
                  pl.BlockSpec((1, block_n), lambda i, j: (0, j))],
        out_specs=pl.BlockSpec((cfg.block_m, block_n), lambda i, j: (i, j)),
        compiler_params=cfg.compiler_params(), interpret=interpret, name="w8a8_matmul")(x, wq, sx, sw)
    return out[:m, :n]


def w8a8_matmul(x: jax.Array, w: QArray, act_spec: QuantSpec, act_params=None, *,
                config: common.BlockConfig = CONFIG, interpret: bool = False) -> jax.Array:
    """``fake_quant(x) @ dequantize(w)`` as int8 x int8 -> int32 with the scales applied after the sum.

    Args:
        x: ``[M, K]`` float activations (unquantized: the codes are computed here, `quantize_rows`).
        w: Per-channel (or per-tensor) int8 `QArray` of a ``[K, N]`` kernel.
        act_spec: Symmetric int8 activation spec, dynamic per token or static per tensor.
        act_params: The calibrated ``ActQParams`` of a static spec.
        config: Tuning config.
        interpret: Pallas interpreter (tests); otherwise the Triton kernel on CUDA and the plain-jnp
            `w8a8_matmul_reference` elsewhere, chosen at lowering time.

    Returns:
        ``[M, N]`` in ``x.dtype``.

    Raises:
        ValueError: an unsupported (weight, activation) pair, or mismatched K.
    """
    if not supports(w, act_spec):
        raise ValueError(f"w8a8_matmul: needs a per-channel int8 QArray and an int8 per-token (or static "
                         f"per-tensor) activation spec; got weight {w!r} and activation {act_spec!r}")
    k, _ = common.kernel_view_shape(w)
    if x.ndim != 2 or x.shape[1] != k:
        raise ValueError(f"w8a8_matmul: x must be [M, {k}] for a weight of shape {w.shape}, got {x.shape}")
    codes, row_scale = quantize_rows(x, act_spec, act_params)
    return common.on_platform(
        lambda c, s, interpret=False: w8a8_matmul_kernel(c, s, w, out_dtype=x.dtype, config=config,
                                                         interpret=interpret),
        lambda c, s: w8a8_matmul_reference(c, s, w).astype(x.dtype), codes, row_scale, interpret=interpret)
