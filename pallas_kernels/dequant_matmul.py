"""The weight-only kernel skeleton shared by the format kernels: ``x @ decode(packed w) * scales`` in one pass.

Reads the `QArray` layout as it is (no re-layout): the ``[K, N]`` view's b-bit codes are packed along K in
*units* of ``per = 8 / gcd(b, 8)`` values in ``ub = b * per / 8`` bytes, value ``k`` of a column at bits
``(k % per) * b`` of the little-endian word of unit ``k // per`` (`bitlaws.quant.packing`): 2-bit 4 values per
byte, 3-bit 8 values per 3 bytes, 4-bit 2 per byte, 8-bit (and float8) one per byte.

Per K step of ``block_k`` rows, the kernel loads the step's ``ub`` byte rows of each unit as strided slices of
the weight ref (``w[u * ub + b]``), widens them to int32 and assembles each unit's word, and for each of the
``per`` positions ``j`` in a unit decodes the codes at that position and multiplies them with the strided
activation slice ``x[:, k0 + j :: per]``: no interleaving of values in registers, every dot has
``block_k / per >= 16`` rows. The f32 accumulator gets ``partial * scale[g]`` per K step (``block_k`` divides
the group size) or, with one scale per column, the scale once at the end; zero points (uint formats) are
subtracted from the decoded values.

A format kernel supplies ``decode(codes int32 [rows, bn]) -> values f32`` (the grid values before scaling) and
its bits; `call` does the padding (M always; K and N only when no power-of-two block divides them - that
copies the weight, a slow path) and the platform dispatch.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from bitlaws.quant.qarray import QArray
from pallas_kernels import common

Decode = Callable[[jax.Array], jax.Array]  # codes int32 [rows, bn] -> grid values f32 [rows, bn]


def unit(bits: int, packed: bool) -> tuple[int, int]:
    """``(values per unit, bytes per unit)`` of the packing (``(1, 1)`` for unpacked 8-bit storage)."""
    if not packed:
        return 1, 1
    per = 8 // math.gcd(bits, 8)
    return per, bits * per // 8


def _kernel(x_ref, w_ref, s_ref, *rest, decode: Decode, bits: int, packed: bool, k_steps: int, block_k: int,
            group_steps: Optional[int], has_zero: bool):
    """One ``[block_m, block_n]`` output tile; loops over K in steps of ``block_k``."""
    z_ref, o_ref = (rest[0], rest[1]) if has_zero else (None, rest[0])
    per, unit_bytes = unit(bits, packed)
    units = block_k // per  # units (and rows per strided slice) per K step
    mask = (1 << bits) - 1
    block_m, block_n = o_ref.shape

    def step(kb, acc):  # acc [bm, bn] f32
        if packed:
            word = jnp.zeros((units, block_n), jnp.int32)
            for b in range(unit_bytes):  # byte b of every unit of this step: rows kb*units*ub + u*ub + b
                row = w_ref[pl.ds(kb * units * unit_bytes + b, units, stride=unit_bytes), :]  # [units, bn]
                word = word | (row.astype(jnp.int32) << (8 * b))  # widened before shifts
        else:
            stored = w_ref[pl.ds(kb * block_k, block_k), :]  # [bk, bn]
        group = kb // group_steps if group_steps else 0
        zero = z_ref[pl.ds(group, 1), :].astype(jnp.float32) if has_zero else None  # [1, bn]
        part = jnp.zeros((block_m, block_n), jnp.float32)
        for j in range(per):
            values = decode((word >> (bits * j)) & mask) if packed else decode(stored)  # [units, bn] f32
            if zero is not None:
                values = values - zero
            x_j = x_ref[:, pl.ds(kb * block_k + j, units, stride=per)] if per > 1 else \
                x_ref[:, pl.ds(kb * block_k, block_k)]  # [bm, units]
            part = part + jnp.dot(x_j, values.astype(x_ref.dtype), preferred_element_type=jnp.float32)
        if group_steps:
            part = part * s_ref[pl.ds(group, 1), :]
        return acc + part

    acc = jax.lax.fori_loop(0, k_steps, step, jnp.zeros((block_m, block_n), jnp.float32))
    if not group_steps:
        acc = acc * s_ref[pl.ds(0, 1), :]
    o_ref[...] = acc.astype(o_ref.dtype)


def block_k_floor(bits: int, packed: bool) -> int:
    """The smallest K step: 16 rows per strided dot, times the values per unit (rounded to a power of two)."""
    per, _ = unit(bits, packed)
    return 16 * (1 << (per - 1).bit_length())


def check_group(name: str, w: QArray, group_size: Optional[int], bits: int, packed: bool) -> None:
    """Raises ValueError when `group_size` is not a multiple of the smallest K step (the kernel needs whole
    K steps inside a group)."""
    floor = block_k_floor(bits, packed)
    if group_size is not None and group_size % floor:
        per, _ = unit(bits, packed)
        raise ValueError(f"{name}: group size {group_size} of {w.spec.short()} is not a multiple of {floor} "
                         f"({per} values per packing unit, 16 rows per dot)")


def call(x: jax.Array, w: QArray, *, decode: Decode, bits: int, packed: bool, group_size: Optional[int],
         config: common.BlockConfig, name: str, interpret: bool = False) -> jax.Array:
    """The Pallas kernel (no platform dispatch) for ``x [M, K]`` and a packed weight; ``[M, N]`` in ``x.dtype``.

    Args:
        group_size: K rows per scale row (None: one scale row for all of K).
    """
    m, k = x.shape
    _, n = common.kernel_view_shape(w)
    per, unit_bytes = unit(bits, packed)
    check_group(name, w, group_size, bits, packed)
    floor = block_k_floor(bits, packed)
    cap_k = min(config.block_k, group_size) if group_size else config.block_k
    cap_k = max(cap_k, floor)
    block_k = common.largest_block(k, cap_k, floor) or cap_k
    block_n = common.largest_block(n, config.block_n) or config.block_n
    block_m = config.for_m(m).block_m
    k_pad, n_pad = common.round_up(k, block_k), common.round_up(n, block_n)
    values = w.values.reshape(w.values.shape[0], -1)  # [K * ub / per, N] stored rows (K padded to whole units)
    values = common.pad_axis(common.pad_axis(values, 0, k_pad // per * unit_bytes), 1, block_n)
    values = values[:k_pad // per * unit_bytes]  # [Kp * ub / per, Np]
    x = common.pad_axis(common.pad_axis(x, 1, block_k), 0, block_m)  # [Mp, Kp]: zero columns meet padded rows
    scales = common.effective_scales(w)  # [G, 1 or N] f32
    scales = jnp.broadcast_to(scales, (scales.shape[0], n))
    groups = k_pad // group_size if group_size else 1
    scales = common.pad_axis(common.pad_axis(scales, 0, groups, 1.0), 1, block_n, 1.0)[:groups]  # [Gp, Np]
    operands = [x, values, scales]
    in_specs = [pl.BlockSpec((block_m, k_pad), lambda i, j: (i, 0)),
                pl.BlockSpec((values.shape[0], block_n), lambda i, j: (0, j)),
                pl.BlockSpec((groups, block_n), lambda i, j: (0, j))]
    if w.zero_point is not None:
        zero = jnp.broadcast_to(w.zero_point.reshape(w.zero_point.shape[0], -1), (w.zero_point.shape[0], n))
        zero = common.pad_axis(common.pad_axis(zero, 0, groups), 1, block_n)[:groups]
        operands.append(zero)
        in_specs.append(pl.BlockSpec((groups, block_n), lambda i, j: (0, j)))
    kernel = functools.partial(
        _kernel, decode=decode, bits=bits, packed=packed, k_steps=k_pad // block_k, block_k=block_k,
        group_steps=group_size // block_k if group_size else None, has_zero=w.zero_point is not None)
    cfg = common.BlockConfig(block_m=block_m, block_n=block_n, block_k=block_k, num_warps=config.num_warps,
                             num_stages=config.num_stages)
    out = pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct((x.shape[0], n_pad), x.dtype),
        grid=(x.shape[0] // block_m, n_pad // block_n), in_specs=in_specs,
        out_specs=pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),
        compiler_params=cfg.compiler_params(), interpret=interpret, name=name)(*operands)
    return out[:m, :n]


def reference(x: jax.Array, w: QArray) -> jax.Array:
    """``x [M, K] @ dequantize(w) [K, N]`` in float32 (highest precision), returned in ``x.dtype``."""
    k, n = common.kernel_view_shape(w)
    dense = w.dequantize(jnp.float32).reshape(k, n)
    return jnp.dot(x.astype(jnp.float32), dense, precision=jax.lax.Precision.HIGHEST).astype(x.dtype)


def check_x(name: str, x: jax.Array, w: QArray) -> None:
    k, _ = common.kernel_view_shape(w)
    if x.ndim != 2 or x.shape[1] != k:
        raise ValueError(f"{name}: x must be [M, {k}] for a weight of shape {w.shape}, got {x.shape}")


def dispatch(kernel: Callable[..., jax.Array], x: jax.Array, w: QArray, *, interpret: bool) -> jax.Array:
    """`kernel(x, w, interpret=)` on CUDA (or in the interpreter), `reference` elsewhere (`common.on_platform`)."""
    return common.on_platform(lambda x_, interpret=False: kernel(x_, w, interpret=interpret),
                              lambda x_: reference(x_, w), x, interpret=interpret)
