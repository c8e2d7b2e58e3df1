"""Precision settings (``W4A16`` ...), format families (``int`` / ``fp``) and the sweep's method registry.

A *setting* names the bits of weights and input activations: ``W<w>A<a>``, where 16 means "kept in
floating point". A *format family* turns bits into concrete formats:

=======  ==========================================  ===========================================
family   weights (per output channel, or groups)      activations (dynamic, one scale per token)
=======  ==========================================  ===========================================
``int``  ``int<w>`` (symmetric, minmax), 2..8 bits    ``int<a>``
``fp``   8: ``fp8_e4m3``, 6: ``fp6_e2m3``,            the same table
         4: ``fp4_e2m1``; other widths do not exist
=======  ==========================================  ===========================================

``W16A16`` is the float baseline: one cell whose format is ``none`` and whose method is ``none``.

Methods: the sweep looks every method up by name in ONE registry (`get_method`). It holds the float
baseline ``none``, every weight method of `bitlaws.quant.transform` (``rtn`` and PTQ methods registered
there) and whatever `register_method` adds (QAT methods, PTQ methods that need custom calibration).
Weight methods produce ``packed`` models (``rtn`` without static activations: the numerically equal baked
fake-quant model, see `_weight_method`); every weight method except ``rtn`` gets calibration statistics
(with ``X^T X``) from the evaluator's `MethodContext.calibrate` callback.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping, Optional, Sequence

from flax import nnx

from bitlaws.quant import transform
from bitlaws.quant.seam import ActStats
from bitlaws.quant.spec import QuantRule, QuantSpec

FLOAT_BITS = 16
FLOAT_FORMAT = "none"
FLOAT_METHOD = "none"
STANDARD_SETTINGS = ("W16A16", "W8A16", "W4A16", "W3A16", "W8A8", "W4A8")
FORMAT_FAMILIES = ("int", "fp")

_INT_BITS = range(2, 9)
_FP_BY_BITS = {8: "fp8_e4m3", 6: "fp6_e2m3", 4: "fp4_e2m1"}
_SETTING_PATTERN = re.compile(r"W(\d+)A(\d+)", re.IGNORECASE)


class NotApplicable(ValueError):
    """A (setting, format family) pair that has no concrete format, e.g. W3 with ``fp``."""


@dataclasses.dataclass(frozen=True)
class Setting:
    """Bits of weights and activations; 16 means floating point.

    Attributes:
        w_bits: Weight bits (2..8, or 16).
        a_bits: Input-activation bits (2..8, or 16).
    """

    w_bits: int
    a_bits: int

    @property
    def name(self) -> str:
        return f"W{self.w_bits}A{self.a_bits}"

    @property
    def is_float(self) -> bool:
        return self.w_bits == FLOAT_BITS and self.a_bits == FLOAT_BITS


def parse_setting(name: str) -> Setting:
    """Parses ``"W4A8"`` (any ``W<w>A<a>``, case-insensitive) into a `Setting`.

    Raises:
        ValueError: malformed name, or bits outside 2..8 that are not 16.
    """
    match = _SETTING_PATTERN.fullmatch(str(name).strip())
    if not match:
        raise ValueError(f"precision setting {name!r} must look like W<bits>A<bits>, e.g. W4A16")
    w_bits, a_bits = int(match.group(1)), int(match.group(2))
    for what, bits in (("weight", w_bits), ("activation", a_bits)):
        if bits != FLOAT_BITS and bits not in _INT_BITS:
            raise ValueError(f"precision setting {name!r}: {what} bits must be 2..8 or 16, got {bits}")
    return Setting(w_bits, a_bits)


def format_name(bits: int, family: str) -> Optional[str]:
    """The concrete format of `family` with `bits` bits (None for 16 = float).

    Raises:
        NotApplicable: the family has no format of that width (e.g. 3-bit float).
        ValueError: unknown family.
    """
    if family not in FORMAT_FAMILIES:
        raise ValueError(f"unknown format family {family!r}; valid: {FORMAT_FAMILIES}")
    if bits == FLOAT_BITS:
        return None
    if family == "int":
        if bits not in _INT_BITS:
            raise NotApplicable(f"no {bits}-bit integer format (int supports 2..8 bits)")
        return f"int{bits}"
    if bits not in _FP_BY_BITS:
        raise NotApplicable(f"no {bits}-bit float format (fp has {sorted(_FP_BY_BITS)} bits)")
    return _FP_BY_BITS[bits]


def not_applicable_reason(setting: str, family: str) -> Optional[str]:
    """Why (`setting`, `family`) has no cell, or None if it has one. ``W16A16`` is applicable only as ``none``."""
    parsed = parse_setting(setting)
    if parsed.is_float:
        return None if family == FLOAT_FORMAT else f"{parsed.name} is the float baseline (format 'none')"
    if family == FLOAT_FORMAT:
        return f"format 'none' only applies to W16A16, not {parsed.name}"
    try:
        format_name(parsed.w_bits, family)
        format_name(parsed.a_bits, family)
    except NotApplicable as e:
        return f"{parsed.name} with {family}: {e}"
    return None


def quant_rules(setting: str, family: str, module_path: str, *, weight_group_size: Optional[int] = None,
                weight_calibrator: str = "minmax") -> list[QuantRule]:
    """The `QuantRule` list that realises `setting` in `family` on the layers matching `module_path`.

    Weights get one scale per output channel (or per `weight_group_size` rows of the kernel's reduction
    view), activations one dynamic scale per token.

    Args:
        setting: ``W<w>A<a>``.
        family: ``int``, ``fp`` or ``none`` (only with ``W16A16``).
        module_path: Regex over dotted module paths of the layers to quantize.
        weight_group_size: None for per-channel weight scales, else the group size.
        weight_calibrator: Calibrator of the weight scales (``minmax`` is the paper's RTN).

    Returns:
        ``[]`` for ``W16A16``, else one rule.

    Raises:
        NotApplicable / ValueError: see `not_applicable_reason`.
    """
    reason = not_applicable_reason(setting, family)
    if reason is not None:
        raise NotApplicable(reason)
    parsed = parse_setting(setting)
    if parsed.is_float:
        return []
    weight_fmt = format_name(parsed.w_bits, family)
    act_fmt = format_name(parsed.a_bits, family)
    weight = None
    if weight_fmt is not None:
        granularity = "channel" if weight_group_size is None else "group"
        weight = QuantSpec(format=weight_fmt, granularity=granularity, group_size=weight_group_size,
                           calibrator=weight_calibrator)
    act = None if act_fmt is None else QuantSpec(format=act_fmt, granularity="token", calibrator="minmax")
    return [QuantRule(module_path=module_path, weight=weight, act=act)]


# ---------------------------------------------------------------------------------------------- methods

# calibrate(model, rules, record_hessian) -> {layer path: ActStats}; supplied by the evaluator, which knows
# the model's data (e.g. `transform.run_calibration` with its forward function and a few batches).
CalibrateFn = Callable[[nnx.Module, Sequence[QuantRule], bool], Mapping[str, ActStats]]


@dataclasses.dataclass(frozen=True)
class MethodContext:
    """What a method may use besides the model and the rules.

    Attributes:
        params: The cell's method hyper-parameters.
        calibrate: Calibration callback of the evaluator, or None when it has no calibration data.
        seed: The cell's PRNG seed (`Cell.prng_seed`).
    """

    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    calibrate: Optional[CalibrateFn] = None
    seed: int = 0


QuantizeFn = Callable[[nnx.Module, Sequence[QuantRule], MethodContext], nnx.Module]


@dataclasses.dataclass(frozen=True)
class QuantMethod:
    """A registered quantization method.

    Attributes:
        name: Registry name (used in cell keys).
        kind: ``float`` (the baseline), ``ptq`` or ``qat``.
        quantize: ``quantize(model, rules, context) -> quantized copy`` (the input is not mutated).
    """

    name: str
    kind: str
    quantize: QuantizeFn


_METHODS: dict[str, QuantMethod] = {}
METHOD_KINDS = ("float", "ptq", "qat")


def register_method(name: str, quantize: QuantizeFn, *, kind: str) -> None:
    """Registers a sweep method (QAT methods, or PTQ methods needing more than `register_weight_method`).

    A name registered here shadows a `bitlaws.quant.transform` weight method of the same name.
    """
    if kind not in METHOD_KINDS:
        raise ValueError(f"method kind must be one of {METHOD_KINDS}, got {kind!r}")
    if name in _METHODS:
        raise ValueError(f"sweep method {name!r} is already registered")
    if "|" in name or "[" in name:
        raise ValueError(f"method name {name!r} must not contain '|' or '['")
    _METHODS[name] = QuantMethod(name, kind, quantize)


def method_names() -> list[str]:
    """Every method name `get_method` resolves."""
    return sorted(set(_METHODS) | set(transform.weight_methods()))


def _weight_method(name: str) -> QuantMethod:
    """Wraps a `transform` weight method: packed weights, statistics only when the method needs them."""

    def quantize(model: nnx.Module, rules: Sequence[QuantRule], context: MethodContext) -> nnx.Module:
        if context.params:
            raise ValueError(f"weight method {name!r} takes no hyper-parameters, got {dict(context.params)}; "
                             f"register a sweep method with register_method to pass them")
        static_acts = any(rule.act is not None and rule.act.static for rule in rules)
        needs_stats = static_acts or name != "rtn"
        stats = None
        if needs_stats:
            if context.calibrate is None:
                raise ValueError(f"method {name!r} needs calibration statistics but the evaluator gives no "
                                 f"calibration callback")
            stats = context.calibrate(model, rules, name != "rtn")
        if name == "rtn" and stats is None:
            # Same numbers as the packed RTN model (tested in tests/quant), but weights are quantized once and
            # weight-only settings share the float model's graph: samplers compile once per activation setting.
            return transform.bake_fake_weights(transform.quantize_model(model, rules, mode="fake", warn_unused=False))
        return transform.quantize_model(model, rules, stats, mode="packed", method=name, warn_unused=False)

    return QuantMethod(name, "ptq", quantize)


def get_method(name: str) -> QuantMethod:
    """Looks `name` up in the one registry the sweep uses.

    Raises:
        ValueError: unknown name (the message lists the registered ones).
    """
    if name in _METHODS:
        return _METHODS[name]
    if name in transform.weight_methods():
        return _weight_method(name)
    raise ValueError(f"unknown quantization method {name!r}; registered methods: {method_names()}")


def quantize_for_cell(model: nnx.Module, rules: Sequence[QuantRule], method: str,
                      context: Optional[MethodContext] = None) -> nnx.Module:
    """Applies `method` with `rules` to `model`; with no rules (W16A16) returns `model` itself."""
    if not rules:
        return model
    return get_method(method).quantize(model, rules, context or MethodContext())


def _float_baseline(model: nnx.Module, rules: Sequence[QuantRule], context: MethodContext) -> nnx.Module:
    del context
    if rules:
        raise ValueError("method 'none' (the float baseline) only applies to W16A16")
    return model


register_method(FLOAT_METHOD, _float_baseline, kind="float")


def quant_options(config) -> dict[str, Any]:
    """Keyword arguments of `quant_rules` from the optional ``config.quant`` block of a sweep config.

    ``config.quant.weight_group_size`` (None or 0 = per channel) and ``config.quant.weight_calibrator``.
    """
    block = config.get("quant", None) if hasattr(config, "get") else None
    if not block:
        return {}
    options: dict[str, Any] = {}
    group_size = block.get("weight_group_size", None)
    if group_size:
        options["weight_group_size"] = int(group_size)
    calibrator = block.get("weight_calibrator", None)
    if calibrator:
        options["weight_calibrator"] = str(calibrator)
    return options
