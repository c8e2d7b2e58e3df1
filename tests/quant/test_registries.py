"""Re-registration rules of the name registries: calibrators, methods and the per-kernel method adapter.

The same function (or a re-run of its definition, e.g. a notebook cell run twice) may be registered again;
a different function under a taken name, built-in names included, needs ``replace=True``.
"""

import dataclasses

import jax.numpy as jnp
import pytest
from flax import nnx

from bitlaws.quant import (QLinear, QuantRule, QuantSpec, calibrate, dequantize, methods, quantize, quantize_model,
                           register_calibrator, registry)

CELL = '''
def fn(*args, **kwargs):
    return "first run" if FIRST else "second run"
'''


def _cell_run(first: bool):
    """The function a notebook cell defines, as a new object each run (same module and qualified name)."""
    namespace = {"__name__": "notebook_cell_for_test", "FIRST": first}
    exec(CELL, namespace)  # pylint: disable=exec-used
    return namespace["fn"]


def _other(*args, **kwargs):
    return "other"


@pytest.fixture
def cleanup():
    """Names registered by a test, removed from every registry afterwards."""
    names = []
    yield names
    for name in names:
        calibrate.CALIBRATORS.pop(name, None)
        methods._METHODS.pop(name, None)  # pylint: disable=protected-access


def test_same_function():
    first, second = _cell_run(True), _cell_run(False)
    assert first is not second and registry.same_function(first, second)
    assert registry.same_function(_other, _other)
    assert not registry.same_function(first, _other)
    assert not registry.same_function(object(), object())  # no names: identity only


@pytest.mark.parametrize("kind", ["calibrator", "weight method", "method"])
def test_reregistering_the_same_function_or_a_rerun_cell_is_allowed(kind, cleanup):
    name = f"test-rerun-{kind.replace(' ', '-')}"
    cleanup.append(name)
    register, lookup = _registry(kind)
    first = _cell_run(True)
    register(name, first)
    register(name, first)  # the same object: no-op
    assert lookup(name) is first
    second = _cell_run(False)
    register(name, second)  # the cell run again: a new object with the same qualified name replaces it
    assert lookup(name) is second


@pytest.mark.parametrize("kind", ["calibrator", "weight method", "method"])
def test_a_different_function_needs_replace(kind, cleanup):
    name = f"test-taken-{kind.replace(' ', '-')}"
    cleanup.append(name)
    register, lookup = _registry(kind)
    first = _cell_run(True)
    register(name, first)
    label = "calibrator" if kind == "calibrator" else "method"  # per-kernel methods live in the method registry
    with pytest.raises(ValueError, match=f"{label} '{name}' is already registered.*replace=True"):
        register(name, _other)
    assert lookup(name) is first
    register(name, _other, replace=True)
    assert lookup(name) is _other


@pytest.mark.parametrize("kind, name", [("calibrator", "minmax"), ("calibrator", "absmax"),
                                        ("weight method", "rtn"), ("method", "none"),
                                        ("method", "rtn")])
def test_builtin_names_are_protected(kind, name):
    register, _ = _registry(kind)
    with pytest.raises(ValueError, match=f"'{name}' is already registered.*replace=True"):
        register(name, _other)


def test_builtins_may_be_registered_again_as_themselves():
    register_calibrator("minmax")(calibrate.minmax_range)
    methods.register_weight_method("rtn")(methods.rtn)
    assert calibrate.CALIBRATORS["minmax"] is calibrate.minmax_range
    assert methods.get_method("rtn").fn.weight_fn is methods.rtn


def test_method_kind_change_needs_replace(cleanup):
    cleanup.append("test-kind-change")
    fn = _cell_run(True)
    methods.register_method("test-kind-change", fn, kind="ptq")
    with pytest.raises(ValueError, match="kind 'ptq'.*replace=True"):
        methods.register_method("test-kind-change", fn, kind="qat")
    methods.register_method("test-kind-change", fn, kind="qat", replace=True)
    assert methods.get_method("test-kind-change").kind == "qat"


def test_registered_calibrator_is_used_by_quant_spec(cleanup):
    cleanup.append("test-half-absmax")

    @register_calibrator("test-half-absmax")
    def half_absmax(grouped, spec):  # [G, L, C] -> ([G, 1, C], [G, 1, C])
        del spec
        amax = 0.5 * jnp.max(jnp.abs(grouped), axis=1, keepdims=True)
        return -amax, amax

    x = jnp.linspace(-1.0, 1.0, 64, dtype=jnp.float32).reshape(16, 4)  # [K, N]
    half = dequantize(quantize(x, QuantSpec(format="int8", calibrator="test-half-absmax")))
    full = dequantize(quantize(x, QuantSpec(format="int8", calibrator="absmax")))
    assert float(jnp.max(jnp.abs(half))) == pytest.approx(0.5, rel=1e-2)  # clipped at half the range
    assert float(jnp.max(jnp.abs(full))) == pytest.approx(1.0, rel=1e-2)


def test_registered_weight_method_is_used_by_quantize_model(cleanup):
    cleanup.append("test-rtn-absmax")
    seen = []

    @methods.register_weight_method("test-rtn-absmax")
    def rtn_absmax(kernel, spec, stats=None, reduce_axes=None):  # kernel [in, out] -> QArray
        seen.append((kernel.shape, stats))
        return quantize(kernel, dataclasses.replace(spec, calibrator="absmax"), reduce_axes)

    model = QLinear(16, 8, rngs=nnx.Rngs(0))
    rules = [QuantRule(module_path=".*", weight=QuantSpec(format="int4"))]
    qmodel = quantize_model(model, rules, mode="packed", method="test-rtn-absmax")
    assert seen == [((16, 8), None)]
    assert qmodel.qkernel.get_value().spec.calibrator == "absmax"


def _registry(kind):
    """``(register(name, fn, replace=False), lookup(name))`` for one registry."""
    if kind == "calibrator":
        return (lambda name, fn, replace=False: register_calibrator(name, replace=replace)(fn),
                lambda name: calibrate.CALIBRATORS[name])
    if kind == "weight method":
        return (lambda name, fn, replace=False: methods.register_weight_method(name, replace=replace)(fn),
                lambda name: methods.get_method(name).fn.weight_fn)
    return (lambda name, fn, replace=False: methods.register_method(name, fn, kind="ptq", replace=replace),
            lambda name: methods.get_method(name).fn)
