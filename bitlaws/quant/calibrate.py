"""Calibration: statistics of a tensor -> scale (and zero point) per quantization group.

Everything here works on the *grouped view* of a tensor, a 3-D array ``[G, L, C]``:

* ``tensor``:  ``[1, K, N]``, statistics over axes (1, 2), scale ``[1, 1, 1]``;
* ``channel``/``token``: ``[1, K, N]``, statistics over axis 1, scale ``[1, 1, N]``;
* ``group``:   ``[K/g, g, N]``, statistics over axis 1, scale ``[K/g, 1, N]``.

A calibrator maps the grouped view to a clipping range ``(lo, hi)`` (each ``[G, 1, C]``); `range_to_params`
turns a range into the format's scale and zero point; `group_params` does both, guarding non-finite values.
Scales travel as float32 *effective* scales (what their storage decodes to); `encode_scale` / `decode_scale`
convert to and from storage. The scale policy (storage precision, floors, NaN) is stated below, above
`range_to_params`.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from bitlaws.quant import formats

Calibrator = Callable[[jax.Array, "QuantSpec"], tuple[jax.Array, jax.Array]]  # noqa: F821
CALIBRATORS: dict[str, Calibrator] = {}


def register_calibrator(name: str, *, replace: bool = False) -> Callable[[Calibrator], Calibrator]:
    """Decorator: registers `fn(grouped [G, L, C], spec) -> (lo, hi)` under `name` for `QuantSpec.calibrator`.

    Re-registering the same function (or a re-run of its definition) is allowed; a different function under a
    taken name, built-in ones included, needs ``replace=True`` (see `bitlaws.quant.registry`).
    """
    from bitlaws.quant import registry  # pylint: disable=g-import-not-at-top

    def wrap(fn: Calibrator) -> Calibrator:
        registry.check_register("calibrator", name, CALIBRATORS.get(name), fn, replace)
        CALIBRATORS[name] = fn
        return fn

    return wrap


def _stat_axes(spec) -> tuple[int, ...]:
    return (1, 2) if spec.granularity == "tensor" else (1,)


@register_calibrator("minmax")
def minmax_range(grouped: jax.Array, spec) -> tuple[jax.Array, jax.Array]:
    """Paper eq. 4-6: l = min(X), u = max(X) over each group."""
    axes = _stat_axes(spec)
    return jnp.min(grouped, axis=axes, keepdims=True), jnp.max(grouped, axis=axes, keepdims=True)


@register_calibrator("absmax")
def absmax_range(grouped: jax.Array, spec) -> tuple[jax.Array, jax.Array]:
    """Symmetric range [-max|X|, max|X|]."""
    amax = jnp.max(jnp.abs(grouped), axis=_stat_axes(spec), keepdims=True)
    return -amax, amax


@register_calibrator("percentile")
def percentile_range(grouped: jax.Array, spec) -> tuple[jax.Array, jax.Array]:
    """Clips outliers: [q_(100-p), q_p] per group (for signed formats the p-th percentile of |X|)."""
    axes = _stat_axes(spec)
    x = grouped.astype(jnp.float32)
    if _is_symmetric(spec.format):
        amax = jnp.percentile(jnp.abs(x), spec.percentile, axis=axes, keepdims=True)
        return -amax, amax
    lo = jnp.percentile(x, 100.0 - spec.percentile, axis=axes, keepdims=True)
    hi = jnp.percentile(x, spec.percentile, axis=axes, keepdims=True)
    return lo, hi


@register_calibrator("mse")
def mse_range(grouped: jax.Array, spec) -> tuple[jax.Array, jax.Array]:
    """Searches a shrink ratio r of the min-max range minimising the squared quantization error per group.

    Candidates are ``linspace(mse_min_ratio, 1, mse_candidates)``; ratio 1 is the min-max range, so the
    result is never worse than ``minmax`` on the calibrated tensor.
    """
    lo, hi = minmax_range(grouped, spec)
    ratios = jnp.linspace(spec.mse_min_ratio, 1.0, spec.mse_candidates, dtype=jnp.float32)
    axes = _stat_axes(spec)

    def error(ratio):
        scale, zero = range_to_params(lo * ratio, hi * ratio, spec)
        deq = dequantize_grouped(quantize_grouped(grouped, scale, zero, spec.format), scale, zero, spec.format)
        return jnp.sum(jnp.square(deq - grouped), axis=axes, keepdims=True)  # [G, 1, C]

    errors = jax.lax.map(error, ratios)  # [R, G, 1, C]
    best = ratios[jnp.argmin(errors, axis=0)]  # [G, 1, C]; first (smallest) ratio on ties
    return lo * best, hi * best


def _is_symmetric(fmt: formats.QFormat) -> bool:
    return not (isinstance(fmt, formats.IntFormat) and not fmt.signed)


# ---------------------------------------------------------------------------------------------- scales
#
# Scale policy (what a stored scale can and cannot do to the error).
#
# Scales are computed in float32 and carried through quantize / dequantize as float32 *effective* scales:
# the exact value the stored scale decodes to. How they are stored depends on `QuantSpec.scale_dtype`:
#
# * ``float16`` (default): each scale is stored as a float16 mantissa times one power-of-two exponent
#   ``scale_exp`` per tensor (an int16, 2 bytes, counted in `QArray.nbytes`). The exponent puts the
#   tensor's largest scale in (2^14, 2^15], so every scale keeps float16's 11 significant bits whatever
#   the tensor's magnitude (std 1e-6 and 1e6 quantize with the same relative error as std 1), and none
#   overflows. Scales more than about 2^28 below the tensor's largest are floored (their groups are then
#   quantized with that floor: an absolute error below 2^-28 of the tensor's largest scale).
# * ``bfloat16``: float32's range, 8 significant bits (the scale may be up to 2^-8 larger than needed).
# * ``float32``: as computed.
#
# In every case a scale is rounded *up* to its storage precision (so the clipping range stays covered)
# and floored at float32's smallest normal number, 2^-126 (CPUs flush subnormals to zero, and a zero
# scale would turn 0/0 into NaN). Values whose magnitude is below about 2^-126 * qmax quantize to zero.
#
# Non-finite values: a group that contains a NaN or an infinity gets a NaN scale, so its whole group
# dequantizes to NaN in `fake_quant` and in `dequantize(quantize(.))` alike (float16/bfloat16/float32
# NaN, and E8M0's NaN code 0xFF for MX). The other groups are computed from their own (finite) values,
# so one outlier never zeroes the rest of a tensor. `quantize_model` refuses kernels with non-finite
# values outright and names the layers.

_F32_TINY = 2.0**-126
_F16_TOP_EXP = 15  # the largest scale of a tensor is stored in (2^14, 2^15]
_F16_MIN_EXP = -14  # float16's smallest normal exponent
E8M0_NAN = 255


def _exp2(exponent: jax.Array) -> jax.Array:
    """``2.0 ** exponent`` for integer exponents in [-126, 127], built from the bits (exact; `jnp.exp2` is not)."""
    biased = (jnp.asarray(exponent).astype(jnp.int32) + 127) << 23
    return jax.lax.bitcast_convert_type(biased, jnp.float32)


def _shift(x: jax.Array, exponent: jax.Array) -> jax.Array:
    """``x * 2**exponent`` for a scalar integer exponent in [-300, 300], exact while the result is normal.

    The exponent is split in two halves so neither power of two overflows float32.
    """
    exponent = exponent.astype(jnp.int32)
    half = exponent >> 1  # floor(exponent / 2): an arithmetic shift, far fewer ops than `//` on signed ints
    return x * _exp2(half) * _exp2(exponent - half)


# The three helpers below read and write float bits directly. They are exact for their stated domains and
# lower to a handful of integer ops, where `jnp.frexp` / `jnp.nextafter` (which also handle zeros, subnormals
# and infinities) lower to dozens: every fake-quantized activation runs them, and they dominated the compile
# time of quantized samplers.

def _float32_fields(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(unbiased exponent, mantissa bits)`` int32 of positive normal float32 `x`: x = (1 + m / 2^23) 2^e."""
    bits = jax.lax.bitcast_convert_type(jnp.asarray(x, jnp.float32), jnp.int32)
    return (bits >> 23) - 127, bits & 0x7FFFFF


def _ceil_log2(x: jax.Array) -> jax.Array:
    """Exact ``ceil(log2(x))`` for positive normal float32 `x`, as int32 (from the bits, not a rounded log)."""
    exponent, mantissa = _float32_fields(x)
    return exponent + (mantissa != 0).astype(jnp.int32)


def _floor_log2(x: jax.Array) -> jax.Array:
    """Exact ``floor(log2(x))`` for positive normal float32 `x`, as int32."""
    return _float32_fields(x)[0]


_UINT_OF = {jnp.dtype(jnp.float16): jnp.uint16, jnp.dtype(jnp.bfloat16): jnp.uint16}


def _round_up_to(scale: jax.Array, dtype) -> jax.Array:
    """`scale` (positive float32, within `dtype`'s normal range) rounded up to a `dtype` value, as float32.

    The next `dtype` value above a positive finite one is its bit pattern plus one (`nextafter` towards +inf).
    """
    stored = scale.astype(dtype)
    uint = _UINT_OF[jnp.dtype(dtype)]
    bumped = jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(stored, uint) + uint(1), dtype)
    return jnp.where(stored.astype(jnp.float32) < scale, bumped, stored).astype(jnp.float32)


def float16_exponent(scale: jax.Array) -> jax.Array:
    """The per-tensor exponent of float16 scale storage: ``ceil(log2(max finite scale)) - 15``, int32 ``[]``.

    Recomputing it from the effective scales gives the same value, which is what lets `encode_scale` run on
    scales that were already rounded (`range_to_params` output).
    """
    finite = jnp.isfinite(scale)
    top = jnp.max(jnp.where(finite, scale, 0.0))
    return _ceil_log2(jnp.maximum(top, _F32_TINY)) - _F16_TOP_EXP


def _storage_round(scale: jax.Array, spec) -> jax.Array:
    """Raw float32 scales (> 0 or NaN) -> effective scales: exactly what their storage decodes to."""
    nan = jnp.isnan(scale)
    scale = jnp.maximum(jnp.where(nan, 0.0, scale), _F32_TINY)
    if spec.scale_dtype == "float16":
        exponent = float16_exponent(jnp.where(nan, jnp.nan, scale))
        floor = jnp.maximum(_shift(jnp.float32(1.0), exponent + _F16_MIN_EXP), _F32_TINY)
        mantissa = _round_up_to(_shift(jnp.maximum(scale, floor), -exponent), jnp.float16)  # <= 2^15
        scale = _shift(mantissa, exponent)
    elif spec.scale_dtype == "bfloat16":
        scale = _round_up_to(jnp.minimum(scale, float(jnp.finfo(jnp.bfloat16).max)), jnp.bfloat16)
    return jnp.where(nan, jnp.nan, scale)


def range_to_params(lo: jax.Array, hi: jax.Array, spec) -> tuple[jax.Array, Optional[jax.Array]]:
    """Scale and zero point covering ``[lo, hi]`` for the spec's format.

    * signed int: ``s = max(|lo|, |hi|) / (2^(b-1) - 1)``, no zero point;
    * unsigned int (eq. 5-6): the range is widened to include 0, ``s = (u - l) / (2^b - 1)``,
      ``z = clip(round(-l / s), 0, 2^b - 1)`` (uint8);
    * fp and lookup-table formats: ``s = max|x| / max|grid|``;
    * MX: ``s = 2^(floor(log2 max|x|) - emax_elem)`` (OCP MX v1.0), exponent clipped to [-126, 127].

    Scales follow the module's scale policy: rounded up to what `spec.scale_dtype` stores, floored at
    2^-126 (so a constant or all-zero group gives exact zeros, never NaN), and NaN where `lo` or `hi` is not
    finite (a group with a non-finite value). All scales passed in one call belong to one tensor (the
    float16 storage exponent is shared by them).

    Args:
        lo: ``[G, 1, C]`` lower clipping bound.
        hi: ``[G, 1, C]`` upper clipping bound.
        spec: The `QuantSpec`.

    Returns:
        ``(scale, zero_point)``: effective scale ``[G, 1, C]`` float32 (the exact value its storage decodes
        to, see `encode_scale`); zero_point ``[G, 1, C]`` uint8, or None for symmetric formats.
    """
    fmt = spec.format
    lo = lo.astype(jnp.float32)
    hi = hi.astype(jnp.float32)
    bad = ~(jnp.isfinite(lo) & jnp.isfinite(hi))
    lo = jnp.where(bad, 0.0, lo)
    hi = jnp.where(bad, 0.0, hi)
    if isinstance(fmt, formats.MxFormat):
        amax = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
        exponent = _floor_log2(jnp.maximum(amax, _F32_TINY)) - fmt.element.emax
        scale = _exp2(jnp.clip(exponent, -126, 127))
        return jnp.where(bad, jnp.nan, scale), None
    if isinstance(fmt, formats.IntFormat) and not fmt.signed:
        lo = jnp.minimum(lo, 0.0)
        hi = jnp.maximum(hi, 0.0)
        raw = hi / fmt.qmax - lo / fmt.qmax  # divided first: no overflow for ranges near float32's max
        scale = _storage_round(jnp.where(bad, jnp.nan, raw), spec)
        zero = jnp.clip(jnp.round(-lo / jnp.where(bad, 1.0, scale)), 0, fmt.qmax).astype(jnp.uint8)
        return scale, zero
    amax = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
    return _storage_round(jnp.where(bad, jnp.nan, amax / fmt.max_normal), spec), None


def encode_scale(scale: jax.Array, spec) -> tuple[jax.Array, Optional[jax.Array]]:
    """Effective float32 scales of one tensor (from `range_to_params`) -> ``(stored, scale_exp)``.

    MX: uint8 biased E8M0 exponents (0xFF = NaN), no `scale_exp`. ``float16``: float16 mantissas and the
    int16 ``[]`` per-tensor exponent (see the scale policy). ``bfloat16`` / ``float32``: the scales in that
    dtype, no `scale_exp`. Exact: `decode_scale` returns `scale` bit for bit.
    """
    fmt = spec.format
    if isinstance(fmt, formats.MxFormat):
        nan = jnp.isnan(scale)
        code = _floor_log2(jnp.where(nan, 1.0, scale)) + 127
        return jnp.where(nan, E8M0_NAN, code).astype(jnp.uint8), None
    if spec.scale_dtype == "float16":
        exponent = float16_exponent(scale)
        return _shift(scale, -exponent).astype(jnp.float16), exponent.astype(jnp.int16)
    return scale.astype(spec.scale_dtype), None


def decode_scale(stored: jax.Array, scale_exp: Optional[jax.Array], fmt: formats.QFormat) -> jax.Array:
    """Inverse of `encode_scale`: the effective float32 scales."""
    if isinstance(fmt, formats.MxFormat):
        code = stored.astype(jnp.int32)
        return jnp.where(code == E8M0_NAN, jnp.nan, _exp2(code - 127))
    scale = stored.astype(jnp.float32)
    if scale_exp is not None:
        scale = _shift(scale, scale_exp)
    return scale


def group_params(grouped: jax.Array, spec) -> tuple[jax.Array, Optional[jax.Array]]:
    """Runs the spec's calibrator on a grouped view ``[G, L, C]``; returns ``(scale, zero)``, each ``[G, 1, C]``.

    Groups holding a non-finite value get a NaN scale (the calibrator sees them with those values zeroed,
    so its result for the other groups is unaffected).
    """
    axes = _stat_axes(spec)
    finite = jnp.isfinite(grouped)
    clean = jnp.where(finite, grouped, jnp.zeros((), grouped.dtype))
    lo, hi = CALIBRATORS[spec.calibrator](clean, spec)
    bad = ~jnp.all(finite, axis=axes, keepdims=True)
    return range_to_params(jnp.where(bad, jnp.nan, lo), jnp.where(bad, jnp.nan, hi), spec)


def quantize_grouped(grouped: jax.Array, scale: jax.Array, zero: Optional[jax.Array],
                     fmt: formats.QFormat) -> jax.Array:
    """Rounds the grouped view onto the format grid. Returns float32 grid values ``[G, L, C]``.

    For integer formats these are the integer codes (``q`` of eq. 4, including the zero point); for fp
    and lookup-table formats the element values in units of the scale. `scale` is the effective float32
    scale (`range_to_params`); a NaN scale gives NaN.
    """
    x = grouped.astype(jnp.float32) / scale
    if zero is not None:
        x = x + zero.astype(jnp.float32)
    return fmt.round(x)


def dequantize_grouped(q: jax.Array, scale: jax.Array, zero: Optional[jax.Array],
                       fmt: formats.QFormat) -> jax.Array:
    """Inverse of `quantize_grouped`: ``(q - z) * s`` as float32 ``[G, L, C]``."""
    del fmt
    if zero is not None:
        q = q - zero.astype(jnp.float32)
    return q * scale


def clip_bounds(scale: jax.Array, zero: Optional[jax.Array], fmt: formats.QFormat) -> tuple[jax.Array, jax.Array]:
    """The real-valued interval ``[G, 1, C]`` the quantizer represents without clipping."""
    if isinstance(fmt, formats.IntFormat):
        z = zero.astype(jnp.float32) if zero is not None else 0.0
        return (fmt.qmin - z) * scale, (fmt.qmax - z) * scale
    grid = fmt.grid()
    return float(grid[0]) * scale, float(grid[-1]) * scale


def grid_step(scale: jax.Array, fmt: formats.QFormat) -> jax.Array:
    """Largest distance between neighbouring grid values, in real units, per group ``[G, 1, C]``."""
    grid = fmt.grid()
    return float(np.max(np.diff(grid))) * scale
