"""Tests for bitlaws.eval.inception_score."""

from __future__ import annotations

import numpy as np
import pytest

from bitlaws.eval import inception_score


def _reference_is(logits: np.ndarray, splits: int) -> tuple[float, float]:
    """Direct transcription of the improved-gan procedure (probabilities, not logs)."""
    x = logits.astype(np.float64)
    e = np.exp(x - x.max(axis=1, keepdims=True))
    preds = e / e.sum(axis=1, keepdims=True)
    n = preds.shape[0]
    scores = []
    for i in range(splits):
        part = preds[i * n // splits : (i + 1) * n // splits]
        py = part.mean(axis=0, keepdims=True)
        kl = np.mean(np.sum(part * (np.log(part) - np.log(py)), axis=1))
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


@pytest.mark.parametrize("n, k, splits, scale", [(200, 10, 10, 1.0), (103, 1008, 10, 3.0), (57, 5, 4, 0.2), (9, 3, 1, 5.0)])
def test_matches_reference(n, k, splits, scale):
    rng = np.random.default_rng(n + k)
    logits = (scale * rng.standard_normal((n, k))).astype(np.float32)
    mean, std = inception_score(logits, splits=splits)
    ref_mean, ref_std = _reference_is(logits, splits)
    assert isinstance(mean, float) and isinstance(std, float)
    assert mean == pytest.approx(ref_mean, rel=1e-12)
    assert std == pytest.approx(ref_std, rel=1e-9, abs=1e-12)


def test_matches_adm_split_size_chunks():
    """n divisible by splits: improved-gan chunks == ADM's fixed split_size chunks."""
    rng = np.random.default_rng(0)
    logits = 2.0 * rng.standard_normal((120, 7))
    mean, _ = inception_score(logits, splits=10)
    split_size = 12
    scores = [_reference_is(logits[i : i + split_size], 1)[0] for i in range(0, 120, split_size)]
    assert mean == pytest.approx(float(np.mean(scores)), rel=1e-12)


def test_uniform_predictions_give_one():
    mean, std = inception_score(np.zeros((50, 1008)), splits=10)
    assert mean == pytest.approx(1.0, abs=1e-12)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_identical_predictions_give_one():
    rng = np.random.default_rng(1)
    row = rng.standard_normal(20)
    mean, _ = inception_score(np.tile(row, (40, 1)), splits=4)
    assert mean == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("k", [2, 10, 1000])
def test_confident_balanced_predictions_give_num_classes(k):
    # Each chunk holds every class equally often with near-one-hot predictions.
    splits = 5
    labels = np.tile(np.arange(k), splits)
    logits = np.zeros((labels.size, k))
    logits[np.arange(labels.size), labels] = 100.0
    mean, std = inception_score(logits, splits=splits)
    assert mean == pytest.approx(float(k), rel=1e-9)
    assert std == pytest.approx(0.0, abs=1e-9 * k)


def test_hard_one_hot_does_not_give_nan():
    # exp(-1000) underflows to 0 in float64; p*log(p) must still be finite.
    logits = np.where(np.eye(4, dtype=bool), 1000.0, 0.0)
    logits = np.tile(logits, (3, 1))
    mean, std = inception_score(logits, splits=3)
    assert mean == pytest.approx(4.0, rel=1e-12)
    assert np.isfinite(std)


def test_is_invariant_to_per_row_logit_shift():
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((30, 6))
    shifted = logits + rng.standard_normal((30, 1)) * 50
    assert inception_score(logits, 3)[0] == pytest.approx(inception_score(shifted, 3)[0], rel=1e-10)


@pytest.mark.parametrize(
    "logits, splits, match",
    [
        (np.zeros(10), 1, "2-D"),
        (np.zeros((2, 3, 4)), 1, "2-D"),
        (np.zeros((5, 3)), 10, "at least as many rows"),
        (np.zeros((5, 0)), 1, "class"),
        (np.zeros((5, 3)), 0, "splits"),
        (np.zeros((5, 3)), 2.5, "splits"),
        (np.array([[0.0, np.nan]]), 1, "non-finite"),
    ],
)
def test_validation(logits, splits, match):
    with pytest.raises(ValueError, match=match):
        inception_score(logits, splits=splits)
