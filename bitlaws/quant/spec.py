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

JSON codecs (`spec_to_json`, `rules_to_json`, `format_to_json` and inverses) store specs and rules in quantized
checkpoints and result records; a format is stored by name, non-integer ones also by definition (`formats_table`).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Optional, Sequence, Union

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


# ------------------------------------------------------------------------------------------ JSON codecs
# How quantized checkpoints and result records store formats, specs and rules (`bitlaws.quant.quantized_checkpoint`).
def format_to_json(fmt: formats.QFormat) -> dict[str, Any]:
    """The full definition of a format (enough to rebuild it where it is not registered)."""
    if isinstance(fmt, formats.IntFormat):
        return {"type": "IntFormat", "bits": fmt.bits, "signed": fmt.signed}
    if isinstance(fmt, formats.FpFormat):
        return {"type": "FpFormat", **dataclasses.asdict(fmt)}
    if isinstance(fmt, formats.MxFormat):
        return {"type": "MxFormat", "element": format_to_json(fmt.element), "name": fmt.name,
                "block_size": fmt.block_size}
    if isinstance(fmt, formats.LutFormat):
        return {"type": "LutFormat", "name": fmt.name, "values": list(fmt.values)}
    raise TypeError(f"cannot serialise format {fmt!r} of type {type(fmt).__name__}")


_FORMAT_TYPES = {"IntFormat": formats.IntFormat, "FpFormat": formats.FpFormat, "MxFormat": formats.MxFormat,
                 "LutFormat": formats.LutFormat}


def format_from_json(data: Mapping[str, Any]) -> formats.QFormat:
    """Inverse of `format_to_json`. Raises ValueError for an unknown type or bad fields."""
    fields = dict(data)
    kind = fields.pop("type", None)
    if kind not in _FORMAT_TYPES:
        raise ValueError(f"format definition {dict(data)!r}: unknown type {kind!r}; known: {sorted(_FORMAT_TYPES)}")
    if kind == "MxFormat":
        fields["element"] = format_from_json(fields["element"])
    if kind == "LutFormat":
        fields["values"] = tuple(fields["values"])
    try:
        return _FORMAT_TYPES[kind](**fields)
    except TypeError as e:
        raise ValueError(f"format definition {dict(data)!r}: {e}") from e


def _resolve_format(name: str, table: Mapping[str, Any]) -> formats.QFormat:
    """The format `name`: from the checkpoint's `table` (checked against a registered format of that name)."""
    if name not in table:
        return formats.parse_format(name)
    stored = format_from_json(table[name])
    try:
        registered = formats.parse_format(name)
    except ValueError:
        return stored  # not registered here: the stored definition is all there is
    if registered != stored:
        raise ValueError(f"format {name!r} is registered here as {registered!r}, but the checkpoint was written "
                         f"with {stored!r}")
    return registered


def spec_to_json(spec: QuantSpec) -> dict[str, Any]:
    """Every field of `spec`, the format by name (`formats_table` gives the definitions)."""
    out = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
    out["format"] = spec.format.name
    return out


def spec_from_json(data: Mapping[str, Any], formats_table: Optional[Mapping[str, Any]] = None) -> QuantSpec:
    """Inverse of `spec_to_json`; raises ValueError naming unknown fields."""
    fields = dict(data)
    known = {f.name for f in dataclasses.fields(QuantSpec)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"QuantSpec record has unknown field(s) {unknown}; known: {sorted(known)}")
    fields["format"] = _resolve_format(fields["format"], formats_table or {})
    return QuantSpec(**fields)


def optional_spec_from_json(data: Optional[Mapping[str, Any]],
                            formats_table: Optional[Mapping[str, Any]] = None) -> Optional[QuantSpec]:
    """`spec_from_json`, or None for a None record (a rule or layer without that spec)."""
    return None if data is None else spec_from_json(data, formats_table)


def rules_to_json(rules: Sequence[QuantRule]) -> list[dict[str, Any]]:
    """``[{"module_path", "weight": SPEC | None, "act": SPEC | None[, "backend": NAME]}, ...]``."""
    return [{"module_path": r.module_path, "weight": None if r.weight is None else spec_to_json(r.weight),
             "act": None if r.act is None else spec_to_json(r.act),
             **({"backend": r.backend} if r.backend is not None else {})} for r in rules]


def rules_from_json(data: Sequence[Mapping[str, Any]],
                    formats_table: Optional[Mapping[str, Any]] = None) -> list[QuantRule]:
    """Inverse of `rules_to_json`."""
    return [QuantRule(module_path=r["module_path"], weight=optional_spec_from_json(r.get("weight"), formats_table),
                      act=optional_spec_from_json(r.get("act"), formats_table), backend=r.get("backend")) for r in data]


def formats_table(specs: Sequence[Optional[QuantSpec]]) -> dict[str, Any]:
    """``{name: definition}`` of the non-integer formats of `specs` (integer formats parse from their name)."""
    table = {}
    for spec in specs:
        if spec is not None and not isinstance(spec.format, formats.IntFormat):
            table[spec.format.name] = format_to_json(spec.format)
    return dict(sorted(table.items()))
