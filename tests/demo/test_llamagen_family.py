"""Tests of the demo LlamaGen family: shipped checkpoints, sampling, calibration, quant pattern, losses."""

from __future__ import annotations

import math
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from bitlaws import checkpoint
from bitlaws.configlib import load_config
from bitlaws.demo import family
from bitlaws.demo import llamagen_family as lf
from bitlaws.demo.data import DigitsData, load_digits
from bitlaws.quant.spec import QuantRule
from bitlaws.quant.transform import match_rules

jax.config.update("jax_default_matmul_precision", "highest")

VAL_SUBSET = 120
CONFIGS = pathlib.Path(__file__).resolve().parents[2] / "configs" / "demo"
LABELS = np.array([0, 3, 7, 9], np.int32)  # one sampling batch size for the whole module: one compilation


@pytest.fixture(scope="module")
def names() -> list[str]:
    return lf.member_names()


@pytest.fixture(scope="module")
def smallest(names) -> lf.LlamaGenMember:
    return family.load_member(names[0])


@pytest.fixture(scope="module")
def val_subset() -> DigitsData:
    val = load_digits("val")
    return DigitsData(val.images[:VAL_SUBSET], val.labels[:VAL_SUBSET])


def test_family_registered_with_members_spanning_8x(names):
    assert "llamagen" in family.families()
    assert len(names) >= 3
    counts = [lf.num_params(lf.abstract_member(name)) for name in names]
    assert counts == sorted(counts)
    assert counts[-1] >= 8 * counts[0], counts


def test_every_member_loads_with_its_metadata(names):
    for name in names:
        member = family.load_member(name)
        assert member.name == name and member.family == "llamagen"
        assert member.model.n_layer == int(name.removeprefix("llamagen-d"))
        assert member.metadata["summary"]["params"] == lf.num_params(member.model)
        abstract = nnx.state(lf.abstract_member(name))
        assert jax.tree.map(np.shape, abstract) == jax.tree.map(np.shape, nnx.state(member.model))


def test_tokenizer_is_not_a_member():
    with pytest.raises(ValueError, match="no llamagen demo member"):
        lf.load_member("llamagen-nope")
    assert lf.TOKENIZER_NAME not in lf.member_names()


def test_quant_pattern_covers_every_gpt_linear_and_nothing_of_the_tokenizer(smallest):
    matched = match_rules(smallest.model, [QuantRule(module_path=lf.QUANT_PATTERN)])
    assert not matched.unmatched_layers
    paths = set(matched.assignments)
    assert {"output", "layers.0.attention.wqkv", "layers.0.attention.wo", "layers.0.feed_forward.w1",
            "layers.0.feed_forward.w2", "layers.0.feed_forward.w3"} <= paths
    assert len(paths) == 5 * smallest.model.n_layer + 1
    assert smallest.quant_pattern == lf.QUANT_PATTERN
    tokenizer = match_rules(smallest.tokenizer, [QuantRule(module_path=lf.QUANT_PATTERN)])
    assert not tokenizer.assignments and tokenizer.unmatched_layers


def test_sample_shape_range_and_determinism(smallest, sample_twice_and_once_more):
    first, other = sample_twice_and_once_more(smallest, LABELS, key=3, other_key=4)
    assert not np.array_equal(first, other)
    # Digits are light strokes on a dark background, as in the data.
    assert np.mean(first < 0.0) > 0.5


@pytest.mark.parametrize("source", ["data", "samples"])
def test_calibration_batches(smallest, source):
    batches = smallest.calibration_batches(2, len(LABELS) // 2, seed=0, source=source)
    again = smallest.calibration_batches(2, len(LABELS) // 2, seed=0, source=source)
    assert len(batches) == 2
    for (labels, tokens), (labels2, tokens2) in zip(batches, again):
        assert labels.shape == (2,) and tokens.shape == (2, smallest.model.block_size)
        assert tokens.dtype == np.int32 and 0 <= int(tokens.min()) and int(tokens.max()) < smallest.model.vocab_size
        assert 0 <= int(labels.min()) and int(labels.max()) <= smallest.model.null_class
        np.testing.assert_array_equal(labels, labels2)
        np.testing.assert_array_equal(tokens, tokens2)
    logits = smallest.calibration_forward(smallest.model, batches[0])
    assert logits.shape == (2, smallest.model.block_size, smallest.model.vocab_size)
    np.testing.assert_allclose(logits, smallest.calibration_apply(smallest.model, batches[0]), atol=1e-5)
    assert smallest.calibration_protocol(source)


def test_teacher_forced_val_loss_beats_uniform(smallest, val_subset):
    loss = lf.teacher_forced_loss(smallest.model, smallest.tokenizer, val_subset)
    assert loss < 0.75 * math.log(smallest.model.vocab_size), loss


def test_tokenizer_reconstructs_val_digits(smallest, val_subset):
    recon = lf.reconstruct(smallest.tokenizer, val_subset.images)
    assert recon.shape == val_subset.images.shape
    mse = float(np.mean(np.square(recon - val_subset.images)))
    baseline = float(np.mean(np.square(val_subset.images - val_subset.images.mean(axis=0))))
    assert mse < 0.1 * baseline, (mse, baseline)


@pytest.mark.slow  # ~60 s: two quick trainings (the trainer itself is tested in tests/train)
def test_quick_training_of_tokenizer_then_gpt(tmp_path):
    vq_config = load_config(f"{CONFIGS / 'llamagen_vq.py'}:quick")
    vq_config.train.steps = 2
    summary = lf.train_from_config(vq_config, tmp_path / "vq", progress=False)
    assert summary["finished"] and summary["val"]["codes_used"] >= 1
    config = load_config(f"{CONFIGS / 'llamagen.py'}:depth=1,quick")
    config.train.steps = 2
    config.tokenizer_dir = str(tmp_path / "vq")
    summary = lf.train_from_config(config, tmp_path / "d1", progress=False)
    assert summary["finished"] and np.isfinite(summary["val"]["loss"])
    metadata = checkpoint.load_metadata(tmp_path / "d1")
    assert metadata["tokenizer_ctor"] == checkpoint.load_metadata(tmp_path / "vq")["ctor"]
    assert metadata["summary"]["name"] == "llamagen-d1"
