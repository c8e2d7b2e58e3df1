"""Digits Frechet Distance (DFD): the demo's analogue of FID, plus class-conditional accuracy.

DFD is computed by exactly the code path of the real FID, with the shipped digits classifier
(`bitlaws.demo.classifier`) in place of Inception:

1. images are converted to uint8 (as samples are stored for FID) and fed to
   `bitlaws.eval.accumulate_features`, which runs the feature network jit-compiled with the batch sharded
   over a ``'data'`` device mesh and accumulates float64 running statistics (`bitlaws.eval.FeatureStats`);
2. the feature network maps uint8 -> [-1, 1] and returns the classifier's penultimate features ``[B, D]``
   together with its logits (one pass; the logits give the accuracy);
3. `bitlaws.eval.frechet_distance` compares the samples' mean/covariance with the reference statistics of
   the digits data.

Because the feature net is a 64-dimensional digits classifier, DFD values are not comparable with FID
values; only DFDs of the same classifier and reference are comparable with each other. Like FID, DFD is
biased upwards for few samples: compare sample sets of equal size (held-out real digits score about 18 at
N = 360, a random 360 of the reference itself about 10, see `dfd_of_data_split`).
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bitlaws.demo.classifier import DigitsClassifier, load_classifier
from bitlaws.demo.data import IMAGE_SIZE, NUM_CLASSES, load_digits, to_uint8
from bitlaws.eval import FeatureStats, accumulate_features, frechet_distance
from bitlaws.eval.intervals import FrechetReference, interval_from_replicates, jackknife_replicates
from bitlaws.eval.sharded import FeatureRun

METRIC_NAME = "Digits Frechet Distance (DFD)"
METRIC_KEY = "dfd"
DEFAULT_BATCH_SIZE = 256
RANGE_TOLERANCE = 1e-3  # samples may exceed [-1, 1] by this much (round-off); more is an error


@functools.lru_cache(maxsize=1)
def default_classifier() -> DigitsClassifier:
    """The shipped classifier, loaded once per process."""
    return load_classifier()


def _feature_fn(graphdef: nnx.GraphDef):
    """``fn(state, images uint8 [B, H, W, 3]) -> (features [B, D] float32, logits [B, 10] float32)``."""

    def fn(state: nnx.State, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        net = nnx.merge(graphdef, state)
        scaled = images.astype(jnp.float32) / 127.5 - 1.0  # [B, H, W, 3] in [-1, 1]
        features = net.features(scaled)
        return features, net.logits_from_features(features)

    return fn


def classifier_features(images: np.ndarray, *, classifier: Optional[DigitsClassifier] = None,
                        batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = False,
                        keep_features: bool = False) -> FeatureRun:
    """Runs the classifier feature net over images through `accumulate_features` (the FID code path).

    Args:
        images: ``[N, 16, 16, 3]`` float in [-1, 1] (validated by `validate_images`).
        classifier: Feature network; default the shipped one.
        batch_size: Images per jitted step.
        progress: Show a progress bar.
        keep_features: Also return the ``[N, D]`` features (`FeatureRun.features`).

    Returns:
        The `FeatureRun`: float64 ``stats`` of the ``[N, D]`` features and ``logits`` ``[N, 10]``.
    """
    validate_images(images)
    net = default_classifier() if classifier is None else classifier
    graphdef, state = nnx.split(net)
    return accumulate_features(_feature_fn(graphdef), to_uint8(images), batch_size=batch_size,
                               params=state, progress=progress, keep_features=keep_features)


@functools.lru_cache(maxsize=None)
def _cached_reference_stats(split: str) -> FeatureStats:
    return classifier_features(load_digits(split).images).stats


@functools.lru_cache(maxsize=None)
def _cached_frechet_reference(split: str) -> FrechetReference:
    stats = _cached_reference_stats(split)
    return FrechetReference.from_stats(stats.mu, stats.sigma)


def reference_stats(split: str = "all", classifier: Optional[DigitsClassifier] = None) -> FeatureStats:
    """Feature statistics of the digits data (cached per split for the shipped classifier).

    Args:
        split: ``all``, ``train`` or ``val`` (see `bitlaws.demo.data.load_digits`).
        classifier: Feature network; default the shipped one.

    Returns:
        A fresh `FeatureStats` (a copy: callers may update it).
    """
    if classifier is None:
        return _cached_reference_stats(split).copy()
    return classifier_features(load_digits(split).images, classifier=classifier).stats


def dfd(stats: FeatureStats, reference: FeatureStats) -> float:
    """The Digits Frechet Distance between two feature statistics (`frechet_distance`, as for FID)."""
    return frechet_distance(stats.mu, stats.sigma, reference.mu, reference.sigma)


def validate_images(images: Any) -> None:
    """Checks that `images` are demo images: ``[N >= 2, 16, 16, 3]`` finite floats in [-1, 1].

    Raises:
        ValueError: naming the problem (shape, dtype, non-finite values or range).
    """
    shape = getattr(images, "shape", None)
    expected = f"[N, {IMAGE_SIZE}, {IMAGE_SIZE}, 3] float in [-1, 1]"
    if shape is None or len(shape) != 4 or tuple(shape[1:]) != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f"images must be {expected}, got shape {shape}")
    if shape[0] < 2:
        raise ValueError(f"the {METRIC_NAME} needs at least 2 images (a covariance), got {shape[0]}")
    if not np.issubdtype(np.asarray(images).dtype, np.floating):
        raise ValueError(f"images must be {expected}, got dtype {np.asarray(images).dtype}")
    values = np.asarray(images)
    if not np.all(np.isfinite(values)):
        raise ValueError(f"images contain {int(np.sum(~np.isfinite(values)))} non-finite values")
    low, high = float(values.min()), float(values.max())
    if low < -1.0 - RANGE_TOLERANCE or high > 1.0 + RANGE_TOLERANCE:
        raise ValueError(f"images must lie in [-1, 1] (clip samples first), got values in [{low:.4g}, {high:.4g}]")


def _validate_labels(labels: Any, n: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape [{n}] (one per image), got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"labels must lie in [0, {NUM_CLASSES}), got [{labels.min()}, {labels.max()}]")
    return labels


def evaluate_samples(images: np.ndarray, labels: np.ndarray, *, reference_split: str = "all",
                     classifier: Optional[DigitsClassifier] = None, batch_size: int = DEFAULT_BATCH_SIZE,
                     progress: bool = False, groups: int = 0) -> dict[str, Any]:
    """DFD of class-conditional samples against the digits data, and the classifier's accuracy on them.

    Args:
        images: ``[N, 16, 16, 3]`` float in [-1, 1], N >= 2.
        labels: ``[N]`` integer conditioning labels in [0, 10).
        reference_split: Data split whose statistics are the reference (``all`` by default).
        classifier: Feature network; default the shipped one.
        batch_size: Images per jitted step.
        progress: Show a progress bar.
        groups: Jackknife groups for a 95 % interval of the DFD (0: none; `bitlaws.eval.intervals`,
            reference statistics fixed).

    Returns:
        ``{"dfd": float, "accuracy": float (fraction classified as their label), "n": int}``, and with
        ``groups`` also ``"interval"`` (a `bitlaws.eval.intervals.Interval`), ``"replicates"`` (the
        ``[groups]`` leave-one-group-out DFDs, `bitlaws.eval.intervals.jackknife_replicates`) and ``"features"``
        (``[N, D]`` float32): what paired comparisons between cells need.

    Raises:
        ValueError: on malformed images or labels (see `validate_images`).
    """
    validate_images(images)
    labels = _validate_labels(labels, int(images.shape[0]))
    run = classifier_features(images, classifier=classifier, batch_size=batch_size, progress=progress,
                              keep_features=groups > 0)
    reference = reference_stats(reference_split, classifier)
    predictions = run.logits.argmax(axis=-1)  # [N]
    out = {METRIC_KEY: dfd(run.stats, reference), "accuracy": float(np.mean(predictions == labels)),
           "n": int(run.n)}
    if groups > 0:
        prepared = (_cached_frechet_reference(reference_split) if classifier is None
                    else FrechetReference.from_stats(reference.mu, reference.sigma))
        replicates = jackknife_replicates(run.features, prepared, groups=groups)
        out["interval"] = interval_from_replicates(out[METRIC_KEY], replicates)
        out["replicates"] = replicates
        out["features"] = np.asarray(run.features, np.float32)
    return out


def box_blur(images: np.ndarray, radius: int = 1) -> np.ndarray:
    """Mean filter of side ``2 * radius + 1`` with edge padding: ``[N, H, W, C] -> [N, H, W, C]``."""
    width = 2 * radius + 1
    padded = np.pad(images, ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode="edge")
    h, w = images.shape[1:3]
    total = sum(padded[:, dy:dy + h, dx:dx + w] for dy in range(width) for dx in range(width))
    return (total / width ** 2).astype(np.float32)


def dfd_of_data_split(seed: int = 0) -> dict[str, float]:
    """Sanity values of the DFD against the statistics of all digits.

    Returns:
        ``val_vs_all`` (held-out real digits: the floor for ~360 samples), ``train_vs_all``,
        ``blurred_val_vs_all`` (3x3 box blur), ``single_class_vs_all`` (only the val zeros: mode collapse)
        and ``noise_vs_all`` (360 Gaussian-noise images clipped to [-1, 1]).
    """
    val = load_digits("val")
    reference = reference_stats("all")
    noise = np.clip(np.random.default_rng(seed).normal(size=val.images.shape), -1.0, 1.0).astype(np.float32)
    sets = {
        "val_vs_all": val.images,
        "train_vs_all": load_digits("train").images,
        "blurred_val_vs_all": box_blur(val.images),
        "single_class_vs_all": val.images[val.labels == 0],
        "noise_vs_all": noise,
    }
    return {name: dfd(classifier_features(images).stats, reference) for name, images in sets.items()}
