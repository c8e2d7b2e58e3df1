"""`QuantSpec` (how one tensor is quantized) and `QuantRule` (which layers get which specs).

Granularity is defined on the *reduction view* of a tensor: the axes that share a scale (``reduce_axes``)
are flattened to K and the remaining axes to N, giving a (K, N) matrix.

* weights (kernels with output channels last): K = the contraction axes, N = output channels;
* activations ``(..., features)``: K = features, N = tokens.

=============  ==========================================  ==========================
granularity    one scale per                               typical use
=============  ==========================================  ==========================
``tensor``     the whole tensor                            static activations
``channel``    column of the view (output channel)         weights
``token``      column of the view (token), activations     dynamic activations
``group``      ``group_size`` consecutive rows of a column  weights (g128), MX blocks
=============  ==========================================  ==========================
"""

from __future__ import annotations

import dataclasses
import re
from typing import Optional, Union

from bitlaws.quant import formats

GRANULARITIES = ("tensor", "channel", "token", "group")
SCALE_DTYPES = ("float16", "bfloat16", "float32")


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantSpec:
    """How to quantize one tensor: numeric format, scale granularity and calibrator.

    Attributes:
        format: A format name accepted by `parse_format` (``"int4"``, ``"fp8_e4m3"``, ``"mxfp4"``) or a
            format object. Stored parsed.
        granularity: One of ``tensor``, ``channel``, ``token``, ``group`` (see the module docstring).
            Defaults to ``group`` (32) for MX formats and ``channel`` otherwise.
        group_size: Rows of the reduction view per scale; required for, and only allowed with, ``group``.
        calibrator: Name of a registered calibrator: ``minmax`` (paper eq. 4-6), ``absmax``,
            ``percentile``, ``mse``.
        percentile: Percentile kept by the ``percentile`` calibrator, in (50, 100].
        mse_candidates: Number of clipping ratios the ``mse`` calibrator tries.
        mse_min_ratio: Smallest clipping ratio (fraction of the min-max range) it tries, in (0, 1].
        scale_dtype: Storage dtype of scales (``float16`` default; MX formats always use E8M0).
        static: Activations only: use a calibrated (static) scale instead of computing it per call.
    """

    format: Union[str, formats.QFormat]
    granularity: Optional[str] = None
    group_size: Optional[int] = None
    calibrator: str = "minmax"
    percentile: float = 99.99
    mse_candidates: int = 32
    mse_min_ratio: float = 0.3
    scale_dtype: str = "float16"
    static: bool = False

    def __post_init__(self):
        fmt = formats.parse_format(self.format)
        object.__setattr__(self, "format", fmt)
        granularity = self.granularity
        if granularity is None:
            granularity = "group" if fmt.is_mx else "channel"
            object.__setattr__(self, "granularity", granularity)
        if granularity not in GRANULARITIES:
            raise ValueError(f"QuantSpec.granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if fmt.is_mx:
            if granularity != "group":
                raise ValueError(
                    f"QuantSpec.granularity must be 'group' for MX format {fmt.name} (one E8M0 scale per "
                    f"{fmt.block_size} elements), got {granularity!r}")
            if self.group_size is None:
                object.__setattr__(self, "group_size", fmt.block_size)
            elif self.group_size != fmt.block_size:
                raise ValueError(
                    f"QuantSpec.group_size must be {fmt.block_size} for MX format {fmt.name}, got "
                    f"{self.group_size}")
        if granularity == "group":
            if self.group_size is None:
                raise ValueError("QuantSpec.group_size is required when granularity='group'")
            if not isinstance(self.group_size, int) or self.group_size < 1:
                raise ValueError(f"QuantSpec.group_size must be a positive integer, got {self.group_size!r}")
        elif self.group_size is not None:
            raise ValueError(
                f"QuantSpec.group_size={self.group_size} is only valid with granularity='group' "
                f"(got granularity={granularity!r})")
        # Imported here: calibrate.py imports this module for type hints only at runtime.
        from bitlaws.quant import calibrate  # pylint: disable=g-import-not-at-top

        if self.calibrator not in calibrate.CALIBRATORS:
            raise ValueError(
                f"QuantSpec.calibrator {self.calibrator!r} is unknown; registered calibrators: "
                f"{sorted(calibrate.CALIBRATORS)}")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"QuantSpec.percentile must be in (50, 100], got {self.percentile}")
        if not isinstance(self.mse_candidates, int) or self.mse_candidates < 1:
            raise ValueError(f"QuantSpec.mse_candidates must be a positive integer, got {self.mse_candidates}")
        if not 0.0 < self.mse_min_ratio <= 1.0:
            raise ValueError(f"QuantSpec.mse_min_ratio must be in (0, 1], got {self.mse_min_ratio}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"QuantSpec.scale_dtype must be one of {SCALE_DTYPES}, got {self.scale_dtype!r}")
        if self.static and granularity != "tensor":
            raise ValueError(
                f"QuantSpec.static=True needs granularity='tensor' (a calibrated scale cannot be per token), "
                f"got granularity={granularity!r}")

    @property
    def bits(self) -> int:
        """Nominal bits per value (the paper's b_w / b_a)."""
        return self.format.bits

    def check_axis(self, length: int, what: str = "tensor") -> None:
        """Raises ValueError if `group_size` does not divide a reduction axis of `length` elements."""
        if self.granularity == "group" and length % self.group_size:
            raise ValueError(
                f"QuantSpec.group_size={self.group_size} does not divide the reduction axis of length {length} "
                f"of {what}")

    def short(self) -> str:
        """A compact human-readable label, e.g. ``int4/g128/minmax``."""
        gran = f"g{self.group_size}" if self.granularity == "group" else self.granularity
        suffix = "/static" if self.static else ""
        return f"{self.format.name}/{gran}/{self.calibrator}{suffix}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantRule:
    """Assigns quantization specs to every layer whose module path matches a regex.

    Module paths are dotted NNX attribute paths (``blocks.3.attn.qkv``). Matching uses `re.fullmatch`;
    in a list of rules the first match wins, and rules that match nothing are reported.

    Attributes:
        module_path: Regular expression over the dotted module path.
        weight: Spec for the layer's kernel, or None to keep it in floating point.
        act: Spec for the layer's input activations, or None to keep them in floating point. Its
            granularity must be ``tensor``, ``token`` or ``group``; ``static=True`` uses calibrated scales.
        backend: Matmul backend of the matched layers in ``packed`` mode (`bitlaws.quant.backends`), or None
            for the one the model is materialized with (``apply_method(..., backend=...)``).
    """

    module_path: str
    weight: Optional[QuantSpec] = None
    act: Optional[QuantSpec] = None
    backend: Optional[str] = None

    def __post_init__(self):
        if self.backend is not None and (not isinstance(self.backend, str) or not self.backend):
            raise ValueError(f"QuantRule.backend must be None or a backend name, got {self.backend!r}")
        try:
            re.compile(self.module_path)
        except re.error as e:
            raise ValueError(f"QuantRule.module_path {self.module_path!r} is not a valid regex: {e}") from e
        if self.weight is not None:
            if not isinstance(self.weight, QuantSpec):
                raise TypeError(f"QuantRule.weight must be a QuantSpec, got {type(self.weight).__name__}")
            if self.weight.granularity == "token":
                raise ValueError("QuantRule.weight granularity 'token' applies to activations only")
            if self.weight.static:
                raise ValueError("QuantRule.weight: static=True applies to activations only")
        if self.act is not None:
            if not isinstance(self.act, QuantSpec):
                raise TypeError(f"QuantRule.act must be a QuantSpec, got {type(self.act).__name__}")
            if self.act.granularity == "channel":
                raise ValueError(
                    "QuantRule.act granularity 'channel' (one scale per input feature) cannot be folded into "
                    "a matmul; use 'token', 'tensor' or 'group'")

    def matches(self, path: str) -> bool:
        return re.fullmatch(self.module_path, path) is not None
