"""Quantization methods: the ONE registry, the method protocol, and how a result becomes a model.

A method is a function of a `MethodProblem` — the float model (read only), the layers the rules matched with
their float kernels, rules and calibration statistics, and the method's hyper-parameters — that returns a
`MethodResult`: the quantized weight of every layer with a weight spec (`QArray` leaves), plus optional
rewrites of other parameters (the folds of SmoothQuant / AWQ / OmniQuant-LET: rescaled kernels, rewritten
modulation columns, per-input-channel `InputScale` divisors). Methods never build models; `apply_method` does,
in one of three explicit representations (`MATERIALIZE`):

============  ========================================================================================
``packed``    kernels are the method's `QArray`s (real low-bit storage; the float kernels are dropped)
``baked``     kernels are the dequantized `QArray`s in float: the same numbers as ``packed``, run as a float
              model (weight-only settings share the float model's graph: one compilation for all of them)
``fake``      float kernels (after the method's rewrites) quantize-dequantized at every call with a
              straight-through gradient: what QAT trains. The method's rounding choices are not kept.
============  ========================================================================================

Per-kernel methods (RTN, and user functions ``fn(kernel, spec, stats, reduce_axes, **params) -> QArray``)
register through `register_weight_method`, a thin adapter over the same registry.

Memory: `apply_method` shares every untouched array with the input model (NNX clones share jax arrays) and
quantizes one layer at a time, so a packed model costs its packed bytes on top of the float model.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
from flax import nnx

from bitlaws.quant import qarray, registry
from bitlaws.quant.seam import ActStats
from bitlaws.quant.spec import QuantRule, QuantSpec

MATERIALIZE = ("packed", "baked", "fake")
METHOD_KINDS = ("float", "ptq", "qat")

# calibrate(model, rules, record_hessian) -> {layer path: ActStats}; supplied by whoever has the data.
CalibrateFn = Callable[[nnx.Module, Sequence[QuantRule], bool], Mapping[str, ActStats]]


@dataclasses.dataclass(frozen=True)
class CalibrationData:
    """The data every calibration of a model derives from.

    Attributes:
        forward: ``forward(model, batch)`` runs `model` (any version of it: float, calibrating, partly
            quantized, with capture hooks) on one batch; its output is ignored. May be `nnx.jit`-compiled.
        batches: The calibration batches (any pytrees `forward` accepts).
        description: What the data is, for records (e.g. ``{"source": "own_samples", "labels": "spread",
            "n": 128}``); JSON-serialisable.
        apply: The same computation as `forward` but plain (not `nnx.jit`-wrapped), returning the model output
            (logits, denoiser output) for methods that trace it inside their own compiled step (QAT: an
            `nnx.jit` call there would write merged modules back across trace levels). None: `forward`
            itself, unwrapped when it is a decorated function.
    """

    forward: Callable[[nnx.Module, Any], Any]
    batches: Sequence[Any]
    description: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    apply: Optional[Callable[[nnx.Module, Any], Any]] = None

    def traceable(self) -> Callable[[nnx.Module, Any], Any]:
        """`apply`, or `forward` without its decorators (`inspect.unwrap`)."""
        import inspect  # pylint: disable=g-import-not-at-top

        return self.apply if self.apply is not None else inspect.unwrap(self.forward)

    def run(self, model: nnx.Module) -> None:
        """Runs `forward` on every batch (the side effects - recorded statistics, captures - are the point)."""
        for batch in self.batches:
            self.forward(model, batch)


@dataclasses.dataclass(frozen=True)
class Target:
    """One layer a method quantizes.

    Attributes:
        path: Dotted module path (``blocks.3.attn.qkv``).
        kernel: The float kernel ``[..., in, out]`` (read only).
        rule: The rule that matched the layer (weight and activation specs).
        stats: Its calibration statistics (``hessian`` when the method asked for it), or None.
    """

    path: str
    kernel: jax.Array
    rule: QuantRule
    stats: Optional[ActStats] = None


@dataclasses.dataclass(frozen=True)
class MethodProblem:
    """What a method sees.

    Attributes:
        model: The float model; read it, never mutate it (model-aware methods find folds and blocks here).
        targets: The matched layers, in graph order.
        params: Hyper-parameters (the method's defaults overridden by the caller's values).
        seed: PRNG seed for methods with randomness.
        calibrate: Calibration callback for methods that recalibrate (sequential GPTQ), or None.
        data: The calibration data itself, for methods that run the model on it in their own way (block-wise
            OmniQuant captures block inputs), or None.
    """

    model: nnx.Module
    targets: tuple[Target, ...]
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    seed: int = 0
    calibrate: Optional[CalibrateFn] = None
    data: Optional[CalibrationData] = None


@dataclasses.dataclass
class MethodResult:
    """What a method returns.

    Attributes:
        weights: ``{layer path: QArray}`` for every target with a weight spec.
        kernels: ``{layer path: float kernel}`` the method rewrote (e.g. smoothed ``s * W``); the weights above
            quantize these. Default: the original kernels.
        params: ``{dotted parameter path: array}`` rewrites of other parameters (e.g. the adaLN columns a
            smoothing scale is folded into: ``blocks.0.ada_lin.kernel``).
        input_scales: ``{layer path: [in] divisor}`` for layers whose smoothing has no preceding op to fold into.
        act_params: ``{layer path: ActQParams}`` learned static activation scales (QAT with ``lsq``), used instead
            of the calibrated ones.
        info: ``{layer path: {name: number}}`` per-layer diagnostics (errors, chosen alphas) for records.
    """

    weights: dict[str, Any] = dataclasses.field(default_factory=dict)
    kernels: dict[str, jax.Array] = dataclasses.field(default_factory=dict)
    params: dict[str, jax.Array] = dataclasses.field(default_factory=dict)
    input_scales: dict[str, jax.Array] = dataclasses.field(default_factory=dict)
    info: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    act_params: dict[str, Any] = dataclasses.field(default_factory=dict)


MethodFn = Callable[[MethodProblem], MethodResult]


@dataclasses.dataclass(frozen=True)
class QuantMethod:
    """A registered method.

    Attributes:
        name: Registry name (used in sweep cell keys).
        fn: ``fn(MethodProblem) -> MethodResult``.
        kind: ``float`` (the baseline), ``ptq`` or ``qat``.
        needs_stats: Give the method calibration statistics (``Target.stats``).
        needs_hessian: ... with ``X^T X`` (implies `needs_stats`).
        defaults: The accepted hyper-parameters and their default values.
        needs_data: Give the method the data itself (`MethodProblem.data`: QAT trains on it); implied by
            `needs_stats` (statistics are computed from it).
    """

    name: str
    fn: MethodFn
    kind: str = "ptq"
    needs_stats: bool = False
    needs_hessian: bool = False
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    needs_data: bool = False

    def resolve_params(self, params: Optional[Mapping[str, Any]]) -> dict[str, Any]:
        """The defaults overridden by `params`; unknown names raise ValueError naming them."""
        params = dict(params or {})
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            accepted = ", ".join(f"{k}={v!r}" for k, v in self.defaults.items()) or "none"
            raise ValueError(f"method {self.name!r} has no hyper-parameter(s) {unknown}; it accepts: {accepted}")
        return {**self.defaults, **params}


_METHODS: dict[str, QuantMethod] = {}


def register_method(name: str, fn: MethodFn, *, kind: str = "ptq", needs_stats: bool = False,
                    needs_hessian: bool = False, needs_data: bool = False,
                    defaults: Optional[Mapping[str, Any]] = None, replace: bool = False) -> QuantMethod:
    """Registers ``fn(MethodProblem) -> MethodResult`` under `name` (the one method registry).

    Re-registering the same function (a re-run notebook cell) is allowed; a different function under a taken
    name, built-in names included, needs ``replace=True``.

    Raises:
        ValueError: bad kind or name, or a taken name without `replace`.
    """
    if kind not in METHOD_KINDS:
        raise ValueError(f"method kind must be one of {METHOD_KINDS}, got {kind!r}")
    if not isinstance(name, str) or not name or any(c in name for c in "|[],="):
        raise ValueError(f"method name {name!r} must be a non-empty string without '|', '[', ']', ',' or '='")
    old = _METHODS.get(name)
    if old is not None and old.kind != kind and not replace:
        raise ValueError(f"method {name!r} is already registered (kind {old.kind!r}); pass replace=True to replace "
                         f"it with a {kind!r} method")
    registry.check_register("method", name, None if old is None else old.fn, fn, replace)
    needs_stats = needs_stats or needs_hessian
    method = QuantMethod(name, fn, kind, needs_stats, needs_hessian, dict(defaults or {}), needs_data or needs_stats)
    _METHODS[name] = method
    return method


def method_names() -> list[str]:
    return sorted(_METHODS)


def get_method(name: str) -> QuantMethod:
    """Looks `name` up. Raises ValueError naming the registered methods."""
    if name not in _METHODS:
        raise ValueError(f"unknown quantization method {name!r}; registered methods: {method_names()} (the PTQ "
                         f"family registers when bitlaws.ptq is imported, the qat:* methods with bitlaws.qat; "
                         f"sweeps import both)")
    return _METHODS[name]


# ------------------------------------------------------------------------------ per-kernel methods
WeightFn = Callable[..., Any]  # fn(kernel, spec, stats, reduce_axes, **params) -> QArray


def _weight_method_fn(fn: WeightFn) -> MethodFn:
    """Adapts a per-kernel function to the method protocol: every target's kernel, one at a time."""

    def method(problem: MethodProblem) -> MethodResult:
        result = MethodResult()
        for target in problem.targets:
            if target.rule.weight is not None:
                result.weights[target.path] = fn(target.kernel, target.rule.weight, target.stats, None,
                                                 **problem.params)
        return result

    method.weight_fn = fn  # the per-kernel function, for introspection
    method.__module__ = getattr(fn, "__module__", None)
    method.__qualname__ = f"{getattr(fn, '__qualname__', 'weight_method')}.<per-kernel>"
    return method


def register_weight_method(name: str, *, needs_stats: bool = False, needs_hessian: bool = False,
                           defaults: Optional[Mapping[str, Any]] = None, replace: bool = False):
    """Decorator: registers a per-kernel method ``fn(kernel, spec, stats, reduce_axes, **params) -> QArray``.

    `stats` is the layer's `ActStats` when `needs_stats` (with ``hessian`` when `needs_hessian`), else None;
    hyper-parameters named in `defaults` arrive as keyword arguments. Usable in `quantize_model` /
    `apply_method` and as a sweep method.
    """

    def wrap(fn: WeightFn) -> WeightFn:
        register_method(name, _weight_method_fn(fn), kind="ptq", needs_stats=needs_stats,
                        needs_hessian=needs_hessian, defaults=defaults, replace=replace)
        return fn

    return wrap


# RTN and GPTQ compile one program per (kernel shape, spec); a model has a handful of kernel shapes and a sweep
# several specs, and each program costs ~0.5-2 s of XLA:CPU compilation for microseconds to milliseconds of work.
# Kernels are therefore quantized with their output axis padded to a multiple of this many columns (by repeating
# the last column), so the kernels of a model that share an input size share one program per spec.
COLUMN_BLOCK = 1024
RTN_COLUMN_BLOCK = COLUMN_BLOCK  # the name earlier releases exported


def columns_are_independent(spec: QuantSpec) -> bool:
    """Whether quantizing a kernel with repeated output columns gives the same result for the original columns.

    Scales are computed per output column (``channel`` / ``group``), or per tensor from the minimum and
    maximum only (``minmax`` / ``absmax``), which repeated columns leave unchanged; so is the float16 scale
    exponent (the maximum scale). A per-tensor ``percentile`` or ``mse`` calibrator sees the repeated values.
    """
    return spec.granularity != "tensor" or spec.calibrator in ("minmax", "absmax")


def padded_columns(kernel: jax.Array, spec: QuantSpec) -> int:
    """The output width `kernel` ``[..., N]`` is quantized at: N rounded up to `COLUMN_BLOCK`, or N itself when
    padding could change the result (`columns_are_independent`) or the kernel has fewer than 2 axes."""
    columns = int(kernel.shape[-1])
    if kernel.ndim < 2 or not columns_are_independent(spec):
        return columns
    return -(-columns // COLUMN_BLOCK) * COLUMN_BLOCK


@functools.partial(jax.jit, static_argnames=("spec",))
def _rtn_jit(kernel: jax.Array, spec: QuantSpec) -> qarray.QArray:
    return qarray.quantize(kernel, spec)


@functools.partial(jax.jit, static_argnames=("columns",))
def repeat_last_column(kernel: jax.Array, columns: int) -> jax.Array:
    """``[..., N] -> [..., columns]``: the last column repeated (``columns >= N``)."""
    pad = [(0, 0)] * (kernel.ndim - 1) + [(0, columns - kernel.shape[-1])]
    return jax.numpy.pad(kernel, pad, mode="edge")


@functools.partial(jax.jit, static_argnames=("shape",))
def first_columns(qa: qarray.QArray, shape: tuple[int, ...]) -> qarray.QArray:
    """The `QArray` of the tensor's first ``shape[-1]`` output columns (a column-padded `QArray` cut back)."""
    n = shape[-1]
    cut = lambda a: None if a is None else a[:, :n]  # noqa: E731  ([K or G, N] arrays; scale_exp is 0-d)
    return dataclasses.replace(qa, values=cut(qa.values), scale=cut(qa.scale), zero_point=cut(qa.zero_point),
                               shape=tuple(shape))


def rtn_kernel(kernel: jax.Array, spec: QuantSpec) -> qarray.QArray:
    """`qarray.quantize(kernel, spec)` (kernel convention: every axis but the last reduced), with one compiled
    program per (spec, input shape, `padded_columns`): bit for bit the same `QArray`."""
    qarray.check_tensor(kernel, "kernel")
    padded = padded_columns(kernel, spec)
    if padded == kernel.shape[-1]:
        return _rtn_jit(kernel, spec)
    wide = _rtn_jit(repeat_last_column(kernel, padded), spec)
    return first_columns(wide, tuple(kernel.shape))


@register_weight_method("rtn")
def rtn(kernel: jax.Array, spec: QuantSpec, stats: Optional[ActStats] = None,
        reduce_axes: Optional[tuple[int, ...]] = None) -> qarray.QArray:
    """Round-to-nearest with the spec's calibrator (the paper's baseline, eq. 4-6 for ``minmax``)."""
    del stats
    if reduce_axes is None:
        return rtn_kernel(kernel, spec)
    return qarray.quantize(kernel, spec, reduce_axes)


def _float_baseline(problem: MethodProblem) -> MethodResult:
    if problem.targets:
        raise ValueError("method 'none' (the float baseline) takes no quantization rules; it applies to W16A16")
    return MethodResult()


FLOAT_METHOD = "none"
register_method(FLOAT_METHOD, _float_baseline, kind="float")


# ------------------------------------------------------------------------------ calibration cache
def act_signature(model: nnx.Module, rules: Sequence[QuantRule]) -> tuple:
    """What calibration statistics depend on besides the model: the matched layers and their activation specs."""
    from bitlaws.quant import transform  # pylint: disable=g-import-not-at-top  (transform imports this module)

    matched = transform.match_rules(model, rules).assignments
    return tuple(sorted((path, rule.act) for path, rule in matched.items()))


def calibrate_on(data: CalibrationData) -> CalibrateFn:
    """The calibration callback of `data`: statistics of the rules' layers over ``data.batches``."""
    from bitlaws.quant import transform  # pylint: disable=g-import-not-at-top  (transform imports this module)

    def calibrate(model: nnx.Module, rules: Sequence[QuantRule], record_hessian: bool) -> Mapping[str, ActStats]:
        return transform.run_calibration(model, rules, data.forward, data.batches, record_hessian=record_hessian)

    return calibrate


def cached_calibration(calibrate: CalibrateFn) -> CalibrateFn:
    """Wraps `calibrate` so statistics are computed once per (model, matched layers + act specs, Hessian).

    A result with Hessians also serves requests without them. The cache lives as long as the wrapper (a sweep
    evaluator keeps one per model).
    """
    cache: dict[tuple, tuple[nnx.Module, Mapping[str, ActStats]]] = {}

    def cached(model: nnx.Module, rules: Sequence[QuantRule], record_hessian: bool) -> Mapping[str, ActStats]:
        key = (id(model), act_signature(model, rules))
        for hessian in ((True,) if record_hessian else (False, True)):
            if key + (hessian,) in cache:
                return cache[key + (hessian,)][1]
        stats = calibrate(model, rules, record_hessian)
        # The entry keeps the model alive so that its id cannot be reused by another model while cached.
        cache[key + (bool(record_hessian),)] = (model, stats)
        return stats

    cached.cache = cache  # for tests and introspection
    return cached

