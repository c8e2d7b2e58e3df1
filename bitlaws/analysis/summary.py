"""``analysis.md``: what the analyses' JSON files say, in sentences, against the paper's numbers.

Reads only the JSON the analyses wrote (no JAX, no models), so `bitlaws report` can link and summarise the analyses
of a sweep folder cheaply (`summary_lines`).
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Optional, Sequence, Union

import numpy as np

SUMMARY_FILE = "analysis.md"
ANALYSIS_DIR = "analysis"
"""Where `bitlaws report` looks for a sweep's analyses: ``<sweep folder>/analysis`` (``bitlaws analyze``'s default
``--out`` is ``runs/demo/analysis``)."""
PAPER_SPEARMAN = {"dit": 0.99, "var": 0.86}
PathLike = Union[str, pathlib.Path]


def errors_sentence(record: dict[str, Any]) -> str:
    """One sentence: how the representation error develops and how it compares with the feature error."""
    features = [np.nan if e is None else e for e in record["feature_error"]]
    representations = [np.nan if e is None else e for e in record["representation_error"]]
    steps, kind = len(features), record["step_kind"]
    last_ratio = representations[-1] / features[-1] if features[-1] else float("nan")
    return (f"{record['model']} {record['precision']}: the representation error goes from "
            f"{representations[0]:.3g} ({kind} {record['steps'][0]}) to {representations[-1]:.3g} "
            f"({record['steps'][-1]}) while the feature error goes from {features[0]:.3g} to {features[-1]:.3g}; the "
            f"reconstruction ends below the feature error at {record['reduced_steps']} of {steps} {kind}s "
            f"(last {kind}: representation / feature {last_ratio:.2f}); final images {_fmt(record['image_error'])} "
            f"relative")


def activations_stem(model: str) -> str:
    """File stem of a model's activations figure: ``activations_<model>`` with characters outside ``[A-Za-z0-9_-]``
    replaced by ``_`` (ported models are named by their folder)."""
    return "activations_" + "".join(c if c.isalnum() or c in "-_" else "_" for c in model)


def growth(curve: dict[str, Any], noisy_steps: int, what: str = "representation_error") -> Optional[float]:
    """Last step's `what` (``representation_error`` or ``representation_rmse``) over its value at the last noisy
    step: > 1 the clean steps grew the error, < 1 they absorbed part of it; None when it was 0 there."""
    errors = curve[what]
    start, end = errors[noisy_steps - 1], errors[-1]
    if start is None or end is None or start == 0:
        return None
    return end / start


def _load(path: pathlib.Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _fmt(value: Any, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


def _links(directory: pathlib.Path, relative_to: pathlib.Path, stems: Sequence[str]) -> str:
    links = []
    for stem in stems:
        png = directory / f"{stem}.png"
        if png.exists():
            links.append(f"[{stem}]({pathlib.Path(os.path.relpath(png, relative_to)).as_posix()})")
    return " · ".join(links)


def summary_lines(analysis_dir: PathLike, relative_to: Optional[PathLike] = None) -> list[str]:
    """Markdown sentences for every analysis JSON in `analysis_dir` (empty when there is none).

    Args:
        analysis_dir: The folder the analyses wrote.
        relative_to: Links are relative to this folder (default: `analysis_dir`).
    """
    directory = pathlib.Path(analysis_dir)
    base = pathlib.Path(relative_to) if relative_to is not None else directory
    lines: list[str] = []
    found = {name: _load(directory / f"{name}.json") for name in ("errors", "noise", "activations")}
    if found["errors"]:
        lines += ["### Errors per generation step (paper Figure 2)", "",
                  f"Figures: {_links(directory, base, ['errors'])}", ""]
        for record in found["errors"]["records"]:
            lines.append(f"* {errors_sentence(record)}.")
        lines += ["", "Paper: VAR's reconstruction reduces the feature error, DiT's carries and grows it.", ""]
    if found["noise"]:
        lines += ["### Noise on the network output (paper Figure 3)", "",
                  f"Figures: {_links(directory, base, ['noise_single_step', 'noise_accumulation'])}", ""]
        for record in found["noise"]["single_step"]:
            paper = PAPER_SPEARMAN.get(record["family"])
            exact = record["loss"][record["snr_db"].index("inf")] == 0.0 if "inf" in record["snr_db"] else None
            lines.append(f"* {record['model']}: single-step noise at {record['step_kind']} {record['step_name']}: "
                         f"Spearman(noise intensity, image loss) = {_fmt(record['spearman'])} over the batch mean, "
                         f"{_fmt(record.get('spearman_per_sample_median'))} per image (median of "
                         f"{record.get('samples_with_a_ranking', 'n/a')})"
                         + (f"; paper: {paper}" if paper is not None else "")
                         + ("; +inf dB reproduced the noise-free images exactly" if exact else
                            "; +inf dB did NOT reproduce the noise-free images" if exact is False else "") + ".")
        for record in found["noise"]["accumulation"]:
            parts = []
            for curve in record["curves"]:
                if all(e == 0 for e in curve["representation_error"]):
                    parts.append(f"{curve['snr_db']} dB: no change at any {record['step_kind']}")
                    continue
                ratio = growth(curve, record["noisy_steps"])
                rmse_ratio = growth(curve, record["noisy_steps"], "representation_rmse")
                parts.append(f"{curve['snr_db']} dB: last/noisy-step error {_fmt(ratio)} relative, "
                             f"{_fmt(rmse_ratio)} absolute, image MSE {_fmt(curve['loss'])}")
            lines.append(f"* {record['model']}: noise in the first {record['noisy_steps']} of {len(record['steps'])} "
                         f"{record['step_kind']}s — " + "; ".join(parts) + ".")
        lines += ["", "Ratios > 1: the clean steps after the noise grew the error; < 1: they absorbed part of it.",
                  ""]
    if found["activations"]:
        stems = [activations_stem(r["model"]) for r in found["activations"]["records"]]
        lines += ["### Layer inputs over time (paper Figure 4)", "", f"Figures: {_links(directory, base, stems)}", ""]
        for record in found["activations"]["records"]:
            parts = [f"{layer['kind']}@{layer['block']} {_fmt(layer['temporal_variation'], 2)}"
                     for layer in record["layers"]]
            lines.append(f"* {record['model']}: coefficient of variation of the input std over "
                         f"{record['step_kind']}s: " + ", ".join(parts) + ".")
        lines += ["", "Paper: VAR's activation spread stays steady over scales, DiT's fluctuates over timesteps.", ""]
    return lines


def write_summary(analysis_dir: PathLike) -> pathlib.Path:
    """Writes ``analysis.md`` from the JSON files present in `analysis_dir`."""
    directory = pathlib.Path(analysis_dir)
    path = directory / SUMMARY_FILE
    path.write_text("\n".join(["# Error-tolerance analyses (paper section 3.2)", "",
                               *summary_lines(directory)]) + "\n")
    return path
