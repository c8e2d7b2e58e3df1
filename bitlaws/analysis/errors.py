"""``bitlaws analyze errors`` (paper Figure 2): per-step errors of a quantized run against the float run.

Both runs draw with the same key (labels, initial noise, per-step draws), so every difference comes from the
quantized network. At each step the relative error ``||q - f||_F / ||f||_F`` (over the batch) is taken twice:

* after *feature extraction*: the network's output the step uses (VAR: the guided logits of the scale; DiT: the
  guided mean prediction);
* after *representation reconstruction*: what the step rebuilds (VAR: f_hat after the sampled codes were added;
  DiT: x_{t-1}).

Each run follows its own trajectory, as in deployment, so errors accumulate over the steps. The paper's reading:
VAR's discrete reconstruction absorbs the feature error (a drawn code is either the same or not), DiT's continuous
one carries it on and grows it. `bitlaws.analysis.summary.errors_sentence` states which way it came out.
"""

from __future__ import annotations

from typing import Any

import jax

from bitlaws.analysis import noise_core
from bitlaws.analysis.subjects import Precision, Subject, finite_or_none, quantized


def run_errors(subject: Subject, precision: Precision, *, n: int = 20, seed: int = 0) -> dict[str, Any]:
    """Runs the float and the quantized network on the same draws and measures the per-step errors.

    Args:
        subject: The model and its sampler.
        precision: The quantized variant (`bitlaws.analysis.subjects.Precision`).
        n: Samples (labels cycle through the classes).
        seed: PRNG seed of the draws (shared by both runs).

    Returns:
        A JSON-ready record: ``steps`` (names), ``feature_error`` and ``representation_error`` (one float per
        step), ``image_error`` (relative) and ``image_mse`` of the final images, ``reduced_steps`` (how many steps
        end with a smaller representation error than feature error) and the run's settings.
    """
    labels = subject.labels(n)
    key = jax.random.key(seed)
    reference = subject.trajectory(labels, key)
    variant = subject.trajectory(labels, key, model=quantized(subject, precision))
    feature_error = [noise_core.relative_error(q, f) for q, f in zip(variant.features, reference.features)]
    representation_error = [noise_core.relative_error(q, f)
                            for q, f in zip(variant.representations, reference.representations)]
    reduced = sum(r < f for r, f in zip(representation_error, feature_error))
    return {
        "analysis": "errors", "model": subject.name, "family": subject.family, "source": subject.source,
        "precision": precision.name, "setting": precision.setting, "format": precision.format,
        "method": precision.method, "n": int(n), "seed": int(seed), "protocol": dict(subject.protocol),
        "step_kind": subject.step_kind, "steps": list(subject.step_names),
        "feature": subject.feature_name, "representation": subject.representation_name,
        "feature_error": [finite_or_none(e) for e in feature_error],
        "representation_error": [finite_or_none(e) for e in representation_error],
        "image_error": finite_or_none(noise_core.relative_error(variant.images, reference.images)),
        "image_mse": noise_core.mean_squared_error(variant.images, reference.images),
        "reduced_steps": int(reduced),
    }
