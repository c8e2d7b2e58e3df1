"""``bitlaws analyze activations`` (paper Figure 4, appendix B): input distributions of fc1, qkv and fc2 over time.

The inputs of the chosen layers are recorded during one float sampling pass (`bitlaws.quant.capture`, one call
per layer and step) and summarised step by step on the host, so memory stays at one step's activations however
many steps the sampler takes. Per (layer, block, step): quantiles, mean, standard deviation, absolute maximum
and the *channel outlier ratio* (largest per-channel absolute maximum over the median one). VAR's padded scale
rows are left out (only the scale's ``pn**2`` real tokens count); both CFG halves are included.

The paper's reading: VAR's activations keep a similar spread across scales (the inputs are always codebook
features), DiT's swing with the timestep, which makes static activation scales hard. `temporal_variation` gives
it one number per layer: the coefficient of variation of the per-step standard deviation.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import numpy as np
from flax import nnx

from bitlaws.analysis.subjects import LAYER_KINDS, Subject, clamp_blocks, finite_or_none
from bitlaws.quant import capture

DEFAULT_BLOCKS = (4, 14)
"""The paper's Figure 4 shows the 5th and 15th blocks (0-based 4 and 14), clamped to the model's depth."""
QUANTILES = (0.0, 0.01, 0.25, 0.5, 0.75, 0.99, 1.0)


def summarize_input(x: np.ndarray, rows: Optional[int] = None) -> dict[str, float]:
    """Statistics of one layer input ``[B, L, C]`` (first `rows` tokens only when given).

    Returns:
        ``q`` (values at `QUANTILES`), ``mean``, ``std``, ``absmax`` and ``channel_outlier_ratio``.
    """
    x = np.asarray(x, np.float64)
    if rows is not None:
        x = x[:, :rows]
    flat = x.reshape(-1, x.shape[-1])  # [N, C]
    channel_max = np.max(np.abs(flat), axis=0)  # [C]
    median = float(np.median(channel_max))
    return {
        "q": [float(v) for v in np.quantile(flat, QUANTILES)],
        "mean": float(flat.mean()), "std": float(flat.std()), "absmax": float(np.abs(flat).max()),
        "channel_outlier_ratio": finite_or_none(float(channel_max.max()) / median) if median > 0 else None,
    }


def temporal_variation(steps: Sequence[dict[str, float]]) -> Optional[float]:
    """Coefficient of variation (std / mean) of the per-step standard deviations; None with one step."""
    stds = np.array([s["std"] for s in steps], np.float64)
    if len(stds) < 2 or stds.mean() == 0:
        return None
    return float(stds.std() / stds.mean())


def run_activations(subject: Subject, *, blocks: Sequence[int] = DEFAULT_BLOCKS,
                    kinds: Sequence[str] = LAYER_KINDS, n: int = 8, seed: int = 0,
                    model: Optional[nnx.Module] = None) -> dict[str, Any]:
    """Records the inputs of `kinds` in `blocks` over one sampling pass and summarises them per step.

    Args:
        subject: The model and its sampler.
        blocks: Block indices (0-based; clamped to the depth, negative from the end).
        kinds: Layer kinds among ``fc1``, ``qkv``, ``fc2``.
        n: Samples (the network sees ``2n`` rows with CFG).
        seed: PRNG seed of the draws.
        model: The network to record (default: the float one).

    Returns:
        A JSON-ready record: ``layers`` = list of ``{kind, block, path, steps: [stats per step],
        temporal_variation}`` and the settings.
    """
    unknown = [k for k in kinds if k not in LAYER_KINDS]
    if unknown or not kinds:
        raise ValueError(f"activations: layer kinds must be among {LAYER_KINDS}, got {list(kinds)}")
    chosen_blocks = clamp_blocks(blocks, subject.depth)
    layers = [(kind, block, subject.layer_path(kind, block)) for block in chosen_blocks for kind in kinds]
    clone, sinks = capture.recording(subject.model if model is None else model, [path for _, _, path in layers])
    per_layer: dict[str, list[dict[str, float]]] = {path: [] for _, _, path in layers}

    def on_step(step: int) -> None:
        jax.effects_barrier()
        for path, sink in sinks.items():
            calls = sink.take_calls()
            if len(calls) != 1:
                raise RuntimeError(f"activations: {path} was called {len(calls)} times at step {step}, expected once")
            per_layer[path].append(summarize_input(calls[0].args[0], subject.rows[step]))

    try:
        subject.trajectory(subject.labels(n), jax.random.key(seed), model=clone, on_step=on_step)
    finally:
        jax.effects_barrier()
        capture.stop_recording(clone)
    return {
        "analysis": "activations", "model": subject.name, "family": subject.family, "source": subject.source,
        "protocol": dict(subject.protocol), "n": int(n), "seed": int(seed), "step_kind": subject.step_kind,
        "steps": list(subject.step_names), "quantiles": list(QUANTILES), "depth": subject.depth,
        "blocks_requested": [int(b) for b in blocks], "blocks": chosen_blocks,
        "layers": [{"kind": kind, "block": block, "path": path, "steps": per_layer[path],
                    "temporal_variation": temporal_variation(per_layer[path])} for kind, block, path in layers],
    }
