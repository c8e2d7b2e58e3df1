"""Tests of the demo VAR family: shipped checkpoints, sampling, learned losses, resumable training."""

from __future__ import annotations

import math
import pathlib
import re

import jax
import numpy as np
import pytest
from flax import nnx

from bitlaws import checkpoint
from bitlaws.configlib import load_config
from bitlaws.demo import family
from bitlaws.demo import var_family as vf
from bitlaws.demo.data import DigitsData, load_digits
from bitlaws.quant.transform import match_rules
from bitlaws.quant.spec import QuantRule
from bitlaws.train import metrics_lines

jax.config.update("jax_default_matmul_precision", "highest")

VAL_SUBSET = 120
VAR_CONFIG = pathlib.Path(__file__).resolve().parents[2] / "configs" / "demo" / "var.py"


@pytest.fixture(scope="module")
def names() -> list[str]:
    return vf.member_names()


@pytest.fixture(scope="module")
def smallest(names) -> vf.VarMember:
    return family.load_member(names[0])


@pytest.fixture(scope="module")
def val_subset() -> DigitsData:
    val = load_digits("val")
    return DigitsData(val.images[:VAL_SUBSET], val.labels[:VAL_SUBSET])


def test_family_registered_with_four_depths_spanning_8x(names):
    assert "var" in family.families()
    assert len(names) >= 4
    tokenizer_ctor = checkpoint.load_metadata(vf.CHECKPOINT_ROOT / vf.TOKENIZER_NAME)["ctor"]
    counts = []
    for name in names:
        ctor = checkpoint.load_metadata(vf.CHECKPOINT_ROOT / name)["ctor"]
        counts.append(vf.num_params(nnx.eval_shape(lambda c=ctor: vf.build_var(c, tokenizer_ctor))))
    assert counts == sorted(counts)
    assert counts[-1] >= 8 * counts[0], counts


def test_every_member_loads_with_its_metadata(names):
    for name in names:
        member = family.load_member(name)
        assert member.name == name and member.family == "var"
        assert member.model.depth == int(name.removeprefix("var-d"))
        assert member.metadata["summary"]["params"] == vf.num_params(member.model)


def test_quant_pattern_covers_every_transformer_linear_layer(smallest):
    matched = match_rules(smallest.model, [QuantRule(module_path=smallest.quant_pattern)])
    assert not matched.unmatched_layers
    paths = set(matched.assignments)
    assert "head" in paths and "blocks.0.attn.mat_qkv" in paths and "blocks.0.ffn.fc2" in paths
    assert all(re.fullmatch(vf.QUANT_PATTERN, p) for p in paths)


def test_sample_shape_range_and_determinism(names, sample_twice_and_once_more):
    # One member only: compiling the sampler costs ~10 s per member on this CPU; all members load above.
    member = family.load_member(names[-1])
    first, other = sample_twice_and_once_more(member, np.arange(6) % 10, key=3, other_key=4)
    assert not np.array_equal(first, other)
    # Digits are light strokes on a dark background, as in the data.
    assert np.mean(first < 0.0) > 0.5


def test_teacher_forced_val_loss_well_below_uniform(smallest, val_subset):
    loss = vf.teacher_forced_loss(smallest.model, smallest.tokenizer, val_subset)
    assert loss < 0.75 * math.log(smallest.model.vocab_size), loss


def test_tokenizer_reconstructs_val_digits(smallest, val_subset):
    recon = vf.reconstruct(smallest.tokenizer, val_subset.images)
    assert recon.shape == val_subset.images.shape
    mse = float(np.mean(np.square(recon - val_subset.images)))
    baseline = float(np.mean(np.square(val_subset.images - val_subset.images.mean(axis=0))))
    assert mse < 0.1 * baseline, (mse, baseline)


def test_tokenizer_training_forward_picks_the_inference_tokens(smallest, val_subset):
    vae = smallest.tokenizer
    images = val_subset.images[:8]

    @nnx.jit
    def training_tokens(model, x):
        _, _, tokens = vf.residual_quantize(model, model.encode_features(x), beta=0.25)
        return jax.numpy.concatenate(tokens, axis=1)

    reference, _ = vf.tokenize(vae, images)
    np.testing.assert_array_equal(np.asarray(training_tokens(vae, images)), reference)


@pytest.mark.slow  # 30 s; resuming the one trainer is covered by tests/train/test_train_kill_resume.py
def test_two_step_training_resumes(tmp_path):
    config = load_config(f"{VAR_CONFIG}:depth=1,quick")
    config.train.steps = 4
    first = vf.train_from_config(config, tmp_path, stop_after=2, progress=False)
    assert first["train"]["start_step"] == 0 and first["train"]["steps"] == 2 and not first["finished"]
    assert (tmp_path / vf.TRAIN_STATE_DIR).exists()
    assert not (tmp_path / checkpoint.STATE_DIR).exists()  # the final model is written when finished
    resumed = vf.train_from_config(config, tmp_path, progress=False)
    assert resumed["train"]["start_step"] == 2 and resumed["train"]["steps"] == 4 and resumed["finished"]
    assert resumed["train"]["wall_s"] > first["train"]["wall_s"]  # accumulated over sessions
    assert [r["step"] for r in metrics_lines(tmp_path)] == [1, 2, 3, 4]  # bitlaws.train's log, one line per step
    assert np.isfinite(resumed["val"]["loss"])
    tokenizer_ctor = checkpoint.load_metadata(vf.CHECKPOINT_ROOT / vf.TOKENIZER_NAME)["ctor"]
    trained = checkpoint.load_model(lambda: vf.build_var(config.model, tokenizer_ctor), tmp_path)
    assert trained.depth == 1
    assert checkpoint.load_metadata(tmp_path)["summary"]["train"]["steps"] == 4
