"""Calibration: statistics of a tensor -> scale (and zero point) per quantization group.

Everything here works on the *grouped view* of a tensor, a 3-D array ``[G, L, C]``:

* ``tensor``:  ``[1, K, N]``, statistics over axes (1, 2), scale ``[1, 1, 1]``;
* ``channel``/``token``: ``[1, K, N]``, statistics over axis 1, scale ``[1, 1, N]``;
* ``group``:   ``[K/g, g, N]``, statistics over axis 1, scale ``[K/g, 1, N]``.

A calibrator maps the grouped view to a clipping range ``(lo, hi)`` (each ``[G, 1, C]``); `range_to_params`
turns a range into the format's scale and zero point.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from bitlaws.quant import formats

Calibrator = Callable[[jax.Array, "QuantSpec"], tuple[jax.Array, jax.Array]]  # noqa: F821
CALIBRATORS: dict[str, Calibrator] = {}


def register_calibrator(name: str) -> Callable[[Calibrator], Calibrator]:
    """Registers `fn(grouped [G, L, C], spec) -> (lo, hi)` under `name` for `QuantSpec.calibrator`."""

    def wrap(fn: Calibrator) -> Calibrator:
        if name in CALIBRATORS:
            raise ValueError(f"calibrator {name!r} is already registered")
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


def _store_scale(scale: jax.Array, spec) -> jax.Array:
    """Rounds a float32 scale to its storage dtype, never downwards (so the range stays covered)."""
    dtype = jnp.dtype(spec.scale_dtype)
    info = jnp.finfo(dtype)
    scale = jnp.clip(scale, float(info.smallest_normal), float(info.max))
    stored = scale.astype(dtype)
    bumped = jnp.nextafter(stored, jnp.asarray(jnp.inf, dtype))
    return jnp.where(stored.astype(jnp.float32) < scale, bumped, stored)


def range_to_params(lo: jax.Array, hi: jax.Array, spec) -> tuple[jax.Array, Optional[jax.Array]]:
    """Scale and zero point covering ``[lo, hi]`` for the spec's format.

    * signed int: ``s = max(|lo|, |hi|) / (2^(b-1) - 1)``, no zero point;
    * unsigned int (eq. 5-6): the range is widened to include 0, ``s = (u - l) / (2^b - 1)``,
      ``z = clip(round(-l / s), 0, 2^b - 1)`` (uint8 storage);
    * fp: ``s = max|x| / max_normal``;
    * MX: ``s = 2^(floor(log2 max|x|) - emax_elem)`` (OCP MX v1.0), stored as the biased E8M0 exponent.

    Scales are stored in `spec.scale_dtype` (rounded up) and floored at its smallest normal value, so a
    constant or all-zero group gives a finite scale and exact zeros instead of NaN/inf.

    Args:
        lo: ``[G, 1, C]`` lower clipping bound.
        hi: ``[G, 1, C]`` upper clipping bound.
        spec: The `QuantSpec`.

    Returns:
        ``(scale, zero_point)``: scale ``[G, 1, C]`` in the storage dtype (uint8 biased exponent for MX);
        zero_point ``[G, 1, C]`` uint8, or None for symmetric formats.
    """
    fmt = spec.format
    lo = lo.astype(jnp.float32)
    hi = hi.astype(jnp.float32)
    if isinstance(fmt, formats.MxFormat):
        amax = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
        exponent = jnp.floor(jnp.log2(jnp.maximum(amax, 2.0**-126))) - fmt.element.emax
        return (jnp.clip(exponent, -127, 127) + 127).astype(jnp.uint8), None
    if isinstance(fmt, formats.IntFormat) and not fmt.signed:
        lo = jnp.minimum(lo, 0.0)
        hi = jnp.maximum(hi, 0.0)
        scale = _store_scale((hi - lo) / fmt.qmax, spec)
        zero = jnp.clip(jnp.round(-lo / scale.astype(jnp.float32)), 0, fmt.qmax).astype(jnp.uint8)
        return scale, zero
    amax = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
    return _store_scale(amax / fmt.max_normal, spec), None


def scale_as_float(scale: jax.Array, fmt: formats.QFormat) -> jax.Array:
    """The stored scale as float32 (decodes E8M0 for MX formats)."""
    if isinstance(fmt, formats.MxFormat):
        return jnp.exp2(scale.astype(jnp.float32) - 127.0)
    return scale.astype(jnp.float32)


def quantize_grouped(grouped: jax.Array, scale: jax.Array, zero: Optional[jax.Array],
                     fmt: formats.QFormat) -> jax.Array:
    """Rounds the grouped view onto the format grid. Returns float32 grid values ``[G, L, C]``.

    For integer formats these are the integer codes (``q`` of eq. 4, including the zero point); for fp
    formats the element values in units of the scale.
    """
    x = grouped.astype(jnp.float32) / scale_as_float(scale, fmt)
    if zero is not None:
        x = x + zero.astype(jnp.float32)
    return fmt.round(x)


def dequantize_grouped(q: jax.Array, scale: jax.Array, zero: Optional[jax.Array],
                       fmt: formats.QFormat) -> jax.Array:
    """Inverse of `quantize_grouped`: ``(q - z) * s`` as float32 ``[G, L, C]``."""
    if zero is not None:
        q = q - zero.astype(jnp.float32)
    return q * scale_as_float(scale, fmt)


def clip_bounds(scale: jax.Array, zero: Optional[jax.Array], fmt: formats.QFormat) -> tuple[jax.Array, jax.Array]:
    """The real-valued interval ``[G, 1, C]`` the quantizer represents without clipping."""
    s = scale_as_float(scale, fmt)
    if isinstance(fmt, formats.IntFormat):
        z = zero.astype(jnp.float32) if zero is not None else 0.0
        return (fmt.qmin - z) * s, (fmt.qmax - z) * s
    return -fmt.max_normal * s, fmt.max_normal * s


def grid_step(scale: jax.Array, fmt: formats.QFormat) -> jax.Array:
    """Largest distance between neighbouring grid values, in real units, per group ``[G, 1, C]``."""
    grid = fmt.grid()
    return float(np.max(np.diff(grid))) * scale_as_float(scale, fmt)
