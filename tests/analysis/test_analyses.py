"""The three analyses on tiny demo models: shapes of the curves, controls that must come out exactly, the CLI."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitlaws import cli
from bitlaws.analysis import activations, errors, noise, noise_core, subjects, summary, trajectory
from bitlaws.quant import capture


@pytest.mark.parametrize("which", ["var", "dit"])
def test_errors_one_point_per_step_and_zero_for_the_float_setting(which, var_subject, dit_subject):
    subject = var_subject if which == "var" else dit_subject
    same = errors.run_errors(subject, subjects.Precision("W16A16", "none", "rtn"), n=3)
    assert same["feature_error"] == [0.0] * subject.num_steps
    assert same["representation_error"] == [0.0] * subject.num_steps and same["image_mse"] == 0.0
    record = errors.run_errors(subject, subjects.Precision("W4A16", "int", "rtn"), n=3)
    assert len(record["feature_error"]) == len(record["representation_error"]) == len(record["steps"]) \
        == subject.num_steps
    assert record["feature_error"][0] > 0  # the first step sees the same input: its error is the network's own
    assert record["image_mse"] > 0
    assert record["reduced_steps"] == sum(r < f for r, f in zip(record["representation_error"],
                                                                 record["feature_error"]))
    assert record["model"] in summary.errors_sentence(record)
    json.dumps(record, allow_nan=False)


def test_single_step_noise_sweep(var_subject):
    record = noise.single_step(var_subject, snrs=[0.0, 10.0, 20.0, math.inf], step=-1, n=3)
    assert record["step"] == var_subject.num_steps - 1 and record["step_name"] == "8x8"
    assert record["snr_db"] == [0.0, 10.0, 20.0, "inf"]
    assert record["loss"][-1] == 0.0  # +inf dB: exactly the noise-free images
    assert record["loss"][0] > 0
    expected = noise_core.spearman([10 ** (-s / 10) for s in (0.0, 10.0, 20.0)], record["loss"][:3])
    assert record["spearman"] == pytest.approx(expected)
    with pytest.raises(ValueError, match="outside"):
        noise.single_step(var_subject, snrs=[10.0], step=99)


def test_accumulation_noise_only_in_the_first_steps(dit_subject):
    record = noise.accumulation(dit_subject, snrs=[0.0, math.inf], fraction=0.4, n=2)
    assert record["noisy_steps"] == 2
    noisy, clean = record["curves"]
    assert len(noisy["representation_error"]) == dit_subject.num_steps
    assert noisy["representation_error"][0] > 0 and noisy["loss"] > 0
    assert clean["representation_error"] == [0.0] * dit_subject.num_steps and clean["loss"] == 0.0
    errors_ = noisy["representation_error"]
    assert summary.growth(noisy, 2) == pytest.approx(errors_[-1] / errors_[1])
    assert summary.growth(clean, 2) is None


def test_summarize_input_counts_only_real_rows():
    x = np.zeros((2, 4, 3), np.float32)
    x[:, :2] = np.arange(12, dtype=np.float32).reshape(2, 2, 3)
    x[:, 2:] = 1000.0  # padding rows
    stats = activations.summarize_input(x, rows=2)
    real = x[:, :2].reshape(-1)
    assert stats["absmax"] == 11.0 and stats["mean"] == pytest.approx(real.mean())
    np.testing.assert_allclose(stats["q"], np.quantile(real, activations.QUANTILES))
    per_channel = np.abs(x[:, :2]).reshape(-1, 3).max(axis=0)
    assert stats["channel_outlier_ratio"] == pytest.approx(per_channel.max() / np.median(per_channel))


def test_activations_per_step_and_against_a_direct_recording(dit_subject):
    record = activations.run_activations(dit_subject, blocks=[4, 14], kinds=["qkv", "fc2"], n=2)
    assert record["blocks"] == [1]  # clamped to dit-d2's two blocks
    assert [layer["path"] for layer in record["layers"]] == ["blocks.1.attn.qkv", "blocks.1.mlp.fc2"]
    assert all(len(layer["steps"]) == dit_subject.num_steps for layer in record["layers"])
    # step 0's qkv input, recorded directly around one guided model call on the same initial noise
    model = dit_subject.model
    labels = dit_subject.labels(2)
    x, _ = trajectory._initial_noise(jax.random.key(0), (2, 16, 16, 3))
    y = jnp.concatenate([jnp.asarray(labels), jnp.full((2,), model.num_classes, jnp.int32)])
    t = jnp.full((4,), int(dit_subject.step_names[0].split("=")[1]), jnp.int32)
    clone, sinks = capture.recording(model, ["blocks.1.attn.qkv"])
    try:
        clone.forward_with_cfg(x, t, y, 1.5)
        jax.effects_barrier()
        (call,) = sinks["blocks.1.attn.qkv"].take_calls()
    finally:
        capture.stop_recording(clone)
    direct = activations.summarize_input(call.args[0])
    np.testing.assert_allclose(record["layers"][0]["steps"][0]["q"], direct["q"], rtol=1e-5, atol=1e-6)
    assert record["layers"][0]["temporal_variation"] > 0


def test_activations_of_var_skip_the_padding(var_subject):
    record = activations.run_activations(var_subject, blocks=[0], kinds=["fc1"], n=2)
    (layer,) = record["layers"]
    assert len(layer["steps"]) == var_subject.num_steps == len(record["steps"])
    with pytest.raises(ValueError, match="layer kinds"):
        activations.run_activations(var_subject, kinds=["fc3"])


def test_cli_writes_json_figures_and_summary(tmp_path):
    out = tmp_path / "analysis"
    assert cli.main(["analyze", "errors", "--models", "var-d1", "--precision", "W4A16", "--n", "3",
                     "--out", str(out)]) == 0
    assert cli.main(["analyze", "noise", "--models", "var-d1", "--n", "3", "--snrs", "0:20:10",
                     "--accumulation-snrs", "0", "--out", str(out)]) == 0
    for name in ("errors.json", "errors.png", "errors.svg", "noise.json", "noise_single_step.png",
                 "noise_single_step.svg", "noise_accumulation.png", "noise_accumulation.svg", "analysis.md"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "noise.json").read_text())
    assert saved["single_step"][0]["snr_db"] == [0.0, 10.0, 20.0, "inf"]
    assert saved["command"].startswith("bitlaws analyze noise")
    written = (out / "analysis.md").read_text()
    assert "Figure 2" in written and "Figure 3" in written and "reproduced the noise-free images exactly" in written
    assert summary.summary_lines(tmp_path / "nothing") == []


@pytest.mark.parametrize("argv,message", [
    (["analyze", "errors", "--precision", "W9A8"], "W9A8"),
    (["analyze", "errors", "--method", "nope"], "nope"),
    (["analyze", "noise", "--snrs", "a:b"], "--snrs"),
    (["analyze", "noise", "--fraction", "0"], "--fraction"),
    (["analyze", "activations", "--layers", "fc3"], "--layers"),
    (["analyze", "errors", "--models", "var-d99"], "var-d99"),
    (["analyze", "errors", "--models", ""], "nothing to analyse"),
])
def test_cli_bad_input_is_one_line(argv, message, tmp_path, capsys):
    assert cli.main(argv + ["--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err and err.startswith("bitlaws analyze: error:")
    assert not (tmp_path / "x").exists()
