"""Figures of the error analyses (matplotlib object API on an Agg canvas, saved as PNG and SVG).

One subplot per analysed model, side by side (e.g. VAR and DiT as in the paper's Figures 2-4); every function
takes the JSON records the analyses write, so figures can be redrawn from ``*.json`` alone.
"""

from __future__ import annotations

import math
import pathlib
from typing import Any, Sequence

from bitlaws.analysis.summary import activations_stem

_DPI = 130


def _figure(columns: int, rows: int = 1, width: float = 5.2, height: float = 3.8):
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
    from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

    figure = Figure(figsize=(width * max(columns, 1), height * max(rows, 1)), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.subplots(max(rows, 1), max(columns, 1), squeeze=False)


def _save(figure, out_dir: pathlib.Path, stem: str) -> list[pathlib.Path]:
    paths = []
    for suffix in (".png", ".svg"):
        path = out_dir / f"{stem}{suffix}"
        figure.savefig(path, dpi=_DPI)
        paths.append(path)
    return paths


def _values(values: Sequence[Any]) -> list[float]:
    return [math.nan if v is None else float(v) for v in values]


def _tick_labels(ax, names: Sequence[str], max_ticks: int = 10) -> None:
    stride = max(1, math.ceil(len(names) / max_ticks))
    positions = list(range(0, len(names), stride))
    ax.set_xticks(positions)
    ax.set_xticklabels([names[i] for i in positions], rotation=45 if len(names) > max_ticks else 0, fontsize=7)


def plot_errors(records: Sequence[dict[str, Any]], out_dir: pathlib.Path) -> list[pathlib.Path]:
    """``errors.{png,svg}``: per step, relative error after feature extraction and after reconstruction."""
    figure, axes = _figure(len(records))
    for ax, record in zip(axes[0], records):
        steps = list(range(len(record["steps"])))
        ax.plot(steps, _values(record["feature_error"]), "o-", label=f"after feature extraction ({record['feature']})")
        ax.plot(steps, _values(record["representation_error"]), "s-",
                label=f"after reconstruction ({record['representation']})")
        _tick_labels(ax, record["steps"])
        ax.set_xlabel(record["step_kind"])
        ax.set_ylabel("relative error vs float run")
        ax.set_title(f"{record['model']} {record['precision']}", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    figure.suptitle("Quantization error per generation step (same draws as the float run)", fontsize=10)
    return _save(figure, out_dir, "errors")


def plot_noise(single: Sequence[dict[str, Any]], accumulated: Sequence[dict[str, Any]],
               out_dir: pathlib.Path) -> list[pathlib.Path]:
    """``noise_single_step.{png,svg}`` (loss vs SNR) and ``noise_accumulation.{png,svg}`` (error per step)."""
    paths = []
    if single:
        figure, axes = _figure(len(single))
        for ax, record in zip(axes[0], single):
            pairs = [(float(s), loss) for s, loss in zip(record["snr_db"], record["loss"]) if s != "inf"]
            ax.plot([s for s, _ in pairs], [loss for _, loss in pairs], "o-")
            ax.set_xlabel(f"SNR (dB) of the noise at {record['step_kind']} {record['step_name']}")
            ax.set_ylabel("final-image MSE vs noise-free run")
            rho = record["spearman"]
            per_sample = record.get("spearman_per_sample_median")
            ax.set_title(f"{record['model']}: Spearman {'n/a' if rho is None else f'{rho:.2f}'} (batch), "
                         f"{'n/a' if per_sample is None else f'{per_sample:.2f}'} (median per image)", fontsize=9)
            ax.invert_xaxis()
            ax.grid(True, alpha=0.3)
        figure.suptitle("Single-step noise on the network output (lower SNR = more noise)", fontsize=10)
        paths += _save(figure, out_dir, "noise_single_step")
    if accumulated:
        figure, axes = _figure(len(accumulated))
        for ax, record in zip(axes[0], accumulated):
            steps = list(range(len(record["steps"])))
            for curve in record["curves"]:
                ax.plot(steps, _values(curve["representation_error"]), "o-", markersize=3,
                        label=f"{curve['snr_db']} dB")
            ax.axvspan(-0.5, record["noisy_steps"] - 0.5, color="grey", alpha=0.15, label="noisy steps")
            _tick_labels(ax, record["steps"])
            ax.set_xlabel(record["step_kind"])
            ax.set_ylabel(f"relative error of {record['representation']}")
            ax.set_title(f"{record['model']}: noise in the first {record['noisy_steps']} of {len(steps)} steps",
                         fontsize=9)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        figure.suptitle("Error accumulation after noise in the first 10% of the steps", fontsize=10)
        paths += _save(figure, out_dir, "noise_accumulation")
    return paths


def plot_activations(record: dict[str, Any], out_dir: pathlib.Path) -> list[pathlib.Path]:
    """``activations_<model>.{png,svg}``: box plots over the steps, a row per block and a column per layer.

    Boxes span the 25-75 % quantiles, whiskers 1-99 %, dots the minimum and maximum.
    """
    blocks = sorted({layer["block"] for layer in record["layers"]})
    kinds = list(dict.fromkeys(layer["kind"] for layer in record["layers"]))
    figure, axes = _figure(len(kinds), len(blocks), width=4.6, height=3.0)
    names = record["steps"]
    stride = max(1, math.ceil(len(names) / 25))  # at most ~25 boxes per panel
    shown = list(range(0, len(names), stride))
    for layer in record["layers"]:
        ax = axes[blocks.index(layer["block"])][kinds.index(layer["kind"])]
        stats = [layer["steps"][i] for i in shown]
        boxes = [{"med": s["q"][3], "q1": s["q"][2], "q3": s["q"][4], "whislo": s["q"][1], "whishi": s["q"][5],
                  "fliers": [], "label": names[i]} for s, i in zip(stats, shown)]
        ax.bxp(boxes, showfliers=False)
        positions = range(1, len(shown) + 1)
        ax.plot(positions, [s["q"][0] for s in stats], ".", color="grey", markersize=3)
        ax.plot(positions, [s["q"][-1] for s in stats], ".", color="grey", markersize=3)
        ax.tick_params(axis="x", labelsize=6, rotation=90 if len(shown) > 8 else 0)
        variation = layer["temporal_variation"]
        ax.set_title(f"block {layer['block']} {layer['kind']} input "
                     f"(CV of std over {record['step_kind']}s {'n/a' if variation is None else f'{variation:.2f}'})",
                     fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    figure.suptitle(f"{record['model']}: layer inputs over {record['step_kind']}s (boxes 25-75%, whiskers 1-99%, "
                    f"dots min/max)", fontsize=10)
    return _save(figure, out_dir, activations_stem(record["model"]))
