"""Grid expansion, settings and the method registry of the sweep engine."""

import hashlib

import ml_collections
import pytest
from flax import nnx

from bitlaws.quant import IntFormat, MethodResult, QLinear, methods, quantize
from bitlaws.sweep import grid, settings


def _config(**fields):
    base = {"models": ("m-a", "m-b"), "settings": settings.STANDARD_SETTINGS, "formats": ("int", "fp"),
            "methods": ("rtn",), "seeds": (0,)}
    return ml_collections.ConfigDict({**base, **fields})


def test_standard_grid_counts_and_fp_w3_left_out():
    expansion = grid.expand_grid_report(_config(seeds=(0, 1)))
    # per model and seed: W16A16 once + 5 quantized settings x 2 families - (W3A16, fp)
    assert len(expansion.cells) == 2 * 2 * (1 + 5 * 2 - 1)
    assert [combo for combo, _ in expansion.skipped] == ["m-a|W3A16|fp", "m-b|W3A16|fp"]
    assert all("no 3-bit float format" in reason for _, reason in expansion.skipped)
    assert not any(c.setting == "W3A16" and c.format == "fp" for c in expansion.cells)
    baseline = [c for c in expansion.cells if c.setting == "W16A16"]
    assert {(c.format, c.method) for c in baseline} == {("none", "none")}
    assert len(baseline) == 4


def test_keys_are_unique_stable_and_readable():
    cells = grid.expand_grid(_config())
    keys = [c.key for c in cells]
    assert len(set(keys)) == len(keys)
    assert keys == [c.key for c in grid.expand_grid(_config())]
    assert "m-a|W4A16|int|rtn|s0" in keys
    assert keys[0] == "m-a|W16A16|none|none|s0"
    assert grid.Cell("var-d4", "W4A16", "int", "rtn", 0).key == "var-d4|W4A16|int|rtn|s0"
    # the PRNG seed is the documented pure function of the key (not python's salted hash)
    expected = int.from_bytes(hashlib.sha256(b"var-d4|W4A16|int|rtn|s0").digest()[:4], "little") & 0x7FFFFFFF
    assert grid.Cell("var-d4", "W4A16", "int", "rtn", 0).prng_seed == expected == 1743460392
    assert grid.Cell("var-d4", "W4A16", "int", "rtn", 1).prng_seed != expected
    same_model = {grid.Cell("var-d4", s, "int", "rtn", 0).model_seed for s in ("W4A16", "W8A8")}
    assert len(same_model) == 1


def test_order_is_models_settings_formats_methods_seeds_and_duplicates_removed():
    config = _config(models=("b", "a", "b"), settings=("W8A8", "w4a16", "W8A8", "W16A16"), formats=("fp", "int"),
                     seeds=(1, 0))
    keys = [c.key for c in grid.expand_grid(config)]
    assert keys[:5] == ["b|W8A8|fp|rtn|s1", "b|W8A8|fp|rtn|s0", "b|W8A8|int|rtn|s1", "b|W8A8|int|rtn|s0",
                        "b|W4A16|fp|rtn|s1"]
    assert len(keys) == len(set(keys)) == 2 * (2 * 2 * 2 + 2)


def test_comma_separated_fields_and_method_params_sweep():
    config = _config(models="m", settings="W4A16", formats="int", methods=("rtn",))
    assert [c.key for c in grid.expand_grid(config)] == ["m|W4A16|int|rtn|s0"]
    cell = grid.Cell("m", "W4A16", "int", "rtn", 0, {"damp": 0.01, "act_order": True})
    assert cell.key == "m|W4A16|int|rtn[act_order=true,damp=0.01]|s0"
    assert cell == grid.Cell("m", "W4A16", "int", "rtn", 0, {"act_order": True, "damp": 0.01})
    assert len({cell, grid.Cell("m", "W4A16", "int", "rtn", 0, {"damp": 0.01, "act_order": True})}) == 1


def test_unknown_method_lists_registered_names():
    with pytest.raises(ValueError, match=r"unknown quantization method 'gptqq'.*'rtn'"):
        grid.expand_grid(_config(methods=("rtn", "gptqq")))


@pytest.mark.parametrize("bad, match", [
    ({"formats": ("int", "mx")}, "unknown format family 'mx'"),
    ({"settings": ("W4A16", "W4")}, "must look like W<bits>A<bits>"),
    ({"settings": ("W1A16",)}, "bits must be 2..8 or 16"),
    ({"methods": ("none",)}, "float baseline"),
    ({"seeds": ()}, "'seeds' is empty"),
])
def test_bad_configs_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        grid.expand_grid(_config(**bad))


def test_quant_rules_per_family():
    (rule,) = settings.quant_rules("W4A8", "int", r"blocks\.\d+\.fc")
    assert rule.weight.format == IntFormat(4) and rule.weight.granularity == "channel"
    assert rule.weight.calibrator == "minmax"
    assert rule.act.format == IntFormat(8) and rule.act.granularity == "token" and not rule.act.static
    # dynamic activation scales are computed at run time, never stored: float32 (weights keep float16 storage)
    assert rule.act.scale_dtype == "float32" and rule.weight.scale_dtype == "float16"
    (rule,) = settings.quant_rules("W4A8", "fp", ".*", weight_group_size=32)
    assert rule.weight.format.name == "fp4_e2m1" and rule.weight.group_size == 32
    assert rule.act.format.name == "fp8_e4m3"
    (rule,) = settings.quant_rules("W6A16", "fp", ".*")
    assert rule.weight.format.name == "fp6_e2m3" and rule.act is None
    (rule,) = settings.quant_rules("W8A16", "fp", ".*")
    assert rule.weight.format.name == "fp8_e4m3"
    assert settings.quant_rules("W16A16", "none", ".*") == []
    with pytest.raises(settings.NotApplicable, match="no 3-bit float format"):
        settings.quant_rules("W3A16", "fp", ".*")
    assert settings.not_applicable_reason("W5A16", "fp") is not None
    assert settings.not_applicable_reason("W5A16", "int") is None


def test_quant_options_from_config():
    config = ml_collections.ConfigDict({"quant": {"weight_group_size": 0, "weight_calibrator": "mse"}})
    assert settings.quant_options(config) == {"weight_calibrator": "mse"}
    config.quant.weight_group_size = 64
    assert settings.quant_options(config) == {"weight_group_size": 64, "weight_calibrator": "mse"}
    assert settings.quant_options(ml_collections.ConfigDict()) == {}


def test_registered_method_is_found_and_used_with_its_hyper_parameters():
    calls = []

    def fake_qat(problem):
        calls.append((len(problem.targets), dict(problem.params)))
        return MethodResult(weights={t.path: quantize(t.kernel, t.rule.weight) for t in problem.targets})

    methods.register_method("fake-qat-for-test", fake_qat, kind="qat", defaults={"lr": 0})
    try:
        assert "fake-qat-for-test" in settings.method_names() and "rtn" in settings.method_names()
        config = _config(methods=("fake-qat-for-test",), method_params={"fake-qat-for-test": [{"lr": 1}, {"lr": 2}]})
        keys = [c.key for c in grid.expand_grid(config) if c.setting == "W4A16" and c.format == "int"]
        assert keys == ["m-a|W4A16|int|fake-qat-for-test[lr=1]|s0", "m-a|W4A16|int|fake-qat-for-test[lr=2]|s0",
                        "m-b|W4A16|int|fake-qat-for-test[lr=1]|s0", "m-b|W4A16|int|fake-qat-for-test[lr=2]|s0"]
        model = QLinear(8, 4, rngs=nnx.Rngs(0))
        rules = settings.quant_rules("W4A16", "int", ".*")
        context = settings.MethodContext(params={"lr": 2}, materialize="packed")
        quantized = settings.quantize_for_cell(model, rules, "fake-qat-for-test", context)
        assert quantized.qkernel is not None and quantized.quant.mode == "packed"
        assert settings.quantize_for_cell(model, [], "fake-qat-for-test") is model
        assert calls == [(1, {"lr": 2})]
        with pytest.raises(ValueError, match=r"no hyper-parameter\(s\) \['momentum'\].*lr=0"):
            settings.quantize_for_cell(model, rules, "fake-qat-for-test", settings.MethodContext(params={"momentum": 1}))
        methods.register_method("fake-qat-for-test", fake_qat, kind="qat")  # same function again: allowed
        with pytest.raises(ValueError, match="already registered.*replace=True"):
            methods.register_method("fake-qat-for-test", lambda problem: MethodResult(), kind="qat")
    finally:
        methods._METHODS.pop("fake-qat-for-test")  # pylint: disable=protected-access


def test_method_settings_restrict_where_a_method_runs():
    from bitlaws import ptq  # noqa: F401  pylint: disable=g-import-not-at-top  (registers smoothquant, gptq)

    config = _config(models=("m-a",), formats=("int",), methods=("rtn", "gptq", "smoothquant"),
                     method_settings={"smoothquant": ("W8A8", "w4a8"), "gptq": "W4A16"})
    expansion = grid.expand_grid_report(config)
    ran = {(c.setting, c.method) for c in expansion.cells if c.method not in ("none", "rtn")}
    assert ran == {("W8A8", "smoothquant"), ("W4A8", "smoothquant"), ("W4A16", "gptq")}
    assert sum(c.method == "rtn" for c in expansion.cells) == 5
    assert expansion.skipped == []  # the config's choice is not reported as a gap
    with pytest.raises(ValueError, match="names method 'awq', which is not in config.methods"):
        grid.expand_grid_report(_config(method_settings={"awq": ("W4A16",)}))


def test_method_models_restrict_on_which_models_a_method_runs():
    from bitlaws import ptq  # noqa: F401  pylint: disable=g-import-not-at-top  (registers gptq)

    config = _config(formats=("int",), settings=("W16A16", "W4A16"), methods=("rtn", "gptq"),
                     method_models={"gptq": ("m-b",)})
    cells = grid.expand_grid(config)
    assert {(c.model, c.method) for c in cells if c.method != "none"} == {("m-a", "rtn"), ("m-b", "rtn"),
                                                                           ("m-b", "gptq")}
    with pytest.raises(ValueError, match=r"config.method_models\['gptq'\] names model\(s\) \['m-z'\]"):
        grid.expand_grid(_config(methods=("rtn", "gptq"), method_models={"gptq": ("m-z",)}))
    with pytest.raises(ValueError, match="names method 'awq', which is not in config.methods"):
        grid.expand_grid(_config(method_models={"awq": ("m-a",)}))
