"""Tests for the demo digits classifier (bitlaws.demo.classifier) and its shipped checkpoint."""

from __future__ import annotations

import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from bitlaws.checkpoint import load_metadata
from bitlaws.configlib import load_config
from bitlaws.demo import classifier
from bitlaws.demo.data import load_digits
from bitlaws.quant.layers import QConv, QLinear

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIG = str(REPO / "configs" / "demo" / "classifier.py")

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="module")
def shipped() -> classifier.DigitsClassifier:
    return classifier.load_classifier()


def test_shipped_checkpoint_is_small_and_located_in_the_package():
    assert classifier.SHIPPED_CHECKPOINT == REPO / "bitlaws" / "demo" / "checkpoints" / "classifier"
    size = sum(p.stat().st_size for p in classifier.SHIPPED_CHECKPOINT.rglob("*") if p.is_file())
    assert 0 < size < 1_000_000


def test_shipped_classifier_reaches_97_percent_on_val(shipped):
    val = load_digits("val")
    assert classifier.accuracy(shipped, val.images, val.labels) >= 0.97


def test_shipped_metadata_records_training(shipped):
    meta = load_metadata(classifier.SHIPPED_CHECKPOINT)
    assert meta["family"] == "classifier"
    assert meta["val_accuracy"] >= 0.97
    assert 0.0 < meta["final_train_loss"] < 0.1
    assert meta["wall_time_s"] > 0
    assert meta["config"]["train"]["steps"] == meta["steps"]
    assert meta["num_params"] == sum(np.size(x) for x in jax.tree.leaves(nnx.state(shipped, nnx.Param)))


def test_features_are_penultimate_and_logits_follow(shipped):
    images = load_digits("val").images[:5]
    features = np.asarray(shipped.features(images))
    logits = np.asarray(shipped(images))
    assert features.shape == (5, shipped.head.in_features) and logits.shape == (5, 10)
    assert features.min() >= 0.0  # after the ReLU
    np.testing.assert_allclose(np.asarray(shipped.head(features)), logits, rtol=1e-5, atol=1e-5)


def test_every_matmul_goes_through_the_quant_seam(shipped):
    layers = [m for _, m in nnx.iter_graph(shipped) if isinstance(m, nnx.Module)]
    assert sum(isinstance(m, QConv) for m in layers) == 3
    assert sum(isinstance(m, QLinear) for m in layers) == 2
    assert not any(isinstance(m, (nnx.Linear, nnx.Conv)) for m in layers)


def test_predict_logits_handles_ragged_batches(shipped):
    images = load_digits("val").images[:7]
    np.testing.assert_allclose(classifier.predict_logits(shipped, images, batch_size=3),
                               np.asarray(shipped(images)), rtol=1e-5, atol=1e-5)


def test_random_shift_moves_each_image_by_at_most_one_pixel():
    images = load_digits("val").images[:16]
    shifted = np.asarray(classifier.random_shift(images, jax.random.key(0), 1))
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-1.0)
    candidates = np.stack([padded[:, dy:dy + 16, dx:dx + 16] for dy in range(3) for dx in range(3)], 1)
    matches = np.all(candidates == shifted[:, None], axis=(2, 3, 4))  # [16, 9]
    assert np.all(matches.any(axis=1))
    assert len({int(np.argmax(row)) for row in matches}) > 1  # not all the same offset
    np.testing.assert_array_equal(np.asarray(classifier.random_shift(images, jax.random.key(0), 0)), images)


def test_config_and_quick_training_round_trip(tmp_path):
    config = load_config(CONFIG + ":quick", ["train.steps=2", "model.channels=(4, 4)", "model.feature_dim=8"])
    assert config.family == "classifier" and load_config(CONFIG).train.steps > 100
    summary = classifier.train_from_config(config, tmp_path / "ckpt")
    assert summary["steps"] == 2 and np.isfinite(summary["final_train_loss"])
    assert summary["model"] == {"channels": [4, 4], "feature_dim": 8}
    assert load_metadata(tmp_path / "ckpt")["val_accuracy"] == summary["val_accuracy"]
    restored = classifier.load_classifier(tmp_path / "ckpt")
    images = load_digits("val").images
    assert classifier.accuracy(restored, images, load_digits("val").labels) == pytest.approx(summary["val_accuracy"])


def test_epoch_batches_slice_one_stream_of_seeded_permutations():
    images, labels = np.arange(10, dtype=np.float32)[:, None], np.arange(10, dtype=np.int32)
    batches = classifier.EpochBatches(images, labels, batch_size=4, seed=3)
    # The stream the classifier trainer consumed before bitlaws.train: permutations appended when short.
    rng, order, expected = np.random.default_rng(3), np.zeros(0, np.int32), []
    for _ in range(12):
        if order.shape[0] < 4:
            order = np.concatenate([order, rng.permutation(10).astype(np.int32)])
        expected.append(order[:4])
        order = order[4:]
    for step in (5, 0, 11, 2):  # any order: a pure function of the step
        np.testing.assert_array_equal(batches.indices(step), expected[step])
        np.testing.assert_array_equal(batches(step)[1], expected[step])


@pytest.mark.slow
def test_full_config_reproduces_the_shipped_accuracy(tmp_path):
    summary = classifier.train_from_config(load_config(CONFIG), tmp_path / "ckpt")
    shipped_meta = load_metadata(classifier.SHIPPED_CHECKPOINT)
    assert summary["val_accuracy"] >= 0.97
    assert summary["num_params"] == shipped_meta["num_params"]


def test_train_from_config_rejects_other_families(tmp_path):
    config = load_config(CONFIG)
    config.family = "var"
    with pytest.raises(ValueError, match="classifier"):
        classifier.train_from_config(config, tmp_path)


def test_load_classifier_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        classifier.load_classifier(tmp_path)
    (tmp_path / "bitlaws.json").write_text('{"family": "dit"}')
    with pytest.raises(ValueError, match="not a classifier"):
        classifier.load_classifier(tmp_path)
