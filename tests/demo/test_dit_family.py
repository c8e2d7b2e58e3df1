"""The demo DiT family: shipped members load and sample, are trained, span >= 8x in size; training resumes."""

from __future__ import annotations

import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bitlaws.configlib import load_config
from bitlaws.demo import dit_family
from bitlaws.demo.data import load_digits
from bitlaws.demo.family import families, load_member
from bitlaws.quant import QuantRule, match_rules
from bitlaws.train import metrics_lines

jax.config.update("jax_default_matmul_precision", "highest")

CONFIG = pathlib.Path(__file__).resolve().parents[2] / "configs" / "demo" / "dit.py"
NAMES = dit_family.member_names()


@pytest.fixture(scope="module")
def members():
    return {name: load_member(name) for name in NAMES}


def test_family_is_registered_with_at_least_four_members():
    assert "dit" in families()
    assert len(NAMES) >= 4, NAMES
    assert NAMES[0] == "dit-d2"


def test_parameter_counts_span_eight_times(members):
    counts = [dit_family.count_params(members[name].model) for name in NAMES]
    assert counts == sorted(counts) and len(set(counts)) == len(counts)
    assert counts[-1] >= 8 * counts[0], counts


def test_shipped_checkpoints_fit_the_budget():
    total = sum(f.stat().st_size for f in dit_family.CHECKPOINT_ROOT.glob("dit-d*/**/*") if f.is_file())
    assert 0 < total <= 10 * 2**20


def test_quant_pattern_covers_every_linear_but_the_embedders(members):
    model = members[NAMES[0]].model
    match = match_rules(model, [QuantRule(module_path=members[NAMES[0]].quant_pattern)])
    quantized = set(match.assignments)
    depth = len(model.blocks)
    expected = {f"blocks.{i}.{layer}" for i in range(depth)
                for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation")}
    expected |= {"final_layer.linear", "final_layer.adaLN_modulation"}
    assert quantized == expected
    assert set(match.unmatched_layers) == {"x_embedder.proj", "t_embedder.mlp_in", "t_embedder.mlp_out"}


@pytest.mark.parametrize("name", NAMES)
def test_member_samples_digits_deterministically(members, name, sample_twice_and_once_more):
    member = members[name]
    assert member.name == name and member.family == "dit"
    first, other = sample_twice_and_once_more(member, np.array([0, 3, 7, 9]), key=1, other_key=2)
    assert np.abs(first - other).max() > 0.1
    # Digits are mostly background (-1) with bright strokes: not noise, not a constant image.
    assert np.median(first) < -0.5 and (first > 0.5).mean() > 0.05


def test_trained_members_beat_a_fresh_model_on_val(members):
    val = load_digits("val")
    images, labels = val.images[:64], val.labels[:64]
    timesteps = (50, 250, 500)
    fresh = dit_family.make_model(members[NAMES[0]].metadata["model"], seed=1)
    fresh_loss = dit_family.evaluate_loss(fresh, images, labels, timesteps=timesteps)
    # adaLN-Zero: the fresh model predicts x0 = 0, so its mse is the mean squared pixel.
    assert fresh_loss["mse"] == pytest.approx(float(np.mean(np.square(images))), rel=0.02)
    for name in (NAMES[0], NAMES[-1]):
        trained = dit_family.evaluate_loss(members[name].model, images, labels, timesteps=timesteps)
        assert trained["loss"] < 0.5 * fresh_loss["loss"], (name, trained, fresh_loss)
        assert trained["mse"] < 0.5 * fresh_loss["mse"], (name, trained)


@pytest.mark.parametrize("predict_xstart", [True, False])
def test_loss_terms_vanish_for_a_perfect_prediction(predict_xstart):
    diffusion = dit_family.training_diffusion(predict_xstart)
    x_start = jnp.asarray(load_digits("val").images[:2])
    noise = jax.random.normal(jax.random.key(0), x_start.shape)
    t = jnp.array([10, 600], jnp.int32)
    x_t = dit_family.q_sample(diffusion, x_start, t, noise)
    target = x_start if predict_xstart else noise
    # var value v gives log var = ((v + 1) / 2) log beta + (1 - (v + 1) / 2) log posterior var; v = -1 is
    # the true posterior variance, so with the true mean the KL is zero.
    output = jnp.concatenate([target, -jnp.ones_like(noise)], axis=-1)
    terms = dit_family.diffusion_loss_terms(diffusion, output, x_start, x_t, t, noise)
    np.testing.assert_allclose(np.asarray(terms["mse"]), 0.0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(terms["vb"]), 0.0, atol=1e-3)
    wrong = jnp.concatenate([target, jnp.ones_like(noise)], axis=-1)  # variance beta_t: wrong where t is small
    assert float(dit_family.diffusion_loss_terms(diffusion, wrong, x_start, x_t, t, noise)["vb"][0]) > 1e-3
    other = jnp.concatenate([noise if predict_xstart else x_start, -jnp.ones_like(noise)], axis=-1)
    assert float(dit_family.diffusion_loss_terms(diffusion, other, x_start, x_t, t, noise)["mse"].min()) > 0.5


def test_discretized_likelihood_is_a_distribution_over_bins():
    centers = jnp.linspace(-1.0, 1.0, 256)  # the 256 bin centres of 8-bit data
    log_probs = dit_family.discretized_gaussian_log_likelihood(centers, jnp.full_like(centers, 0.1),
                                                               jnp.full_like(centers, math.log(0.3)))
    assert float(jnp.exp(log_probs).sum()) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.slow  # ~75 s; exact resume is tested on the trainer itself (tests/train) and on the VAR family
def test_two_step_training_resumes_from_its_checkpoint(tmp_path):
    config = load_config(f"{CONFIG}:depth=1,quick")
    assert config.train.steps == 2 and config.family == "dit"
    config.train.steps = 1
    first = dit_family.train_from_config(config, tmp_path / "run", progress=False)
    assert first["steps"] == 1 and first["resumed_from"] == 0
    config.train.steps = 2
    resumed = dit_family.train_from_config(config, tmp_path / "run", progress=False)
    assert resumed["steps"] == 2 and resumed["resumed_from"] == 1
    assert [r["step"] for r in metrics_lines(tmp_path / "run")] == [1, 2]
    straight = dit_family.train_from_config(config, tmp_path / "straight", progress=False)
    assert straight["resumed_from"] == 0
    got = nnx.state(dit_family.load_from_dir(tmp_path / "run" / "model").model)
    want = nnx.state(dit_family.load_from_dir(tmp_path / "straight" / "model").model)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    fresh = dit_family.make_model(config.model.to_dict(), seed=config.train.seed)
    moved = max(float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(nnx.state(fresh))))
    assert moved > 0  # the two steps changed the weights


def test_config_rejects_unknown_arguments():
    with pytest.raises(ValueError, match="unknown"):
        load_config(f"{CONFIG}:depht=4")


def test_cli_train_records_its_command(tmp_path):
    from bitlaws import cli  # pylint: disable=g-import-not-at-top

    out = tmp_path / "cli-run"
    assert cli.main(["train", "--config", f"{CONFIG}:depth=1,quick", "--set", "train.steps=1", "--out", str(out)]) == 0
    metadata = dit_family.load_from_dir(out / "model").metadata
    command = metadata["training"]["command"]
    assert command.startswith("bitlaws train --config ") and "depth=1,quick" in command
    assert "--set train.steps=1" in command and command.endswith(f"--out {out}")


def test_lookups_import_the_shipped_families_themselves():
    """``family.load_member("var-d2")`` works in a fresh process that imported only `bitlaws.demo.family`."""
    import subprocess
    import sys

    code = ("import sys; from bitlaws.demo import family; assert 'bitlaws.demo.var_family' not in sys.modules; "
            "print(','.join(family.families()), family.member_names('var')[0])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    names, first = out.stdout.split()
    assert {"dit", "var", "llamagen"} <= set(names.split(",")) and first == "var-d1"
