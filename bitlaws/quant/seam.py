"""The seam: every matmul and convolution of our models goes through `qdot` or `qconv`.

What they compute depends on a static `LayerQuant` (part of the NNX graph definition, so changing it
retraces jitted code instead of branching at run time):

=============  ================================================================================
mode           behaviour
=============  ================================================================================
``fp``         the plain float computation, bit-identical to ``x @ w`` / ``lax.conv``
``calibrate``  float computation; the layer records activation statistics (`observe`)
``fake``       simulated quantization with straight-through gradients (QAT): weights and
               activations are quantize-dequantized in float, so there is **no speed-up**
``packed``     weights are a `PackedArray` (real low-bit storage: a `QArray`, or GPTVQ's `VQArray`);
               a matmul *backend* computes with it (`bitlaws.quant.backends`): ``xla`` dequantizes
               then dots (memory saving, no speed-up); ``pallas`` (`pallas_kernels`) runs real low-bit
               kernels. Backends that quantize activations themselves receive the unquantized input
               and the activation spec; for the others the seam fake-quantizes it first.
=============  ================================================================================

Packed weights are used only through the `PackedArray` interface (``w.dequantize(dtype)``), so every
storage type runs through the same code; a backend with kernels for some storage types handles the others by
a documented fallback or refuses them by name.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp

from bitlaws.quant import backends, calibrate, formats, qarray, upsampled_conv
from bitlaws.quant.qarray import PackedArray
from bitlaws.quant.spec import QuantSpec

MODES = ("fp", "calibrate", "fake", "packed")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerQuant:
    """Static quantization setting of one layer.

    Attributes:
        mode: One of ``fp``, ``calibrate``, ``fake``, ``packed``.
        weight: Weight spec, or None to keep the kernel in float.
        act: Input-activation spec, or None to keep activations in float.
        backend: Matmul backend name for ``packed`` mode (see `register_backend`).
        record_hessian: In ``calibrate`` mode, also accumulate ``X^T X`` (for GPTQ-style methods).
        compute_dtype: Operand dtype of the float matmul / convolution (``"bfloat16"``, ``"float16"``,
            ``"float32"``), accumulated in float32 and returned in the input's dtype; None: the input's dtype.
            Applies to float and fake-quant layers (after the fake quantization, so the quantized grid is
            exact first); packed layers run their backend's kernels. Set for a whole model with
            `bitlaws.quant.transform.set_compute_dtype`.
    """

    mode: str = "fp"
    weight: Optional[QuantSpec] = None
    act: Optional[QuantSpec] = None
    backend: str = "xla"
    record_hessian: bool = False
    compute_dtype: Optional[str] = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"LayerQuant.mode must be one of {MODES}, got {self.mode!r}")
        if self.compute_dtype is not None and self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"LayerQuant.compute_dtype must be one of {COMPUTE_DTYPES} or None, "
                             f"got {self.compute_dtype!r}")
        if self.mode == "packed" and self.weight is None:
            raise ValueError("LayerQuant.mode='packed' needs a weight spec")

    @property
    def quantizes_weights(self) -> bool:
        return self.weight is not None and self.mode in ("fake", "packed")

    @property
    def quantizes_acts(self) -> bool:
        return self.act is not None and self.mode in ("fake", "packed")


FP = LayerQuant()


def _float_operands(x: jax.Array, kernel: jax.Array, quant: LayerQuant) -> tuple[jax.Array, jax.Array, dict]:
    """``(x, kernel, extra dot/conv kwargs)`` in the layer's compute dtype (see `LayerQuant.compute_dtype`)."""
    if quant.compute_dtype is None:
        return x, kernel.astype(x.dtype), {}
    dtype = jnp.dtype(quant.compute_dtype)
    return x.astype(dtype), kernel.astype(dtype), {"preferred_element_type": jnp.float32}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ActStats:
    """Running statistics of a layer's input activations, gathered in ``calibrate`` mode.

    K is the layer's input-feature count (``in_features`` / conv input channels); H is the width of the
    rows seen by the matmul (K for linear layers, kh*kw*C for convolutions).

    Attributes:
        lo: ``[]`` running minimum.
        hi: ``[]`` running maximum.
        absmax: ``[K]`` per-input-channel max |x| (SmoothQuant).
        sum_abs: ``[K]`` per-input-channel sum of |x| (AWQ: mean = sum_abs / count).
        count: ``[]`` number of rows (tokens / pixels) seen.
        range_lo_sum: ``[]`` sum over batches of the act calibrator's lower bound.
        range_hi_sum: ``[]`` sum over batches of its upper bound.
        batches: ``[]`` number of batches seen.
        hessian: ``[H, H]`` float32 sum of ``x^T x`` over rows, or None when not recorded.
    """

    lo: jax.Array
    hi: jax.Array
    absmax: jax.Array
    sum_abs: jax.Array
    count: jax.Array
    range_lo_sum: jax.Array
    range_hi_sum: jax.Array
    batches: jax.Array
    hessian: Optional[jax.Array] = None

    @classmethod
    def empty(cls, features: int, hessian_size: Optional[int] = None) -> "ActStats":
        f32 = jnp.float32
        return cls(lo=jnp.asarray(jnp.inf, f32), hi=jnp.asarray(-jnp.inf, f32),
                   absmax=jnp.zeros((features,), f32), sum_abs=jnp.zeros((features,), f32),
                   count=jnp.zeros((), f32), range_lo_sum=jnp.zeros((), f32),
                   range_hi_sum=jnp.zeros((), f32), batches=jnp.zeros((), f32),
                   hessian=None if hessian_size is None else jnp.zeros((hessian_size, hessian_size), f32))

    @property
    def mean_abs(self) -> jax.Array:
        return self.sum_abs / jnp.maximum(self.count, 1.0)


def observe(stats: ActStats, x: jax.Array, act_spec: Optional[QuantSpec],
            hessian_rows: Optional[jax.Array] = None) -> ActStats:
    """Folds one batch of activations into `stats`.

    Args:
        stats: The running statistics.
        x: ``[..., K]`` activations (features last).
        act_spec: The layer's activation spec; its calibrator's range on this batch is accumulated.
        hessian_rows: ``[M, H]`` rows for the Hessian (default: `x` flattened to ``[M, K]``).

    Returns:
        Updated statistics.
    """
    x = x.astype(jnp.float32)
    rows = x.reshape(-1, x.shape[-1])  # [M, K]
    if act_spec is not None:
        spec = dataclasses.replace(act_spec, granularity="tensor", group_size=None, static=False) \
            if not act_spec.format.is_mx else act_spec
        lo_b, hi_b = calibrate.CALIBRATORS[spec.calibrator](rows.reshape(1, -1, 1), spec)
        range_lo, range_hi = stats.range_lo_sum + lo_b.reshape(()), stats.range_hi_sum + hi_b.reshape(())
    else:
        range_lo, range_hi = stats.range_lo_sum, stats.range_hi_sum
    hessian = stats.hessian
    if hessian is not None:
        h_rows = rows if hessian_rows is None else hessian_rows.astype(jnp.float32)
        hessian = hessian + jnp.einsum("mi,mj->ij", h_rows, h_rows, precision=jax.lax.Precision.HIGHEST)
    return ActStats(lo=jnp.minimum(stats.lo, rows.min()), hi=jnp.maximum(stats.hi, rows.max()),
                    absmax=jnp.maximum(stats.absmax, jnp.abs(rows).max(axis=0)),
                    sum_abs=stats.sum_abs + jnp.abs(rows).sum(axis=0),
                    count=stats.count + rows.shape[0], range_lo_sum=range_lo, range_hi_sum=range_hi,
                    batches=stats.batches + 1, hessian=hessian)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ActQParams:
    """Static (calibrated) per-tensor activation quantization parameters: scale ``[]``, zero ``[]`` or None."""

    scale: jax.Array
    zero_point: Optional[jax.Array]


def static_act_params(stats: ActStats, spec: QuantSpec) -> ActQParams:
    """Turns calibration statistics into a static per-tensor scale (and zero point).

    ``minmax`` uses the global min/max over all calibration data; other calibrators use the mean of
    their per-batch ranges.
    """
    if float(stats.batches) == 0:
        raise ValueError("static activation quantization needs calibration statistics; none were recorded")
    if spec.calibrator == "minmax":
        lo, hi = stats.lo, stats.hi
    else:
        lo, hi = stats.range_lo_sum / stats.batches, stats.range_hi_sum / stats.batches
    scale, zero = calibrate.range_to_params(lo.reshape(1, 1, 1), hi.reshape(1, 1, 1), spec)
    return ActQParams(scale=scale.reshape(()), zero_point=None if zero is None else zero.reshape(()))


def _fake_quant_static(x: jax.Array, params: ActQParams, spec: QuantSpec) -> jax.Array:
    """Per-tensor fake quantization with calibrated parameters.

    Forward: exactly ``dequantize(quantize(x))`` with the stored scale / zero point. Gradients: straight-through
    for `x` (1 inside the clipping range, 0 outside); the scale (when it is traced, e.g. trained by QAT with
    ``lsq=True``) gets LSQ's gradient ``round(x/s) - x/s`` inside the range and the clip level outside (Esser
    et al., 2020), through the surrogate ``s * (clip(x/s) + stop_gradient(round - clip))``; the zero point gets
    none.
    """
    fmt = spec.format
    scale = params.scale.reshape(1, 1, 1)
    zero = None if params.zero_point is None else jax.lax.stop_gradient(params.zero_point).reshape(1, 1, 1)
    grouped = jax.lax.stop_gradient(x).astype(jnp.float32).reshape(1, -1, 1)
    fixed = jax.lax.stop_gradient(scale)
    q = calibrate.quantize_grouped(grouped, fixed, zero, fmt)
    x_hat = calibrate.dequantize_grouped(q, fixed, zero, fmt).reshape(x.shape).astype(jnp.float32)
    if isinstance(fmt, formats.IntFormat):
        code_lo, code_hi = float(fmt.qmin), float(fmt.qmax)
    else:
        grid = fmt.grid()
        code_lo, code_hi = float(grid[0]), float(grid[-1])
    s, z = scale.reshape(()), (0.0 if zero is None else zero.reshape(()).astype(jnp.float32))
    v = x.astype(jnp.float32) / s + z  # in grid units
    inside = (v >= code_lo) & (v <= code_hi)
    v = jnp.where(inside, v, jnp.clip(jax.lax.stop_gradient(v), code_lo, code_hi))
    surrogate = s * (v + jax.lax.stop_gradient(fmt.round(v) - v) - z)
    return (jax.lax.stop_gradient(x_hat) + (surrogate - jax.lax.stop_gradient(surrogate))).astype(x.dtype)


def quantize_activation(x: jax.Array, quant: LayerQuant, act_params: Optional[ActQParams] = None) -> jax.Array:
    """Applies the layer's activation quantization to ``x [..., K]`` (identity if it has none)."""
    if not quant.quantizes_acts:
        return x
    if quant.act.static:
        if act_params is None:
            raise ValueError("static activation quantization but the layer has no calibrated parameters; "
                             "pass calib_stats to quantize_model")
        return _fake_quant_static(x, act_params, quant.act)
    return qarray.fake_quant(x, quant.act, reduce_axes=(-1,))


# ----------------------------------------------------------------------------------------------------
# Packed mode: the matmul backends live in `bitlaws.quant.backends` (re-exported here).
register_backend = backends.register_backend
get_backend = backends.get_backend
xla_dequant_matmul = backends.xla_matmul


def _packed_call(x: jax.Array, quant: LayerQuant, act_params: Optional[ActQParams], chosen: backends.Backend,
                 patches: bool = False):
    """``(x, act operand)`` of a packed call through `chosen`: ``x`` fake-quantized here unless the backend does it.

    `patches`: a convolution that will run as patches x matmul. Its activation scales belong to pixels (the
    rows of ``x``), not to patch rows, so the seam quantizes ``x`` before the patches are cut.
    """
    act_spec = quant.act if quant.quantizes_acts else None
    if act_spec is not None and act_spec.static and act_params is None:
        raise ValueError("static activation quantization but the layer has no calibrated parameters; "
                         "pass calib_stats to quantize_model")
    if chosen.quantizes_activations and not patches:
        return x, backends.ActOperand(spec=act_spec, params=act_params, quantized=False)
    return quantize_activation(x, quant, act_params), backends.ActOperand(
        spec=act_spec, params=act_params, quantized=act_spec is not None)


def qdot(x: jax.Array, kernel: Union[jax.Array, PackedArray], quant: LayerQuant = FP, *,
         bias: Optional[jax.Array] = None, act_params: Optional[ActQParams] = None,
         input_scale: Optional[jax.Array] = None, backend: Optional[str] = None) -> jax.Array:
    """``x @ kernel (+ bias)`` through the quantization seam.

    Args:
        x: ``[..., K]`` activations.
        kernel: ``[K, N]`` float kernel, or a `PackedArray` of one in ``packed`` mode.
        quant: The layer's static `LayerQuant`.
        bias: Optional ``[N]`` bias (never quantized).
        act_params: Calibrated parameters for static activation quantization.
        input_scale: Optional ``[K]`` per-input-channel divisor applied to x first (smoothing methods
            fold the inverse into the kernel).
        backend: Packed-mode backend for this call (default: ``quant.backend``).

    Returns:
        ``[..., N]``.
    """
    if input_scale is not None:
        x = x / input_scale.astype(x.dtype)
    if isinstance(kernel, PackedArray):
        chosen = get_backend(backend or quant.backend)
        x, act = _packed_call(x, quant, act_params, chosen)
        lead = x.shape[:-1]
        y = chosen.matmul(x.reshape(-1, x.shape[-1]), kernel, act)
        y = y.reshape(*lead, y.shape[-1])
    else:
        x = quantize_activation(x, quant, act_params)
        if quant.quantizes_weights:
            kernel = qarray.fake_quant(kernel, quant.weight)
        lhs, rhs, extra = _float_operands(x, kernel, quant)
        y = jnp.dot(lhs, rhs, **extra).astype(x.dtype)
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y


ConvPadding = backends.ConvPadding


def qconv(x: jax.Array, kernel: Union[jax.Array, PackedArray], quant: LayerQuant = FP, *,
          strides: Sequence[int] = (1, 1), padding: ConvPadding = "SAME",
          dilation: Sequence[int] = (1, 1), feature_group_count: int = 1,
          bias: Optional[jax.Array] = None, act_params: Optional[ActQParams] = None,
          input_scale: Optional[jax.Array] = None, backend: Optional[str] = None,
          upsample: int = 1) -> jax.Array:
    """2-D convolution (NHWC input, HWIO kernel) through the quantization seam.

    Args:
        x: ``[B, H, W, C]``.
        kernel: ``[kh, kw, C / groups, O]`` float kernel, or its `PackedArray` (e.g. a `QArray` with reduce
            axes (0, 1, 2)).
        quant: The layer's static `LayerQuant`.
        strides, padding, dilation, feature_group_count: as in `jax.lax.conv_general_dilated`.
        bias: Optional ``[O]``.
        act_params: Calibrated parameters for static activation quantization.
        input_scale: Optional ``[C]`` per-input-channel divisor.
        backend: Packed-mode backend for this call (default: ``quant.backend``); its ``conv``, or patches
            through its ``matmul`` (`bitlaws.quant.backends`).
        upsample: Nearest-neighbour upsampling factor applied to ``x`` first (1: none). Float and fake-quant
            calls of a 3x3, stride-1, pad-1 kernel with factor 2 run at the input resolution
            (`bitlaws.quant.upsampled_conv`: 2.25x fewer FLOPs); activation quantization (per pixel or per
            tensor) commutes with the upsampling, so it is applied to the small input. Packed calls upsample.

    Returns:
        ``[B, H', W', O]`` (``H, W`` scaled by `upsample` first).
    """
    if upsample < 1:
        raise ValueError(f"qconv: upsample must be a positive integer, got {upsample!r}")
    if input_scale is not None:
        x = x / input_scale.astype(x.dtype)
    if isinstance(kernel, PackedArray):
        x = upsampled_conv.nearest_upsample(x, upsample)
        chosen = get_backend(backend or quant.backend)
        x, act = _packed_call(x, quant, act_params, chosen, patches=chosen.conv is None)
        geometry = dict(strides=tuple(strides), padding=padding, dilation=tuple(dilation),
                        feature_group_count=feature_group_count)
        if chosen.conv is not None:
            y = chosen.conv(x, kernel, act, **geometry)
        else:
            y = backends.conv_via_matmul(chosen, x, kernel, act, **geometry)
        return y if bias is None else y + bias.astype(y.dtype)
    x = quantize_activation(x, quant, act_params)
    if quant.quantizes_weights:
        kernel = qarray.fake_quant(kernel, quant.weight)
    lhs, rhs, extra = _float_operands(x, kernel, quant)
    if upsampled_conv.folds(rhs.shape, factor=upsample, strides=strides, padding=padding, dilation=dilation,
                            feature_group_count=feature_group_count):
        y = upsampled_conv.nearest2x_conv3x3(lhs, rhs, **extra).astype(x.dtype)
    else:
        y = jax.lax.conv_general_dilated(
            upsampled_conv.nearest_upsample(lhs, upsample), rhs, window_strides=tuple(strides), padding=padding,
            rhs_dilation=tuple(dilation), dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=feature_group_count, **extra).astype(x.dtype)
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y
