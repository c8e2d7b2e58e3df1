"""How sure the study is: per-cell intervals and paired precision-vs-float differences, for the report.

Per cell: the record's ``fid_interval`` (``{"lo", "hi", "se", "level", "groups"}``, a jackknife interval over
the cell's samples against fixed reference statistics, written by evaluators that keep their features, e.g. the
demo's; see `bitlaws.eval.intervals`).

Paired: a quantized cell and the float (W16A16) cell of the same model and seed drew their samples from the
same noise and labels, so their sampling noise is largely shared. When both records name a ``features_file``
and a ``features_reference`` (``.npz`` with the reference ``mu`` and ``sigma``), both relative to the results
folder, the difference ``metric(quantized) - metric(float)`` gets a paired jackknife interval: the same group of
samples left out of both sets. A features file is an ``.npy`` of the ``[N, d]`` features, or an ``.npz`` with
``features`` and, optionally, ``replicates`` (the ``[G]`` leave-one-group-out distances of
`jackknife_replicates`): when both cells stored theirs with the same G and N, the paired replicates are their
difference and nothing is recomputed. A cell is **worse** than float when that interval lies above 0,
**better** when below, and **not resolved** when it contains 0 — the one-seed point values of such cells do not
order them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
from typing import Optional, Sequence

import numpy as np

from bitlaws.eval.intervals import (DEFAULT_GROUPS, FrechetReference, Interval, interval_from_replicates,
                                   paired_difference_interval)
from bitlaws.laws.fit import BASELINE_SETTING, Cell, families_of, family_title

WORSE, BETTER, UNRESOLVED = "worse", "better", "not resolved"


@dataclasses.dataclass(frozen=True)
class PairedDifference:
    """A quantized cell against the float cell of its model and seed.

    Attributes:
        cell: The quantized cell.
        baseline: The float cell.
        interval: ``metric(cell) - metric(baseline)`` with its paired jackknife interval.
        verdict: `WORSE`, `BETTER` or `UNRESOLVED`.
    """

    cell: Cell
    baseline: Cell
    interval: Interval
    verdict: str


def cell_interval(cell: Cell) -> Optional[tuple[float, float, float]]:
    """The record's ``fid_interval`` as ``(lo, hi, level)`` (level 0.95 when unstated), or None when absent or
    malformed."""
    raw = cell.raw.get("fid_interval")
    if not isinstance(raw, dict):
        return None
    lo, hi, level = raw.get("lo"), raw.get("hi"), raw.get("level", 0.95)
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (lo, hi, level)):
        return None
    return float(lo), float(hi), float(level)


def _seed(cell: Cell) -> object:
    return cell.raw.get("seed", 0)


def _verdict(interval: Interval) -> str:
    if not interval.excludes(0.0):
        return UNRESOLVED
    return WORSE if interval.lo > 0 else BETTER


def paired_differences(cells: Sequence[Cell], root: pathlib.Path, *,
                       groups: int = DEFAULT_GROUPS) -> list[PairedDifference]:
    """Paired differences of every quantized cell whose features and float partner's features exist.

    Args:
        cells: The sweep's cells.
        root: Folder the records' ``features_file`` / ``features_reference`` paths are relative to.
        groups: Jackknife groups when pairs are computed from features (stored replicates are used as they are).

    Returns:
        One `PairedDifference` per quantized cell that could be paired (others are left out).
    """
    references: dict[str, Optional[FrechetReference]] = {}

    @functools.lru_cache(maxsize=None)
    def load(path: pathlib.Path) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
        try:  # an unreadable file leaves its cell unpaired, like a missing one
            if path.suffix == ".npz":
                with np.load(path) as arrays:
                    return arrays["features"], (arrays["replicates"] if "replicates" in arrays else None)
            return np.load(path), None
        except (OSError, ValueError, KeyError):
            return None, None

    def features(cell: Cell) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
        name = cell.raw.get("features_file")
        path = root / str(name) if name else None
        return load(path) if path is not None and path.is_file() else (None, None)

    def reference(cell: Cell) -> Optional[FrechetReference]:
        name = cell.raw.get("features_reference")
        if not name or not (root / str(name)).is_file():
            return None
        if name not in references:
            try:
                with np.load(root / str(name)) as stats:
                    references[name] = FrechetReference.from_stats(stats["mu"], stats["sigma"])
            except (OSError, ValueError, KeyError):
                references[name] = None
        return references[name]

    baselines = {(c.model, _seed(c)): c for c in cells if c.is_baseline}
    out = []
    for cell in cells:
        base = baselines.get((cell.model, _seed(cell)))
        if cell.is_baseline or base is None or cell.raw.get("features_reference") != base.raw.get("features_reference"):
            continue
        ref, (mine, mine_jack), (theirs, their_jack) = reference(cell), features(cell), features(base)
        if ref is None or mine is None or theirs is None or mine.shape != theirs.shape:
            continue
        if mine_jack is not None and their_jack is not None and mine_jack.shape == their_jack.shape:
            interval = interval_from_replicates(cell.fid - base.fid, mine_jack - their_jack)  # same groups left out
        else:
            interval = paired_difference_interval(mine, theirs, ref.mu, ref.sigma,
                                                  groups=min(groups, mine.shape[0]), reference=ref)
        out.append(PairedDifference(cell, base, interval, _verdict(interval)))
    return out


def uncertainty_section(cells: Sequence[Cell], root: Optional[pathlib.Path], metric: str, *,
                        groups: int = DEFAULT_GROUPS) -> list[str]:
    """Markdown lines: paired differences per family (empty when no cell carries intervals or features)."""
    if root is None or not any(cell_interval(c) for c in cells):
        return []
    pairs = paired_differences(cells, root, groups=groups)
    if not pairs:
        return []
    level = pairs[0].interval.level
    lines = ["## How sure: paired differences to float", "",
             f"Every quantized cell against the {BASELINE_SETTING} cell of the same model and seed (same noise and "
             f"labels): Δ = {metric}(cell) − {metric}({BASELINE_SETTING}) with a {level:.0%} paired jackknife "
             f"interval over the samples ({pairs[0].interval.groups} groups, reference statistics fixed). "
             f"**{WORSE}** / **{BETTER}**: the interval excludes 0; **{UNRESOLVED}**: it contains 0, so this run "
             f"cannot order the two. Per-cell intervals (unpaired, much wider: most sampling noise is shared "
             "between paired cells) are in the table of all cells.", ""]
    for family in families_of(cells):
        mine = sorted((p for p in pairs if p.cell.family == family),
                      key=lambda p: (p.cell.params, p.cell.series, p.cell.method, str(_seed(p.cell))))
        if not mine:
            continue
        counts = {v: sum(p.verdict == v for p in mine) for v in (WORSE, UNRESOLVED, BETTER)}
        lines += [f"### {family_title(family)}", "",
                  f"{counts[WORSE]} of {len(mine)} quantized cells are worse than float, {counts[BETTER]} better, "
                  f"{counts[UNRESOLVED]} not resolved.", "",
                  "| model | precision | method | seed | Δ | interval | verdict |",
                  "|---|---|---|---|---|---|---|"]
        for p in mine:
            i = p.interval
            lines.append(f"| {p.cell.model} | {p.cell.series} | {p.cell.method} | {_seed(p.cell)} | "
                         f"{i.estimate:+.3g} | [{i.lo:+.3g}, {i.hi:+.3g}] | {p.verdict} |")
        lines.append("")
    return lines
