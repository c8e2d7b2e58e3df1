"""``configs/qat/demo.py`` and ``configs/qat/var.py``: every loss x setting x format builds (W3 fp is refused by
name), the method and its hyper-parameters are right, and a ``runlocal`` demo run writes a loadable checkpoint."""

from __future__ import annotations

import itertools
import pathlib

import pytest

import bitlaws
from bitlaws import configlib
from bitlaws.demo.var_family import QUANT_PATTERN
from bitlaws.ptq import run

REPO = pathlib.Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "qat" / "demo.py"
VAR = REPO / "configs" / "qat" / "var.py"
LOSSES = ("mse", "js", "fkl", "rkl", "topkld")
SETTINGS = ("W3A16", "W4A16", "W8A16", "W4A8", "W8A8")
FAMILIES = ("int", "fp")
COMBOS = list(itertools.product(LOSSES, SETTINGS, FAMILIES))


def _load(config: pathlib.Path, variant: str, overrides=()):
    return configlib.load_config(f"{config}:{variant}", overrides)


def _check(config, loss: str, setting: str, family: str, k: int, params: dict) -> None:
    assert config.method == f"qat:{loss}"
    assert (config.setting, config.format) == (setting, family)
    got = dict(config.method_params)
    assert {name: got[name] for name in params} == params
    if loss == "topkld":
        assert (got["k"], got["form"]) == (k, "divergence")
    else:
        assert "k" not in got and "form" not in got
    assert run.build_rules(config, QUANT_PATTERN)  # the setting and family give rules


@pytest.mark.parametrize("loss,setting,family", COMBOS)
def test_every_combination_builds_or_names_the_missing_format(loss, setting, family):
    demo_params = {"steps": 100, "batch_size": 16, "lr": 1e-3, "warmup_steps": 10, "final_lr_fraction": 0.1}
    var_params = {"steps": 2000, "batch_size": 16, "lr": 1e-5, "warmup_steps": 100, "final_lr_fraction": 0.1,
                  "train": "all"}
    cases = [(DEMO, "var-d2", 16, demo_params), (DEMO, "dit-d3", 16, demo_params)]
    cases += [(VAR, depth, 600, var_params) for depth in ("d16", "d20", "d24", "d30")]
    for config_file, model, k, params in cases:
        variant = f"{model},{setting},{family},{loss}"
        if setting == "W3A16" and family == "fp":
            with pytest.raises(ValueError, match=r"W3A16 with fp: no 3-bit float format.*use int"):
                _load(config_file, variant)
            continue
        _check(_load(config_file, variant), loss, setting, family, k, params)


def test_demo_defaults_and_training_data():
    var = _load(DEMO, "var-d4")
    assert (var.method, var.setting, var.format, var.model.source) == ("qat:topkld", "W4A16", "int", "var-d4")
    assert dict(var.calibration) == {"source": "samples", "num_batches": 8, "batch_size": 32, "seed": 0,
                                     "data_fn": "", "when": "needed"}
    dit = _load(DEMO, "dit-d3,mse")
    assert dit.calibration.source == "data" and dit.method == "qat:mse"
    local = _load(DEMO, "var-d1,W3A16,runlocal,steps=3")
    assert (local.calibration.num_batches, local.calibration.batch_size) == (1, 8)
    assert {k: local.method_params[k] for k in ("steps", "batch_size", "warmup_steps", "log_every")} == {
        "steps": 3, "batch_size": 8, "warmup_steps": 1, "log_every": 1}


def test_hyper_parameters_from_the_variant_and_set():
    config = _load(DEMO, "var-d2,W4A8,topkld,k=8,lsq=True,lr=3e-4", ["method_params.out_dir=runs/state"])
    assert (config.method_params.k, config.method_params.lsq, config.method_params.lr) == (8, True, 3e-4)
    assert config.method_params.out_dir == "runs/state"
    assert _load(DEMO, "var-d2,qat:js").method == "qat:js"


def test_var_config_points_at_the_ports_and_own_samples():
    config = _load(VAR, "d20,W3A16,topkld")
    assert config.model.source == "ckpt/var_d20" and config.method_params.k == 600
    cal = config.calibration
    assert cal.data_fn == "bitlaws.qat.var_data:own_samples" and cal.tokenizer == "ckpt/vqvae"
    assert (cal.cfg, cal.top_k, cal.top_p, cal.num_batches, cal.batch_size) == (1.5, 900, 0.96, 64, 32)
    moved = _load(VAR, "d16,runlocal", ["model.source=/ports/var16", "calibration.tokenizer=/ports/vq"])
    assert (moved.model.source, moved.calibration.tokenizer) == ("/ports/var16", "/ports/vq")
    assert (moved.calibration.num_batches, moved.calibration.batch_size, moved.method_params.steps) == (1, 8, 2)


@pytest.mark.parametrize("config_file,variant,needles", [
    (DEMO, "", ["needs a variant"]),
    (DEMO, "var-d2,gptq", ["'gptq' is not a QAT loss", "topkld"]),
    (DEMO, "var-d2,mse,js", ["method is already 'mse'"]),
    (DEMO, "var-d2,mse,k=4", ["qat:mse", "['k']"]),
    (DEMO, "var-d2,W16A16", ["W16A16 is the float model"]),
    (VAR, "", ["needs a variant"]),
    (VAR, "d17,W3A16", ["d16, d20, d24, d30", "'d17'"]),
    (VAR, "d16,js,k=600", ["qat:js", "['k']"]),
])
def test_bad_variants_are_named(config_file, variant, needles):
    with pytest.raises(ValueError) as info:
        _load(config_file, variant)
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))


@pytest.mark.slow  # ~100 s on the 2-core CPU under load: samples, trains, calibrates and packs var-d1
def test_runlocal_demo_run_writes_a_checkpoint_that_loads(tmp_path):
    out = tmp_path / "var-d1-w3-topkld"
    result = run.run_ptq_from_config(f"{DEMO}:var-d1,W3A16,topkld,runlocal", out)
    assert pathlib.Path(result.directory).resolve() == out.resolve()
    loaded = bitlaws.load_quantized(out)
    method = loaded.metadata["method"]
    assert method["name"] == "qat:topkld" and method["params"]["k"] == 16 and method["params"]["steps"] == 5
    assert loaded.metadata["setting"] == "W3A16" and loaded.metadata["calibration"]["source"] == "samples"
    assert (loaded.metadata["calibration"]["num_batches"], loaded.metadata["calibration"]["batch_size"]) == (1, 8)
    assert result.summary["quantized_layers"] == 8
    assert loaded.demo_member().name == "var-d1"
