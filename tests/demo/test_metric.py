"""Tests for the Digits Frechet Distance and class-conditional accuracy (bitlaws.demo.metric)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from bitlaws.demo import metric
from bitlaws.demo.data import load_digits, to_uint8

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="module")
def sanity() -> dict[str, float]:
    return metric.dfd_of_data_split()


def test_data_against_itself_scores_zero_and_is_classified():
    data = load_digits("all")
    result = metric.evaluate_samples(data.images, data.labels)
    assert set(result) == {"dfd", "accuracy", "n"}
    assert result["n"] == len(data)
    assert abs(result["dfd"]) < 1e-6
    assert result["accuracy"] >= 0.97


def test_permuted_labels_give_chance_accuracy_and_same_dfd():
    data = load_digits("all")
    labels = np.random.default_rng(0).permutation(data.labels)
    result = metric.evaluate_samples(data.images, labels)
    assert abs(result["accuracy"] - 0.1) < 0.03
    assert abs(result["dfd"]) < 1e-6  # DFD ignores the labels


def test_sanity_ordering(sanity):
    floor = sanity["val_vs_all"]
    assert 0.0 < sanity["train_vs_all"] < floor  # more samples, closer to the reference
    assert sanity["blurred_val_vs_all"] > 2.0 * floor  # same images, degraded
    assert sanity["single_class_vs_all"] > 20.0 * floor  # mode collapse
    assert sanity["noise_vs_all"] > 20.0 * floor


def test_stats_are_the_penultimate_features_of_the_uint8_images():
    images = load_digits("val").images[:40]
    run = metric.classifier_features(images, batch_size=16)
    requantized = to_uint8(images).astype(np.float32) / 127.5 - 1.0
    features = np.asarray(metric.default_classifier().features(requantized), np.float64)  # [40, D]
    assert run.n == 40 and run.logits.shape == (40, 10)
    np.testing.assert_allclose(run.stats.mu, features.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(run.stats.sigma, np.cov(features, rowvar=False), rtol=1e-4, atol=1e-5)


def test_reference_stats_are_cached_copies():
    first = metric.reference_stats("val")
    first.update(np.ones((3, first.dim)))
    second = metric.reference_stats("val")
    assert second.n == len(load_digits("val"))
    assert metric.reference_stats("val").n == second.n


def test_smaller_sample_sets_and_other_references_work():
    val = load_digits("val")
    against_val = metric.evaluate_samples(val.images, val.labels, reference_split="val")
    against_all = metric.evaluate_samples(val.images, val.labels)
    assert abs(against_val["dfd"]) < 1e-6 < against_all["dfd"]


@pytest.mark.parametrize(
    "images, labels, message",
    [
        (np.zeros((4, 16, 16, 1), np.float32), np.zeros(4, np.int32), "shape"),
        (np.zeros((4, 8, 8, 3), np.float32), np.zeros(4, np.int32), "shape"),
        (np.zeros((1, 16, 16, 3), np.float32), np.zeros(1, np.int32), "at least 2"),
        (np.zeros((4, 16, 16, 3), np.uint8), np.zeros(4, np.int32), "dtype"),
        (np.full((4, 16, 16, 3), 1.5, np.float32), np.zeros(4, np.int32), r"\[-1, 1\]"),
        (np.full((4, 16, 16, 3), np.nan, np.float32), np.zeros(4, np.int32), "non-finite"),
        (np.zeros((4, 16, 16, 3), np.float32), np.zeros(3, np.int32), "labels must have shape"),
        (np.zeros((4, 16, 16, 3), np.float32), np.full(4, 10, np.int32), "labels must lie"),
        (np.zeros((4, 16, 16, 3), np.float32), np.zeros(4, np.float32), "integers"),
    ],
)
def test_evaluate_samples_rejects_bad_inputs(images, labels, message):
    with pytest.raises(ValueError, match=message):
        metric.evaluate_samples(images, labels)


def test_metric_is_named_as_the_fid_analogue():
    assert metric.METRIC_KEY == "dfd" and "Digits Frechet Distance" in metric.METRIC_NAME
    assert "FID" not in metric.METRIC_NAME
