"""`quantize_model`: the functional transform from a float model to a quantized (or calibrating) copy.

Flow::

    rules = [QuantRule(module_path=r".*\\.(qkv|proj|fc1|fc2)", weight=QuantSpec(format="int4", ...))]
    calib_model = quantize_model(model, rules, mode="calibrate")      # records activation statistics
    for batch in batches: forward(calib_model, batch)
    stats = calibration_stats(calib_model)                            # {layer path: ActStats}
    qmodel = quantize_model(model, rules, stats, mode="packed")       # QArray weights, static act scales

The input model is never mutated: the result is a copy whose seam layers carry new `LayerQuant` settings
(and, in ``packed`` mode, `QArray` kernels instead of float ones). Rules are matched against dotted module
paths, first match wins; rules that match no layer are reported with an `UnusedRuleWarning`.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Callable, Iterable, Mapping, Optional, Sequence

import jax
from flax import nnx

from bitlaws.quant import qarray, seam
from bitlaws.quant.layers import ActQParamsVar, CalibStats, QConv, QuantizedLayer, QWeight
from bitlaws.quant.seam import ActStats, LayerQuant
from bitlaws.quant.spec import QuantRule, QuantSpec


class UnusedRuleWarning(UserWarning):
    """A `QuantRule` matched no layer of the model."""


# Weight quantization methods: fn(kernel, spec, stats, reduce_axes) -> QArray. RTN lives here; PTQ methods
# (GPTQ, GPTVQ, AWQ, ...) register themselves from `bitlaws.ptq`.
WeightMethod = Callable[[jax.Array, QuantSpec, Optional[ActStats], Optional[tuple[int, ...]]], qarray.QArray]
_WEIGHT_METHODS: dict[str, WeightMethod] = {}


def register_weight_method(name: str):
    """Registers a weight quantization method ``fn(kernel, spec, stats, reduce_axes) -> QArray`` by name."""

    def wrap(fn: WeightMethod) -> WeightMethod:
        if name in _WEIGHT_METHODS:
            raise ValueError(f"weight method {name!r} is already registered")
        _WEIGHT_METHODS[name] = fn
        return fn

    return wrap


def weight_methods() -> list[str]:
    return sorted(_WEIGHT_METHODS)


@register_weight_method("rtn")
def rtn(kernel: jax.Array, spec: QuantSpec, stats: Optional[ActStats] = None,
        reduce_axes: Optional[tuple[int, ...]] = None) -> qarray.QArray:
    """Round-to-nearest with the spec's calibrator (the paper's baseline, eq. 4-6 for ``minmax``)."""
    del stats
    return qarray.quantize(kernel, spec, reduce_axes)


def module_path(path: Sequence) -> str:
    return ".".join(str(p) for p in path)


def quant_layers(model: nnx.Module) -> list[tuple[str, QuantizedLayer]]:
    """Every seam layer of `model` as ``(dotted path, layer)``, in graph order."""
    return [(module_path(path), m) for path, m in nnx.iter_modules(model) if isinstance(m, QuantizedLayer)]


@dataclasses.dataclass(frozen=True)
class RuleMatch:
    """Result of matching rules against a model.

    Attributes:
        assignments: ``{layer path: rule}`` for every layer some rule matched (first match wins).
        unmatched_layers: Seam layers no rule matched (they stay in floating point).
        unused_rules: Rules that matched no layer.
    """

    assignments: dict[str, QuantRule]
    unmatched_layers: list[str]
    unused_rules: list[QuantRule]


def match_rules(model: nnx.Module, rules: Sequence[QuantRule]) -> RuleMatch:
    """Assigns each seam layer the first rule whose `module_path` fully matches its path."""
    for rule in rules:
        if not isinstance(rule, QuantRule):
            raise TypeError(f"rules must be QuantRule objects, got {type(rule).__name__}")
    assignments, unmatched, used = {}, [], set()
    for path, _ in quant_layers(model):
        for index, rule in enumerate(rules):
            if rule.matches(path):
                assignments[path] = rule
                used.add(index)
                break
        else:
            unmatched.append(path)
    unused = [rule for index, rule in enumerate(rules) if index not in used]
    return RuleMatch(assignments, unmatched, unused)


def _report_unused(unused: Iterable[QuantRule]) -> None:
    for rule in unused:
        warnings.warn(f"QuantRule(module_path={rule.module_path!r}) matched no layer", UnusedRuleWarning,
                      stacklevel=3)


def _hessian_size(layer: QuantizedLayer) -> int:
    if isinstance(layer, QConv):
        kh, kw = layer.kernel_size
        return kh * kw * (layer.in_features // layer.feature_group_count)
    return layer.in_features


def quantize_model(model: nnx.Module, rules: Sequence[QuantRule],
                   calib_stats: Optional[Mapping[str, ActStats]] = None, *, mode: str = "fake",
                   method: str = "rtn", backend: str = "xla", record_hessian: bool = False,
                   warn_unused: bool = True) -> nnx.Module:
    """Returns a quantized copy of `model`; the input is left unchanged.

    Args:
        model: An NNX model built from `QLinear` / `QConv` layers.
        rules: `QuantRule` list; first match per layer wins; unmatched layers stay in ``fp``.
        calib_stats: ``{layer path: ActStats}`` from `calibration_stats`, needed for static activation
            specs and for methods that use statistics (GPTQ's Hessian, ...).
        mode: ``calibrate`` (record statistics), ``fake`` (simulated quantization, QAT) or ``packed``
            (weights become `QArray`s via `method`; the float kernels are dropped).
        method: Registered weight method for ``packed`` mode (``rtn``; PTQ methods add more).
        backend: Matmul backend for ``packed`` mode.
        record_hessian: In ``calibrate`` mode, also accumulate ``X^T X`` per layer.
        warn_unused: Emit an `UnusedRuleWarning` for each rule that matched nothing.

    Returns:
        The new model.

    Raises:
        ValueError: unknown mode/method; a static activation spec without statistics for that layer (the
            message names the layer); a group size that does not divide a layer's kernel.
    """
    if mode not in ("calibrate", "fake", "packed"):
        raise ValueError(f"quantize_model mode must be 'calibrate', 'fake' or 'packed', got {mode!r}")
    if mode == "packed" and method not in _WEIGHT_METHODS:
        raise ValueError(f"unknown weight method {method!r}; registered: {weight_methods()}")
    seam.get_backend(backend)
    new_model = nnx.clone(model)
    matched = match_rules(new_model, rules)
    if warn_unused:
        _report_unused(matched.unused_rules)
    layers = dict(quant_layers(new_model))
    for path, rule in matched.assignments.items():
        layer = layers[path]
        quant = LayerQuant(mode=mode, weight=rule.weight, act=rule.act, backend=backend,
                           record_hessian=record_hessian and mode == "calibrate")
        if mode == "packed" and rule.weight is None:
            quant = dataclasses.replace(quant, mode="fake")  # activations only: nothing to pack
        stats = None if calib_stats is None else calib_stats.get(path)
        if rule.weight is not None:
            k = 1
            for d in layer.kernel_shape[:-1]:
                k *= d
            rule.weight.check_axis(k, f"layer {path!r} kernel {layer.kernel_shape}")
        if mode == "calibrate":
            size = _hessian_size(layer) if quant.record_hessian else None
            layer.calib = CalibStats(ActStats.empty(layer.in_features, size))
        elif rule.act is not None and rule.act.static:
            if stats is None:
                raise ValueError(f"layer {path!r}: static activation spec {rule.act.short()} needs calib_stats "
                                 f"for this layer (run quantize_model(..., mode='calibrate') first)")
            layer.act_qparams = ActQParamsVar(seam.static_act_params(stats, rule.act))
        if quant.mode == "packed":
            layer.qkernel = QWeight(_WEIGHT_METHODS[method](layer.kernel[...], rule.weight, stats, None))
            layer.kernel = None
        if mode != "calibrate":
            layer.calib = None
        layer.quant = quant
    return new_model


def calibration_stats(model: nnx.Module) -> dict[str, ActStats]:
    """Collects ``{layer path: ActStats}`` from a model prepared with ``mode='calibrate'``."""
    stats = {path: layer.calib.get_value() for path, layer in quant_layers(model) if layer.calib is not None}
    if not stats:
        raise ValueError("the model has no calibration statistics; build it with quantize_model(..., "
                         "mode='calibrate') and run it on calibration data first")
    return stats


def run_calibration(model: nnx.Module, rules: Sequence[QuantRule], forward: Callable[[nnx.Module, object], object],
              batches: Iterable, *, record_hessian: bool = False) -> dict[str, ActStats]:
    """Runs `forward(calib_model, batch)` over `batches` and returns the per-layer statistics.

    `forward` may be an `nnx.jit`-compiled function; statistics updates propagate through it.
    """
    calib_model = quantize_model(model, rules, mode="calibrate", record_hessian=record_hessian)
    seen = 0
    for batch in batches:
        forward(calib_model, batch)
        seen += 1
    if not seen:
        raise ValueError("calibrate: no calibration batches were given")
    return calibration_stats(calib_model)


def with_mode(model: nnx.Module, mode: str) -> nnx.Module:
    """A copy of `model` whose quantized layers switch to `mode` (e.g. ``fp`` to compare with float).

    Packed layers cannot leave ``packed`` mode (their float kernels are gone).
    """
    new_model = nnx.clone(model)
    for path, layer in quant_layers(new_model):
        if layer.qkernel is not None and mode != "packed":
            raise ValueError(f"layer {path!r} is packed; it has no float kernel to run in {mode!r} mode")
        if layer.quant.weight is None and layer.quant.act is None:
            continue
        layer.quant = dataclasses.replace(layer.quant, mode=mode)
    return new_model


def bake_fake_weights(model: nnx.Module) -> nnx.Module:
    """A copy whose fake-quantized kernels are replaced by their quantize-dequantize values.

    The result computes exactly what the ``fake`` model computes, but weight quantization happens once
    instead of at every call, and layers with float activations return to ``fp`` mode. Models that differ
    only in weight precision then share one graph definition, so jitted samplers compile once per
    activation setting instead of once per weight setting (what a sweep over many settings needs).
    Training through a baked model updates the baked values: use the ``fake`` model for QAT.
    """
    new_model = nnx.clone(model)
    layers = [layer for _, layer in quant_layers(new_model)
              if layer.quant.mode == "fake" and layer.quant.weight is not None]
    specs = tuple(layer.quant.weight for layer in layers)
    baked = _fake_quant_all([layer.kernel[...] for layer in layers], specs=specs)
    for layer, kernel in zip(layers, baked):
        layer.kernel.set_value(kernel)
        quant = layer.quant
        layer.quant = seam.FP if quant.act is None else dataclasses.replace(quant, weight=None)
    return new_model


@functools.partial(jax.jit, static_argnames=("specs",))
def _fake_quant_all(kernels: list[jax.Array], *, specs: tuple[QuantSpec, ...]) -> list[jax.Array]:
    """`qarray.fake_quant` of every kernel in one compiled call (one compilation per model, not per shape)."""
    return [qarray.fake_quant(kernel, spec) for kernel, spec in zip(kernels, specs)]
