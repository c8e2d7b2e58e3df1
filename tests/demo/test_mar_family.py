"""The demo MAR family: shipped members load, sample and calibrate; the quant pattern; training reduces the loss."""

from __future__ import annotations

import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from bitlaws.configlib import load_config
from bitlaws.demo import mar_family
from bitlaws.demo.data import load_digits
from bitlaws.demo.family import families, load_member
from bitlaws.quant import QuantRule, match_rules
from bitlaws.train import TrainConfig, train_module

jax.config.update("jax_default_matmul_precision", "highest")

CONFIG = pathlib.Path(__file__).resolve().parents[2] / "configs" / "demo" / "mar.py"
NAMES = mar_family.member_names()


@pytest.fixture(scope="module")
def smallest():
    return load_member(NAMES[0])


def test_family_is_registered_and_members_grow():
    assert "mar" in families()
    assert len(NAMES) >= 3, NAMES
    counts = [mar_family.count_params(mar_family.abstract_member(name)) for name in NAMES]
    assert counts == sorted(counts) and len(set(counts)) == len(counts), counts


def test_abstract_member_matches_the_loaded_model(smallest):
    abstract = mar_family.abstract_member(NAMES[0])
    shapes = jax.tree.map(lambda x: x.shape, nnx.state(abstract, nnx.Param))
    assert shapes == jax.tree.map(lambda x: x.shape, nnx.state(smallest.model, nnx.Param))


def test_shipped_checkpoints_fit_the_budget():
    total = sum(f.stat().st_size for f in mar_family.CHECKPOINT_ROOT.glob("mar-d*/**/*") if f.is_file())
    assert 0 < total <= 10 * 2**20


def test_quant_pattern_covers_every_linear(smallest):
    model = smallest.model
    match = match_rules(model, [QuantRule(module_path=smallest.quant_pattern)])
    assert not match.unmatched_layers, match.unmatched_layers
    names = set(match.assignments)
    assert {"z_proj", "decoder_embed", "encoder_blocks.0.attn.qkv", "decoder_blocks.0.mlp.fc2",
            "diffloss.cond_embed", "diffloss.input_proj", "diffloss.time_embed.mlp_in",
            "diffloss.res_blocks.0.adaLN_modulation", "diffloss.final_layer.linear"} <= names


def test_member_samples_digits_deterministically(smallest, sample_twice_and_once_more):
    assert smallest.family == "mar" and smallest.name == NAMES[0]
    assert set(smallest.sampling) == {"num_iter", "num_sampling_steps", "cfg", "cfg_schedule", "temperature",
                                      "clip_denoised", "clamp_variance"}
    first, other = sample_twice_and_once_more(smallest, np.array([0, 3, 7, 9]), key=1, other_key=2)
    assert np.abs(first - other).max() > 0.1
    assert np.median(first) < -0.5 and (first > 0.5).mean() > 0.03  # dark background, bright strokes


@pytest.mark.parametrize("source", ["data", "samples"])
def test_calibration_batches_run_through_the_network(smallest, source):
    batches = smallest.calibration_batches(2, 4, seed=0, source=source)
    again = smallest.calibration_batches(2, 4, seed=0, source=source)
    assert len(batches) == 2
    tokens, mask, labels, head_x, head_t, head_index = batches[0]
    seq_len, channels = smallest.model.seq_len, smallest.model.token_embed_dim
    assert tokens.shape == (4, seq_len, channels) and mask.shape == (4, seq_len) and labels.shape == (4,)
    assert head_x.shape[1] == channels and head_t.shape == head_index.shape == (head_x.shape[0],)
    assert int(labels.max()) <= smallest.model.num_classes and int(head_index.max()) < 4 * seq_len
    assert 0 <= int(head_t.min()) and int(head_t.max()) < 1000
    for ours, theirs in zip(batches[0], again[0]):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))
    out = smallest.calibration_forward(smallest.model, batches[0])
    assert out.shape == (head_x.shape[0], 2 * channels) and np.isfinite(np.asarray(out)).all()
    assert smallest.calibration_protocol(source)


@pytest.mark.slow  # 11-33 s: compiles the training step (the trainer itself is tested in tests/train)
def test_training_loss_decreases_on_a_tiny_model():
    config = load_config(f"{CONFIG}:depth=1,quick")
    assert config.family == "mar" and config.train.steps == 2
    kwargs = dict(config.model.to_dict(), encoder_embed_dim=16, encoder_num_heads=1, decoder_embed_dim=16,
                  decoder_num_heads=1, diffloss_w=48)
    model = mar_family.make_model(kwargs)
    data = load_digits("val")
    batch = (data.images[:16], data.labels[:16])
    result = train_module(model, mar_family.train_loss_fn(), lambda step: batch,
                          TrainConfig(steps=16, learning_rate=3e-3, log_every=1), progress=False)
    losses = [record["loss"] for record in result.history]
    assert len(losses) == 16 and np.isfinite(losses).all()
    assert np.mean(losses[-4:]) < 0.7 * np.mean(losses[:4]), losses


def test_config_rejects_bad_arguments():
    with pytest.raises(ValueError):
        load_config(f"{CONFIG}:depth=9")
    with pytest.raises(ValueError):
        load_config(f"{CONFIG}:width=3")
