"""NNX layers whose matmul / conv goes through the seam: `QLinear` and `QConv`.

Models use these instead of `nnx.Linear` / `nnx.Conv`. A freshly built layer is in ``fp`` mode and is
numerically the plain layer; `bitlaws.quant.quantize_model` returns a copy whose layers carry another
`LayerQuant` (and, in ``packed`` mode, a `QArray` kernel in place of the float one). Models never see bit
widths.

Variables per layer:

* ``kernel``: `nnx.Param`, ``[in, out]`` (QLinear) or ``[kh, kw, in / groups, out]`` (QConv);
  None in ``packed`` mode.
* ``bias``: `nnx.Param` ``[out]`` or None.
* ``qkernel``: `QWeight` holding a `QArray` (``packed`` mode only).
* ``calib``: `CalibStats` holding `ActStats` (``calibrate`` mode only).
* ``act_qparams``: `ActQParamsVar` (static activation quantization only).
* ``input_scale``: `InputScale` ``[in]`` divisor (set by smoothing PTQ methods), else None.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
from flax import nnx

from bitlaws.quant import seam, upsampled_conv
from bitlaws.quant.seam import LayerQuant


class QWeight(nnx.Variable):
    """A packed `QArray` weight (not an `nnx.Param`: optimizers do not see it)."""


class CalibStats(nnx.Variable):
    """Running `ActStats` gathered in ``calibrate`` mode."""


class ActQParamsVar(nnx.Variable):
    """Calibrated static activation parameters (`ActQParams`)."""


class InputScale(nnx.Variable):
    """Per-input-channel divisor ``[in]`` applied before the matmul (smoothing methods)."""


def _value(var: Optional[nnx.Variable]):
    return None if var is None else var.get_value()


class QuantizedLayer(nnx.Module):
    """Common state of seam layers. Subclasses define `in_features`, `kernel` and `__call__`."""

    quant: LayerQuant

    def _init_quant_state(self):
        self.quant = seam.FP
        # Declared as data (not static) so the transforms can fill them in later.
        self.qkernel: Optional[QWeight] = nnx.data(None)
        self.calib: Optional[CalibStats] = nnx.data(None)
        self.act_qparams: Optional[ActQParamsVar] = nnx.data(None)
        self.input_scale: Optional[InputScale] = nnx.data(None)

    def set_view(self, quant_mode: Optional[str] = None) -> None:
        """`nnx.view` hook: ``nnx.view(model, quant_mode="fp")`` switches every quantized layer's mode.

        Layers without weight or activation specs stay in ``fp``; the storage check of `weight_operand` still
        applies to the view (see `bitlaws.quant.transform.with_mode`, which names refused layers up front).
        """
        if quant_mode is None or (self.quant.weight is None and self.quant.act is None):
            return
        self.quant = dataclasses.replace(self.quant, mode=quant_mode)

    @property
    def weight_operand(self):
        """The kernel the seam should use: the packed `QArray` in ``packed`` mode, else the float kernel.

        This is the one place where mode and storage must agree: a layer labelled ``packed`` without a
        packed kernel, or holding a packed kernel in another mode, raises instead of computing something else.
        """
        packed = self.quant.mode == "packed"
        if packed != (self.qkernel is not None):
            holds = "a packed kernel" if self.qkernel is not None else "no packed kernel"
            raise ValueError(f"{type(self).__name__} is in {self.quant.mode!r} mode but holds {holds}; build "
                             f"quantized models with quantize_model and switch modes with with_mode")
        if packed:
            return self.qkernel.get_value()
        if self.kernel is None:
            raise ValueError(f"{type(self).__name__} has neither a float nor a packed kernel")
        return self.kernel[...]

    def _input(self, x: jax.Array) -> jax.Array:
        """Divides by the smoothing `InputScale` (if any), so statistics and quantizers see what the matmul sees."""
        if self.input_scale is None:
            return x
        return x / self.input_scale.get_value().astype(x.dtype)

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        if self.qkernel is not None:
            return self.qkernel.get_value().shape
        return tuple(self.kernel.shape)

    def _observe(self, x: jax.Array, hessian_rows: Optional[jax.Array] = None) -> None:
        if self.quant.mode == "calibrate" and self.calib is not None:
            self.calib.set_value(seam.observe(self.calib.get_value(), x, self.quant.act, hessian_rows))


class QLinear(QuantizedLayer):
    """``y = x @ kernel + bias`` through `seam.qdot`.

    Args:
        in_features: K.
        out_features: N.
        use_bias: Whether to add a bias.
        kernel_init, bias_init: Initializers (defaults: LeCun normal, zeros; ported models overwrite them).
        param_dtype: Parameter dtype.
        rngs: NNX RNG streams (``params``).
    """

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
                 kernel_init=nnx.initializers.lecun_normal(), bias_init=nnx.initializers.zeros_init(),
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.in_features = in_features
        self.out_features = out_features
        self.kernel: Optional[nnx.Param] = nnx.Param(
            kernel_init(rngs.params(), (in_features, out_features), param_dtype))
        self.bias: Optional[nnx.Param] = (
            nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype)) if use_bias else None)
        self._init_quant_state()

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[..., in] -> [..., out]``."""
        x = self._input(x)
        self._observe(x)
        return seam.qdot(x, self.weight_operand, self.quant, bias=_value(self.bias),
                         act_params=_value(self.act_qparams))


def _pairs(value: Union[int, Sequence[int]]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def _conv_padding(padding) -> Union[str, tuple[tuple[int, int], tuple[int, int]]]:
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise ValueError(f"QConv padding must be 'SAME', 'VALID', an int or pairs, got {padding!r}")
        return padding.upper()
    if isinstance(padding, int):
        return ((padding, padding), (padding, padding))
    return tuple(_pairs(p) for p in padding)


class QConv(QuantizedLayer):
    """2-D convolution on NHWC inputs with an HWIO kernel, through `seam.qconv`.

    Args:
        in_features: Input channels C.
        out_features: Output channels O.
        kernel_size: int or (kh, kw).
        strides: int or pair.
        padding: ``'SAME'``, ``'VALID'``, an int (symmetric) or ``((top, bottom), (left, right))``.
        dilation: int or pair (kernel dilation).
        feature_group_count: Grouped convolution (C and O divisible by it).
        use_bias: Whether to add a bias.
        kernel_init, bias_init, param_dtype, rngs: As for `QLinear`.
    """

    def __init__(self, in_features: int, out_features: int, kernel_size: Union[int, Sequence[int]], *,
                 strides: Union[int, Sequence[int]] = 1, padding="SAME",
                 dilation: Union[int, Sequence[int]] = 1, feature_group_count: int = 1,
                 use_bias: bool = True, kernel_init=nnx.initializers.lecun_normal(),
                 bias_init=nnx.initializers.zeros_init(), param_dtype=jnp.float32, rngs: nnx.Rngs):
        if in_features % feature_group_count or out_features % feature_group_count:
            raise ValueError(f"QConv: feature_group_count={feature_group_count} must divide in_features="
                             f"{in_features} and out_features={out_features}")
        self.in_features = in_features
        self.out_features = out_features
        self.kernel_size = _pairs(kernel_size)
        self.strides = _pairs(strides)
        self.padding = _conv_padding(padding)
        self.dilation = _pairs(dilation)
        self.feature_group_count = feature_group_count
        shape = (*self.kernel_size, in_features // feature_group_count, out_features)
        self.kernel: Optional[nnx.Param] = nnx.Param(kernel_init(rngs.params(), shape, param_dtype))
        self.bias: Optional[nnx.Param] = (
            nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype)) if use_bias else None)
        self._init_quant_state()

    def patches(self, x: jax.Array) -> jax.Array:
        """im2col rows ``[B*H'*W', kh*kw*C]`` ordered like the flattened HWIO kernel (for Hessians)."""
        p = jax.lax.conv_general_dilated_patches(
            x, self.kernel_size, self.strides, self.padding, rhs_dilation=self.dilation,
            dimension_numbers=("NHWC", "HWIO", "NHWC"))  # [B, H', W', C*kh*kw], channel-major
        c = x.shape[-1]
        p = p.reshape(*p.shape[:-1], c, self.kernel_size[0] * self.kernel_size[1])
        return jnp.swapaxes(p, -1, -2).reshape(-1, c * self.kernel_size[0] * self.kernel_size[1])

    def __call__(self, x: jax.Array, *, upsample: int = 1) -> jax.Array:
        """``[B, H, W, C] -> [B, H', W', O]``; with ``upsample=f``, of the input nearest-upsampled ``f x f`` first.

        ``self(x, upsample=2)`` equals ``self(nearest_upsample(x, 2))``; float and fake-quant 3x3 convs compute
        it at the input resolution (`bitlaws.quant.upsampled_conv`). Calibration sees the upsampled input.
        """
        x = self._input(x)
        if self.quant.mode == "calibrate":  # statistics (and Hessian rows) of the upsampled input
            x, upsample = upsampled_conv.nearest_upsample(x, upsample), 1
            self._observe(x, self.patches(x) if self.quant.record_hessian else None)
        return seam.qconv(x, self.weight_operand, self.quant, strides=self.strides, padding=self.padding,
                          dilation=self.dilation, feature_group_count=self.feature_group_count,
                          bias=_value(self.bias), act_params=_value(self.act_qparams), upsample=upsample)
