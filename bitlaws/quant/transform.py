"""`quantize_model` / `apply_method`: from a float model to a quantized (or calibrating) one.

Flow::

    rules = [QuantRule(module_path=r"blocks\\.\\d+\\..*", weight=QuantSpec(format="int4", ...))]
    calib_model = quantize_model(model, rules, mode="calibrate")      # records activation statistics
    for batch in batches: forward(calib_model, batch)
    stats = calibration_stats(calib_model)                            # {layer path: ActStats}
    qmodel = quantize_model(model, rules, stats, mode="packed", method="rtn")

`quantize_model` calls a method of the one registry (`bitlaws.quant.methods`) and materializes its result as
``packed`` (`QArray` kernels), ``baked`` (their dequantized values in float) or ``fake`` (float kernels
quantize-dequantized at every call, for QAT). The input model is never mutated: the result is a new graph
that shares every untouched array with it. Rules are matched against dotted module paths, first match
wins; rules that match no layer are reported with an `UnusedRuleWarning`. Before anything is quantized,
every matched layer is checked (group sizes, finite kernels) and all offenders are named in one error.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Callable, Iterable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from bitlaws.quant import methods, qarray, seam
from bitlaws.quant.layers import ActQParamsVar, CalibStats, InputScale, QConv, QuantizedLayer, QWeight
from bitlaws.quant.methods import MethodResult, Target, rtn
from bitlaws.quant.seam import ActStats, LayerQuant
from bitlaws.quant.spec import QuantRule


class UnusedRuleWarning(UserWarning):
    """A `QuantRule` matched no layer of the model."""


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


def _contraction_size(layer: QuantizedLayer) -> int:
    """K of the kernel's reduction view: every kernel axis but the last (output channels)."""
    k = 1
    for d in layer.kernel_shape[:-1]:
        k *= d
    return k


def rule_problems(model: nnx.Module, rules: Sequence[QuantRule]) -> list[str]:
    """One line per matched layer whose kernel cannot take its rule's weight spec (empty list: all fine).

    Checks shapes only, so it works on abstract models (`nnx.eval_shape`) and costs nothing.
    """
    problems = []
    layers = dict(quant_layers(model))
    for path, rule in match_rules(model, rules).assignments.items():
        spec = rule.weight
        if spec is None or spec.granularity != "group":
            continue
        k = _contraction_size(layers[path])
        if k % spec.group_size:
            problems.append(f"{path} (kernel {tuple(layers[path].kernel_shape)}: K={k} is not a multiple of "
                            f"group_size={spec.group_size})")
    return problems


def check_rules(model: nnx.Module, rules: Sequence[QuantRule]) -> None:
    """Raises one ValueError naming every matched layer whose kernel cannot take its rule's weight spec.

    Called by `quantize_model` before it changes anything; sweeps call it on abstract models before the
    first cell. Works on concrete and abstract (`nnx.eval_shape`) models.
    """
    problems = rule_problems(model, rules)
    if problems:
        raise ValueError(f"{len(problems)} layer(s) cannot take their rule's weight spec: {'; '.join(problems)} "
                         f"- use a group size that divides K, or a module_path that leaves these layers out")


@jax.jit
def _non_finite_count(x: jax.Array) -> jax.Array:
    """Number of NaN / infinite values of `x` (one compiled program per shape, not one per eager op)."""
    return jnp.sum(~jnp.isfinite(x), dtype=jnp.int32)


def _check_finite_kernels(model: nnx.Module, rules: Sequence[QuantRule]) -> None:
    """Raises one ValueError naming every matched layer whose float kernel holds NaN or infinity."""
    layers = dict(quant_layers(model))
    bad = []
    for path, rule in match_rules(model, rules).assignments.items():
        layer = layers[path]
        if rule.weight is None or layer.kernel is None:
            continue
        kernel = layer.kernel[...]
        if isinstance(kernel, jax.core.Tracer) or not hasattr(kernel, "dtype"):
            continue  # abstract or traced: nothing to look at
        count = int(_non_finite_count(kernel))
        if count:
            bad.append(f"{path} ({count} of {kernel.size} values)")
    if bad:
        raise ValueError(f"non-finite kernel values in {len(bad)} layer(s): {'; '.join(bad)}; quantizing them "
                         f"would give NaN weights - fix the checkpoint or leave these layers out of the rules")


def _hessian_size(layer: QuantizedLayer) -> int:
    if isinstance(layer, QConv):
        kh, kw = layer.kernel_size
        return kh * kw * (layer.in_features // layer.feature_group_count)
    return layer.in_features


MODES = ("calibrate",) + methods.MATERIALIZE


def quantize_model(model: nnx.Module, rules: Sequence[QuantRule],
                   calib_stats: Optional[Mapping[str, ActStats]] = None, *, mode: str = "fake",
                   method: str = "rtn", params: Optional[Mapping] = None, backend: str = "xla",
                   record_hessian: bool = False, calibrate: Optional[methods.CalibrateFn] = None,
                   data: Optional[methods.CalibrationData] = None, seed: int = 0,
                   warn_unused: bool = True) -> nnx.Module:
    """Returns a quantized (or calibrating) version of `model`; the input is left unchanged.

    Args:
        model: An NNX model built from `QLinear` / `QConv` layers.
        rules: `QuantRule` list; first match per layer wins; unmatched layers stay in ``fp``.
        calib_stats: ``{layer path: ActStats}`` from `calibration_stats`, for static activation specs and for
            methods that use statistics (GPTQ's Hessians, SmoothQuant's channel maxima ...).
        mode: ``calibrate`` (record statistics), or how the method's result is materialized: ``fake``
            (simulated quantization at every call, for QAT), ``baked`` (quantized values stored in float) or
            ``packed`` (`QArray` kernels; the float kernels are dropped). See `bitlaws.quant.methods`.
        method: A registered method (`bitlaws.quant.methods.method_names`; ``rtn`` by default).
        params: The method's hyper-parameters (unknown names are an error).
        backend: Matmul backend for ``packed`` layers.
        record_hessian: In ``calibrate`` mode, also accumulate ``X^T X`` per layer.
        calibrate: ``calibrate(model, rules, record_hessian) -> stats``, used when the method needs statistics
            and `calib_stats` is None (and by methods that recalibrate). Default with `data`: a cached
            calibration over it.
        data: The calibration data (`CalibrationData`), for methods that run the model on it themselves.
        seed: PRNG seed for methods with randomness.
        warn_unused: Emit an `UnusedRuleWarning` for each rule that matched nothing.

    Returns:
        The new model.

    Raises:
        ValueError: unknown mode/method/hyper-parameter; statistics needed but missing (the message names the
            layer); group sizes that do not divide layers' kernels, or kernels holding NaN/inf (one error
            naming every such layer, raised before anything is quantized).
    """
    if mode not in MODES:
        raise ValueError(f"quantize_model mode must be one of {MODES}, got {mode!r}")
    if mode == "calibrate":
        return _calibration_model(model, rules, record_hessian=record_hessian, warn_unused=warn_unused)
    return apply_method(model, rules, method, materialize=mode, params=params, calib_stats=calib_stats,
                        calibrate=calibrate, data=data, seed=seed, backend=backend, warn_unused=warn_unused)


def _calibration_model(model: nnx.Module, rules: Sequence[QuantRule], *, record_hessian: bool,
                       warn_unused: bool) -> nnx.Module:
    """A version of `model` whose matched layers record `ActStats` (float computation otherwise)."""
    check_rules(model, rules)
    new_model = nnx.clone(model)  # shares every array with `model`
    matched = match_rules(new_model, rules)
    if warn_unused:
        _report_unused(matched.unused_rules)
    layers = dict(quant_layers(new_model))
    for path, rule in matched.assignments.items():
        layer = layers[path]
        layer.quant = LayerQuant(mode="calibrate", weight=rule.weight, act=rule.act, record_hessian=record_hessian)
        layer.calib = CalibStats(ActStats.empty(layer.in_features, _hessian_size(layer) if record_hessian else None))
    return new_model


def apply_method(model: nnx.Module, rules: Sequence[QuantRule], method: str = "rtn", *,
                 materialize: str = "packed", params: Optional[Mapping] = None,
                 calib_stats: Optional[Mapping[str, ActStats]] = None,
                 calibrate: Optional[methods.CalibrateFn] = None, data: Optional[methods.CalibrationData] = None,
                 seed: int = 0, backend: str = "xla", warn_unused: bool = True) -> nnx.Module:
    """Runs a registered method on the layers `rules` match and materializes its result as a new model.

    See `quantize_model` for the arguments (`materialize` is its `mode` without ``calibrate``). With no rules,
    or the float baseline ``none``, returns `model` itself. `run_method` + `materialize_result` in one call.
    """
    if materialize not in methods.MATERIALIZE:
        raise ValueError(f"materialize must be one of {methods.MATERIALIZE}, got {materialize!r}")
    run = run_method(model, rules, method, materialize=materialize, params=params, calib_stats=calib_stats,
                     calibrate=calibrate, data=data, seed=seed, backend=backend, warn_unused=warn_unused)
    if run is None:
        return model
    return materialize_result(model, run.assignments, run.result, materialize, run.stats, backend)


@dataclasses.dataclass(frozen=True)
class MethodRun:
    """A method's result before materialization (`run_method`).

    Attributes:
        assignments: ``{layer path: rule}`` of the matched layers.
        result: What the method returned.
        stats: The calibration statistics the materialization needs (static activation ranges), or None.
    """

    assignments: Mapping[str, QuantRule]
    result: MethodResult
    stats: Optional[Mapping[str, ActStats]]

    def rewritten_float(self, model: nnx.Module) -> nnx.Module:
        """`model` with the method's rewrites (smoothed kernels, folds, input scales, QAT's trained weights) and
        no quantization: the float model the quantized weights quantize (a ``fake`` build viewed in ``fp``)."""
        fake = materialize_result(model, self.assignments, dataclasses.replace(self.result, weights={}), "fake",
                                  self.stats)
        return with_mode(fake, "fp")


def run_method(model: nnx.Module, rules: Sequence[QuantRule], method: str = "rtn", *,
               materialize: str = "packed", params: Optional[Mapping] = None,
               calib_stats: Optional[Mapping[str, ActStats]] = None,
               calibrate: Optional[methods.CalibrateFn] = None, data: Optional[methods.CalibrationData] = None,
               seed: int = 0, backend: str = "xla", warn_unused: bool = True) -> Optional[MethodRun]:
    """Runs a registered method (see `apply_method`); None for no rules or the float baseline.

    `materialize` only tells the method which representation follows (``fake`` RTN computes nothing) and
    which weights the result must cover.
    """
    if calibrate is None and data is not None:
        calibrate = methods.cached_calibration(methods.calibrate_on(data))
    quant_method = methods.get_method(method)
    resolved = quant_method.resolve_params(params)
    for name in {backend, *(r.backend for r in rules if r.backend is not None)}:
        seam.get_backend(name)  # unknown names fail here, before any work
    matched = match_rules(model, rules)
    if warn_unused:
        _report_unused(matched.unused_rules)
    if quant_method.kind == "float" or not rules:
        if rules:
            raise ValueError(f"method {method!r} is the float baseline; it takes no quantization rules")
        return None
    check_rules(model, rules)
    _check_finite_kernels(model, rules)
    layers = dict(quant_layers(model))
    stats = _statistics(model, rules, matched.assignments, quant_method, calib_stats, calibrate)
    targets = tuple(Target(path, layers[path].kernel[...], rule, None if stats is None else stats.get(path))
                    for path, rule in matched.assignments.items())
    if materialize == "fake" and method == "rtn":
        result = MethodResult()  # fake mode re-quantizes at every call: nothing to compute now
    else:
        result = quant_method.fn(methods.MethodProblem(model, targets, resolved, seed, calibrate, data))
        _check_result(method, result, matched.assignments, materialize)
        stats = _restatistics(model, rules, matched.assignments, result, stats, calibrate, backend)
    return MethodRun(matched.assignments, result, stats)


def _restatistics(model, rules, assignments, result, stats, calibrate, backend):
    """Statistics for static activation specs after a method's rewrites.

    Smoothing methods change what a layer's activation quantizer sees (``x / s`` through an `InputScale` or a
    folded predecessor), so static ranges calibrated on the float model would be wrong: the rewritten model
    (float weights) is calibrated once more. Without rewrites or static specs `stats` is returned as is.
    """
    static = [path for path, rule in assignments.items() if rule.act is not None and rule.act.static]
    if not static or not (result.kernels or result.params or result.input_scales):
        return stats
    if calibrate is None:
        raise ValueError(f"static activation specs of {static} need recalibration after the method's rewrites; "
                         f"pass a calibrate callback or calibration data")
    rewritten = materialize_result(model, assignments, dataclasses.replace(result, weights={}), "fake", stats, backend)
    return {**stats, **calibrate(rewritten, rules, False)}


def _statistics(model, rules, assignments, quant_method, calib_stats, calibrate):
    """The calibration statistics the method and the static activation specs need (None when none needed)."""
    static = [path for path, rule in assignments.items() if rule.act is not None and rule.act.static]
    if not (quant_method.needs_stats or static):
        return calib_stats
    if calib_stats is None or (quant_method.needs_hessian and any(
            s.hessian is None for s in calib_stats.values())):
        if calibrate is None:
            need = "Hessians (X^T X)" if quant_method.needs_hessian else "statistics"
            why = (f"method {quant_method.name!r} needs" if quant_method.needs_stats
                   else f"the static activation specs of {static} need")
            raise ValueError(f"{why} calibration {need}: pass calib_stats (with record_hessian="
                             f"{quant_method.needs_hessian}) or a calibrate callback")
        calib_stats = calibrate(model, rules, quant_method.needs_hessian)
    needed = list(assignments) if quant_method.needs_stats else static
    missing = [path for path in needed if path not in calib_stats]
    if missing:
        raise ValueError(f"calibration statistics are missing for layer(s) {missing}")
    if quant_method.needs_hessian:
        without = [path for path in needed if calib_stats[path].hessian is None]
        if without:
            raise ValueError(f"method {quant_method.name!r} needs Hessians; none recorded for {without} "
                             f"(calibrate with record_hessian=True)")
    return calib_stats


def _check_result(method: str, result: MethodResult, assignments: Mapping[str, QuantRule], materialize: str) -> None:
    """The result covers exactly the matched layers (weights for every layer with a weight spec)."""
    for name, entries in (("weights", result.weights), ("kernels", result.kernels),
                          ("input_scales", result.input_scales), ("act_params", result.act_params)):
        unknown = sorted(set(entries) - set(assignments))
        if unknown:
            raise ValueError(f"method {method!r} returned {name} for layer(s) no rule matched: {unknown}")
    if materialize != "fake":
        missing = [path for path, rule in assignments.items() if rule.weight is not None and path not in result.weights]
        if missing:
            raise ValueError(f"method {method!r} returned no quantized weight for layer(s) {missing}")


def _resolve(model: nnx.Module, dotted: str) -> tuple[object, str]:
    """``(parent, attribute)`` of a dotted parameter path such as ``blocks.0.ada_lin.kernel``."""
    *parents, leaf = dotted.split(".")
    node = model
    for part in parents:
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    if not isinstance(getattr(node, leaf, None), nnx.Variable):
        raise ValueError(f"parameter path {dotted!r} does not name a variable of the model")
    return node, leaf


def materialize_result(model: nnx.Module, assignments: Mapping[str, QuantRule], result: MethodResult, how: str,
                       stats: Optional[Mapping[str, ActStats]] = None, backend: str = "xla") -> nnx.Module:
    """Builds the quantized model from a method's result (the input model is not touched).

    Args:
        model: The float model the method ran on.
        assignments: ``{layer path: rule}`` (`match_rules(...).assignments`, or a subset for a sub-module).
        result: The method's result (an empty `MethodResult` gives plain ``fake`` layers: what QAT trains).
        how: ``packed``, ``baked`` or ``fake`` (`bitlaws.quant.methods.MATERIALIZE`).
        stats: Calibration statistics of the layers with static activation specs.
        backend: Matmul backend of ``packed`` layers whose rule names none (`QuantRule.backend`).
    """
    if how not in methods.MATERIALIZE:
        raise ValueError(f"materialize must be one of {methods.MATERIALIZE}, got {how!r}")
    static = [path for path, rule in assignments.items() if rule.act is not None and rule.act.static
              and (stats is None or path not in stats) and path not in result.act_params]
    if static:
        raise ValueError(f"static activation specs of {static} need calibration statistics")
    new_model = nnx.clone(model)  # a new graph over the same (immutable) arrays: no array is copied
    for dotted, value in result.params.items():
        parent, leaf = _resolve(new_model, dotted)
        getattr(parent, leaf).set_value(value)
    layers = dict(quant_layers(new_model))
    for path, rule in assignments.items():
        layer = layers[path]
        layer.calib = None
        if path in result.kernels:
            layer.kernel.set_value(result.kernels[path])
        if path in result.input_scales:
            layer.input_scale = InputScale(jnp.asarray(result.input_scales[path], jnp.float32))
        act = rule.act
        if act is not None and act.static:
            learned = result.act_params.get(path)
            layer.act_qparams = ActQParamsVar(learned if learned is not None else seam.static_act_params(stats[path],
                                                                                                        act))
        layer_backend = rule.backend or backend
        act_only = seam.FP if act is None else LayerQuant(mode="fake", act=act, backend=layer_backend)
        if rule.weight is None:
            layer.quant = act_only
        elif how == "packed":
            layer.qkernel = QWeight(result.weights[path])
            layer.kernel = None
            layer.quant = LayerQuant(mode="packed", weight=rule.weight, act=act, backend=layer_backend)
        elif how == "baked":
            layer.kernel.set_value(result.weights[path].dequantize(layer.kernel.get_value().dtype))
            layer.quant = act_only
        else:
            layer.quant = LayerQuant(mode="fake", weight=rule.weight, act=act, backend=layer_backend)
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
    """A view of `model` whose quantized layers switch to `mode` (e.g. ``fp`` to compare with float).

    The view shares every array with `model` (`nnx.view`). Packed layers cannot leave ``packed`` mode (their
    float kernels are gone) and float layers cannot enter it (they hold no `QArray`).

    Raises:
        ValueError: naming every layer that cannot take `mode`.
    """
    if mode not in seam.MODES:
        raise ValueError(f"with_mode: mode must be one of {seam.MODES}, got {mode!r}")
    refused = []
    for path, layer in quant_layers(model):
        if layer.qkernel is not None and mode != "packed":
            refused.append(f"{path} (packed: it has no float kernel to run in {mode!r} mode)")
        elif layer.qkernel is None and mode == "packed" and layer.quant.weight is not None:
            refused.append(f"{path} (it holds no packed kernel; build packed models with quantize_model)")
    if refused:
        raise ValueError(f"with_mode({mode!r}): {'; '.join(refused)}")
    return nnx.view(model, quant_mode=mode, raise_if_not_found=False)


def bake_fake_weights(model: nnx.Module) -> nnx.Module:
    """A version of a ``fake`` model whose fake-quantized kernels hold their quantize-dequantize values.

    It computes exactly what the ``fake`` model computes, but weight quantization happens once instead of at
    every call, and layers with float activations return to ``fp`` mode (the ``baked`` representation of
    `quantize_model`). Training through a baked model updates the baked values: use the ``fake`` model for QAT.
    """
    new_model = nnx.clone(model)
    for _, layer in quant_layers(new_model):
        quant = layer.quant
        if quant.mode == "fake" and quant.weight is not None:
            kernel = layer.kernel.get_value()
            layer.kernel.set_value(qarray.dequantize(rtn(kernel, quant.weight), kernel.dtype))
            layer.quant = seam.FP if quant.act is None else dataclasses.replace(quant, weight=None)
    return new_model


def set_compute_dtype(model: nnx.Module, dtype: Optional[str]) -> int:
    """Runs every float / fake-quant matmul and convolution of `model` with `dtype` operands (in place).

    ``"bfloat16"`` is the usual choice on GPUs and TPUs (float32 accumulation, outputs in the input's dtype,
    `seam.LayerQuant.compute_dtype`); None returns to the input's dtype. Call it after `quantize_model`, which
    sets each layer's quantization afresh. Packed layers keep their backend's kernels.

    Returns:
        How many layers were set.

    Raises:
        ValueError: an unknown `dtype` (one line, naming the choices).
    """
    if dtype is not None and dtype not in seam.COMPUTE_DTYPES:
        raise ValueError(f"set_compute_dtype: dtype must be one of {seam.COMPUTE_DTYPES} or None, got {dtype!r}")
    layers = quant_layers(model)
    for _, layer in layers:
        layer.quant = dataclasses.replace(layer.quant, compute_dtype=dtype)
    return len(layers)
