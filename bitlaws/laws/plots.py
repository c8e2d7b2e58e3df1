"""Scaling plots in the style of the paper's Figure 1: metric vs MT (and vs CT), log x, one curve per precision.

Figures are drawn with matplotlib's object API on an Agg canvas (no pyplot, no display, no global backend
change), one subplot per family present (VAR and DiT side by side), observed cells as markers and the fitted
power law as a line of the same colour, and saved as PNG and SVG.
"""

from __future__ import annotations

import pathlib
import textwrap
from typing import Optional, Sequence, Union

import numpy as np

from bitlaws.laws.fit import (Cell, LawFits, RowsLike, ensure_cells, families_of, family_title, fit_all,
                              metric_label, series_of)

AXES = {"mt_bits": ("total model bits MT", "mt"), "ct_bits": ("total compute bits CT", "ct")}
_MARKERS = {16: "o", 8: "s", 6: "P", 5: "X", 4: "^", 3: "v", 2: "D"}
_LINESTYLES = {"int": "-", "fp": "--"}
_DPI = 130


def _style(cell: Cell, setting_colors: dict[str, str]) -> dict:
    """Colour and marker by setting, line style by format (fp markers hollow); W16A16 in thick black."""
    if cell.is_baseline:
        return {"color": "black", "marker": "o", "linestyle": "-", "linewidth": 2.2, "markerfacecolor": "black"}
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
               "tab:olive", "tab:cyan", "tab:gray"]
    color = setting_colors.setdefault(cell.setting, palette[len(setting_colors) % len(palette)])
    return {"color": color, "marker": _MARKERS.get(cell.w_bits, "*"), "linestyle": _LINESTYLES.get(cell.fmt, ":"),
            "linewidth": 1.4, "markerfacecolor": "none" if cell.fmt == "fp" else color}


def _draw_family(ax, cells: Sequence[Cell], family: str, x: str, fits: Optional[LawFits], metric: str) -> None:
    family_cells = [c for c in cells if c.family == family]
    family_fits = fits.families[family].by_axis(x) if fits and family in fits.families else {}
    setting_colors: dict[str, str] = {}
    for series in series_of(family_cells, family):
        members = sorted((c for c in family_cells if c.series == series), key=lambda c: c.x(x))
        style = _style(members[0], setting_colors)
        xs = np.array([c.x(x) for c in members])  # [n]
        ys = np.array([c.fid for c in members])  # [n]
        fit = family_fits.get(series)
        if fit is not None and fit.ok and fit.kind != "constant" and xs.min() < xs.max():
            grid = np.geomspace(xs.min(), xs.max(), 100)  # [100]
            ax.plot(grid, fit.predict(grid), color=style["color"], linestyle=style["linestyle"],
                    linewidth=style["linewidth"])
            label = f"{series} (α={fit.alpha:.2f})"
        else:
            ax.plot(xs, ys, color=style["color"], linestyle=style["linestyle"], linewidth=style["linewidth"])
            label = series
        ax.plot(xs, ys, color=style["color"], marker=style["marker"], markerfacecolor=style["markerfacecolor"],
                linestyle="none", markersize=6, label=label)
    ax.set_xscale("log")
    ax.set_xlabel(f"{AXES[x][0]} (bits, log scale)")
    ax.set_ylabel(textwrap.fill(f"{metric} (lower is better)", 40))
    ax.set_title(f"{family_title(family)}: {metric} vs {AXES[x][0].split()[-1]}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")


def plot_axis(cells: Sequence[Cell], out_dir: pathlib.Path, x: str, fits: Optional[LawFits]) -> list[pathlib.Path]:
    """One figure (a subplot per family) of the metric vs axis `x`, saved as PNG and SVG; returns the paths."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
    from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

    families = families_of(cells)
    metric = metric_label(cells)
    figure = Figure(figsize=(6.0 * max(len(families), 1), 4.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, max(len(families), 1), squeeze=False)[0]
    for ax, family in zip(axes, families):
        _draw_family(ax, cells, family, x, fits, metric)
    figure.suptitle(f"{metric} vs {AXES[x][0]}: one curve per precision (points: cells, lines: fitted power laws)",
                    fontsize=10)
    stem = out_dir / f"scaling_{AXES[x][1]}"
    paths = []
    for suffix in (".png", ".svg"):
        path = stem.with_suffix(suffix)
        figure.savefig(path, dpi=_DPI)
        paths.append(path)
    return paths


def plot_scaling(rows: Union[RowsLike, Sequence[Cell]], out_dir: Union[str, pathlib.Path],
                 fits: Optional[LawFits] = None) -> list[pathlib.Path]:
    """Draws ``scaling_mt.{png,svg}`` and ``scaling_ct.{png,svg}`` into `out_dir` (created if needed).

    Args:
        rows: Cells, rows or a results path.
        out_dir: Output directory.
        fits: Precomputed fits (`fit_all`); fitted without bootstrap when None.

    Returns:
        The four written paths.

    Raises:
        ValueError: No usable cells.
    """
    cells = ensure_cells(rows)
    if not cells:
        raise ValueError("no usable cells to plot (every row lacks a finite fid / mt_bits / ct_bits)")
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fits = fits if fits is not None else fit_all(cells, n_boot=0)
    return [path for x in AXES for path in plot_axis(cells, out_dir, x, fits)]
