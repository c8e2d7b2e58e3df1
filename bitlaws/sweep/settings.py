"""Precision settings (``W4A16`` ...), format families (``int`` / ``fp``) and how a cell applies its method.

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

Methods: the sweep looks every method up in the ONE registry of `bitlaws.quant.methods` (the float
baseline ``none``, ``rtn``, PTQ and QAT methods, and whatever user code registers there). A cell's method
runs through `bitlaws.quant.transform.apply_method` with the cell's hyper-parameters
(``config.method_params``), the evaluator's calibration callback (methods that need statistics get them
from it; a cached callback computes them once per model) and the representation chosen by
`materialize_for` (``baked`` by default, ``packed`` for the settings in ``config.quant.packed_settings``).
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from typing import Any, Mapping, Optional, Sequence

from flax import nnx

from bitlaws import ptq, qat  # noqa: F401  (register the PTQ and QAT methods)
from bitlaws.quant import methods, transform
from bitlaws.quant.spec import QuantRule, QuantSpec

FLOAT_BITS = 16
FLOAT_FORMAT = "none"
FLOAT_METHOD = methods.FLOAT_METHOD
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
    view), stored as float16 (`QuantSpec.scale_dtype`); activations one dynamic float32 scale per token.

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
    # Dynamic per-token scales are computed by the kernel at run time and never stored, so they stay float32
    # (as in an int8 x int8 kernel), not the float16 storage of weight scales.
    act = None if act_fmt is None else QuantSpec(format=act_fmt, granularity="token", calibrator="minmax",
                                                 scale_dtype="float32")
    return [QuantRule(module_path=module_path, weight=weight, act=act)]


# ---------------------------------------------------------------------------------------------- methods

# calibrate(model, rules, record_hessian) -> {layer path: ActStats}; supplied by the evaluator, which knows
# the model's data (e.g. `transform.run_calibration` with its forward function and a few batches).
CalibrateFn = methods.CalibrateFn


@dataclasses.dataclass(frozen=True)
class MethodContext:
    """What a method may use besides the model and the rules.

    Attributes:
        params: The cell's method hyper-parameters.
        calibrate: Calibration callback of the evaluator, or None when it has no calibration data.
        data: The evaluator's calibration data (`bitlaws.quant.CalibrationData`), for methods that run the
            model on it themselves (block-wise OmniQuant, sequential GPTQ), or None.
        seed: The cell's PRNG seed (`Cell.prng_seed`).
        materialize: ``baked`` (default: quantized values in float, one compilation for every weight-only
            setting), ``packed`` (real `QArray` storage) or ``fake`` (see `bitlaws.quant.methods`).
        backend: Matmul backend of packed layers (``config.quant.backend``, `backend_for`).
    """

    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    calibrate: Optional[CalibrateFn] = None
    data: Optional[methods.CalibrationData] = None
    seed: int = 0
    materialize: str = "baked"
    backend: str = "xla"


def import_modules(config) -> None:
    """Imports ``config.imports`` (optional list of module names, in order), then ``config.evaluator_module``.

    Grid expansion calls it before it validates method names, and every sweep worker process calls it before
    anything else (`bitlaws.sweep.parallel`), so what these modules register (methods, calibrators, formats,
    the evaluator) exists wherever a name is looked up. A config built in memory lists here the modules that
    register its custom methods; a config file may simply import them.

    Raises:
        ImportError: a module that cannot be imported.
        ValueError: ``config.imports`` is not a list of module names.
    """
    get = config.get if hasattr(config, "get") else lambda key, default=None: default
    names = get("imports", None) or ()
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    for module in names:
        if not isinstance(module, str) or not module:
            raise ValueError(f"config.imports must list module names, got {module!r}")
        importlib.import_module(module)
    evaluator_module = get("evaluator_module", None)
    if evaluator_module:
        importlib.import_module(evaluator_module)


def method_names() -> list[str]:
    """Every method name the sweep resolves (the one registry, `bitlaws.quant.methods`)."""
    return methods.method_names()


def get_method(name: str) -> methods.QuantMethod:
    """Looks `name` up in the one method registry.

    Raises:
        ValueError: unknown name (the message lists the registered ones).
    """
    return methods.get_method(name)


def quantize_for_cell(model: nnx.Module, rules: Sequence[QuantRule], method: str,
                      context: Optional[MethodContext] = None) -> nnx.Module:
    """Applies `method` with `rules` to `model` as `context.materialize`; no rules (W16A16): `model` itself."""
    context = context or MethodContext()
    return transform.apply_method(model, rules, method, materialize=context.materialize, params=context.params,
                                  calibrate=context.calibrate, data=context.data, seed=context.seed,
                                  backend=context.backend, warn_unused=False)


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


def backend_for(config) -> str:
    """The matmul backend of a sweep's packed cells: ``config.quant.backend`` (default ``xla``; ``pallas`` runs
    the `pallas_kernels` on a GPU).

    Raises:
        ValueError: an unknown backend name (the message lists the known ones).
    """
    block = config.get("quant", None) if hasattr(config, "get") else None
    name = str((block or {}).get("backend", None) or "xla")
    from bitlaws.quant import backends  # pylint: disable=g-import-not-at-top

    backends.get_backend(name)
    return name


def materialize_for(config, setting: str) -> str:
    """How a cell of `setting` materializes its quantized model: ``packed`` for the settings listed in
    ``config.quant.packed_settings`` (real `QArray` storage, measured ``storage_bytes``), else
    ``config.quant.materialize`` (default ``baked``: the same numbers in float, one compilation for every
    weight-only setting).

    Raises:
        ValueError: an unknown representation or a malformed setting name in the config.
    """
    block = config.get("quant", None) if hasattr(config, "get") else None
    block = block or {}
    default = str(block.get("materialize", None) or "baked")
    if default not in methods.MATERIALIZE:
        raise ValueError(f"config.quant.materialize must be one of {methods.MATERIALIZE}, got {default!r}")
    packed = {parse_setting(name).name for name in (block.get("packed_settings", None) or ())}
    return "packed" if parse_setting(setting).name in packed else default
