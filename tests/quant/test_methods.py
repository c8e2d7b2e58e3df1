"""The one method protocol: registry, materializations, rewrites, checks, shared arrays, calibration cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bitlaws.quant import (MethodResult, QLinear, QuantRule, QuantSpec, apply_method, cached_calibration, dequantize,
                           fake_quant, methods, quantize, quantize_model, run_calibration, with_mode)
from bitlaws.quant.layers import InputScale
from bitlaws.quant.transform import quant_layers

W4 = [QuantRule(module_path=r"(qkv|proj|mlp\.\d)", weight=QuantSpec(format="int4", granularity="group", group_size=16))]
W4A8 = [QuantRule(module_path=r"(qkv|proj|mlp\.\d)", weight=QuantSpec(format="int4"),
                  act=QuantSpec(format="int8", granularity="token"))]


@pytest.fixture
def register():
    """Registers methods for one test and removes them afterwards."""
    names = []

    def add(name, fn, **kw):
        names.append(name)
        return methods.register_method(name, fn, **kw)

    yield add
    for name in names:
        methods._METHODS.pop(name, None)  # pylint: disable=protected-access


@pytest.mark.parametrize("rules", [W4, W4A8], ids=["w4", "w4a8"])
def test_packed_baked_and_fake_compute_the_same(block, images, rules):
    packed = quantize_model(block, rules, mode="packed")
    baked = quantize_model(block, rules, mode="baked")
    fake = quantize_model(block, rules, mode="fake")
    np.testing.assert_array_equal(np.asarray(packed(images)), np.asarray(baked(images)))
    np.testing.assert_allclose(np.asarray(fake(images)), np.asarray(baked(images)), rtol=1e-5, atol=1e-5)
    assert packed.qkv.kernel is None and packed.qkv.qkernel is not None
    assert baked.qkv.qkernel is None and baked.qkv.quant.weight is None  # float kernel, no per-call quantization


def test_untouched_arrays_are_shared_not_copied(block):
    packed = quantize_model(block, W4, mode="packed")
    pointer = lambda a: a.unsafe_buffer_pointer()  # noqa: E731
    assert pointer(packed.stem.kernel.get_value()) == pointer(block.stem.kernel.get_value())  # unmatched layer
    assert pointer(packed.qkv.bias.get_value()) == pointer(block.qkv.bias.get_value())
    view = with_mode(quantize_model(block, W4, mode="fake"), "fp")
    assert pointer(view.qkv.kernel.get_value()) == pointer(block.qkv.kernel.get_value())


def test_mode_and_storage_cannot_disagree(block, images):
    fake = quantize_model(block, W4, mode="fake")
    with pytest.raises(ValueError, match=r"with_mode\('packed'\): mlp.0 \(it holds no packed kernel.*proj.*qkv"):
        with_mode(fake, "packed")
    packed = quantize_model(block, W4, mode="packed")
    with pytest.raises(ValueError, match=r"qkv \(packed: it has no float kernel"):
        with_mode(packed, "fp")
    fake.qkv.quant = packed.qkv.quant  # labelled packed by hand, no QArray inside
    with pytest.raises(ValueError, match="'packed' mode but holds no packed kernel"):
        fake(images)


def test_a_method_rewrites_kernels_params_and_input_scales(block, images, register):
    s = jnp.linspace(0.5, 2.0, 32)  # [in] smoothing scale of qkv

    def smooth_qkv(problem):
        result = MethodResult()
        for target in problem.targets:
            kernel = target.kernel * s[:, None] if target.path == "qkv" else target.kernel
            if target.path == "qkv":
                result.kernels["qkv"] = kernel
                result.input_scales["qkv"] = s
            result.weights[target.path] = quantize(kernel, target.rule.weight)
        result.params["proj.bias"] = jnp.full((32,), 0.25)
        return result

    register("test-smooth-qkv", smooth_qkv)
    rules = [QuantRule(module_path="(qkv|proj)", weight=QuantSpec(format="int8"))]
    packed = apply_method(block, rules, "test-smooth-qkv", materialize="packed")
    assert np.asarray(packed.proj.bias.get_value()).tolist() == [0.25] * 32
    assert np.asarray(block.proj.bias.get_value()).tolist() == [0.0] * 32  # the input model is untouched
    x = jax.random.normal(jax.random.key(0), (5, 32))
    expected = (x / s) @ dequantize(quantize(block.qkv.kernel[...] * s[:, None], QuantSpec(format="int8")))
    np.testing.assert_allclose(np.asarray(packed.qkv(x)), np.asarray(expected + block.qkv.bias[...]), rtol=1e-5,
                               atol=1e-5)
    fake = apply_method(block, rules, "test-smooth-qkv", materialize="fake")  # rewrites kept, RTN per call
    np.testing.assert_allclose(np.asarray(fake.qkv(x)), np.asarray(packed.qkv(x)), rtol=1e-5, atol=1e-5)
    unsmoothed = quantize_model(block, [QuantRule(module_path="qkv")], mode="fake")
    np.testing.assert_allclose(np.asarray(with_mode(fake, "fp").qkv(x)), np.asarray(unsmoothed.qkv(x)), rtol=1e-5,
                               atol=1e-5)  # with quantization off, the smoothed layer equals the float one


def test_statistics_are_recorded_after_the_input_scale():
    layer = QLinear(4, 3, rngs=nnx.Rngs(0))
    layer.input_scale = InputScale(jnp.asarray([2.0, 2.0, 4.0, 1.0]))  # what a smoothing method sets
    rules = [QuantRule(module_path=".*", act=QuantSpec(format="int8", granularity="token"))]
    stats = run_calibration(layer, rules, lambda m, b: m(b), [jnp.asarray([[2.0, 4.0, -8.0, 1.0]])])
    np.testing.assert_array_equal(np.asarray(stats[""].absmax), [1.0, 2.0, 2.0, 1.0])


def test_result_must_cover_every_weight_and_nothing_else(block, register):
    register("test-forgetful", lambda problem: MethodResult(weights={"qkv": quantize(problem.targets[0].kernel,
                                                                                       QuantSpec(format="int4"))}))
    with pytest.raises(ValueError, match=r"no quantized weight for layer\(s\) \['proj'"):
        apply_method(block, [QuantRule(module_path="(qkv|proj)", weight=QuantSpec(format="int4"))], "test-forgetful")
    register("test-stray", lambda problem: MethodResult(kernels={"stem": jnp.zeros(1)}))
    with pytest.raises(ValueError, match=r"kernels for layer\(s\) no rule matched: \['stem'\]"):
        apply_method(block, [QuantRule(module_path="qkv")], "test-stray")


def test_statistics_methods_get_cached_calibration(block, images, register):
    seen = []

    def needs_hessian(problem):
        seen.append({t.path: t.stats.hessian.shape for t in problem.targets})
        return MethodResult(weights={t.path: quantize(t.kernel, t.rule.weight) for t in problem.targets})

    register("test-needs-hessian", needs_hessian, needs_hessian=True)
    rules = [QuantRule(module_path="qkv", weight=QuantSpec(format="int4"))]
    with pytest.raises(ValueError, match="needs calibration Hessians"):
        apply_method(block, rules, "test-needs-hessian")
    calls = []

    def calibrate(model, calib_rules, record_hessian):
        calls.append(record_hessian)
        return run_calibration(model, calib_rules, lambda m, b: m(b), [images], record_hessian=record_hessian)

    cached = cached_calibration(calibrate)
    for fmt in ("int4", "int3"):  # another weight format: the same statistics
        apply_method(block, [QuantRule(module_path="qkv", weight=QuantSpec(format=fmt))], "test-needs-hessian",
                     calibrate=cached)
    assert calls == [True] and seen == [{"qkv": (32, 32)}] * 2
    apply_method(block, [QuantRule(module_path="qkv", weight=QuantSpec(format="int4"),
                                   act=QuantSpec(format="int8", granularity="tensor", static=True))], "rtn",
                 calibrate=cached)  # a different activation spec: calibrated again (no Hessian needed)
    assert calls == [True, False]


def test_fake_rtn_equals_fake_quant_of_each_kernel(block, images):
    fake = quantize_model(block, W4, mode="fake")
    for path, layer in quant_layers(fake):
        if layer.quant.weight is not None:
            kernel = dict(quant_layers(block))[path].kernel[...]
            np.testing.assert_array_equal(np.asarray(fake_quant(kernel, layer.quant.weight)),
                                          np.asarray(dequantize(quantize(kernel, layer.quant.weight))))


RTN_SPECS = [QuantSpec(format="int8"), QuantSpec(format="int3"), QuantSpec(format="uint4"),
             QuantSpec(format="fp8_e4m3"), QuantSpec(format="fp4_e2m1", scale_dtype="bfloat16"),
             QuantSpec(format="mxfp4"), QuantSpec(format="nf4", granularity="group", group_size=8),
             QuantSpec(format="int4", calibrator="mse"), QuantSpec(format="int4", granularity="tensor"),
             QuantSpec(format="int4", granularity="tensor", calibrator="percentile", percentile=99.0)]


def _rtn_kernels(rng) -> dict[str, np.ndarray]:
    """Kernels of a few shapes and magnitudes: outlier, tiny and zero columns, huge values, a NaN."""
    wide = rng.standard_normal((32, 40)).astype(np.float32)
    wide[:, 3] *= 300.0  # outlier column
    wide[:, -1] = 0.0  # the repeated column is all zeros
    wide[:, :2] *= 1e-30  # tiny columns
    huge = (rng.standard_normal((32, 1100)) * 1e30).astype(np.float32)  # pads to 2048 columns
    huge[7, -1] = np.nan  # in the repeated column
    conv = rng.standard_normal((2, 2, 8, 12)).astype(np.float32)
    return dict(wide=wide, huge=huge, conv=conv)


@pytest.mark.parametrize("spec", RTN_SPECS, ids=lambda s: s.short())
def test_rtn_on_column_padded_kernels_is_bit_for_bit_plain_quantize(spec):
    for name, kernel in _rtn_kernels(np.random.default_rng(0)).items():
        if kernel.shape[-2] % (spec.group_size or 1) or (spec.format.name == "mxfp4" and kernel.shape[-2] % 32):
            continue
        got, want = methods.rtn(jnp.asarray(kernel), spec), quantize(jnp.asarray(kernel), spec)
        assert got.shape == want.shape == kernel.shape and got.spec == want.spec, name
        for field in ("values", "scale", "zero_point", "scale_exp"):
            a, b = getattr(got, field), getattr(want, field)
            assert (a is None) == (b is None), (name, field)
            if a is not None:
                assert a.shape == b.shape and a.dtype == b.dtype, (name, field)
                assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), (name, field)  # bits, NaNs included


def test_rtn_kernels_of_one_input_size_share_one_program():
    methods._rtn_jit.clear_cache()  # pylint: disable=protected-access
    spec = QuantSpec(format="int5")
    for columns in (96, 288, 384, 576):
        methods.rtn(jnp.ones((48, columns), jnp.float32), spec)
    assert methods._rtn_jit._cache_size() == 1  # pylint: disable=protected-access
    assert methods.columns_are_independent(spec)
    assert not methods.columns_are_independent(QuantSpec(format="int4", granularity="tensor", calibrator="mse"))
