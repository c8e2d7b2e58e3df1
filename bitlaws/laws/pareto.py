"""Which precision wins: budgets, Pareto frontiers, and the paper's lower-left comparison against W16A16.

The paper's finding (its Figure 1): VAR's quantized curves lie lower-left of its W16A16 curve (at equal model
bits, quantized models are better), DiT's do not. `family_verdict` checks that claim on the data: for each
quantized series, the fitted curves of the series and of W16A16 are compared on the MT range both cover, and
the fraction of that (log-spaced) range where the quantized curve predicts the lower metric is its score.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Optional, Sequence, Union

import numpy as np

from bitlaws.laws.fit import (BASELINE_SETTING, Cell, LawFits, PowerLawFit, RowsLike, ensure_cells, families_of,
                              family_title, fit_all)

# Claim of the paper per family: True = "quantized curves lie lower-left of W16A16", False = "they do not".
PAPER_CLAIMS: Mapping[str, bool] = {"var": True, "dit": False}
LOWER_LEFT_FRACTION = 2.0 / 3.0  # a series is lower-left when its curve is lower on ≥ 2/3 of the shared range
UPPER_RIGHT_FRACTION = 1.0 / 3.0  # ... and upper-right when on ≤ 1/3
_GRID_POINTS = 200


@dataclasses.dataclass(frozen=True)
class BudgetChoice:
    """The best option under one budget.

    Attributes:
        budget_bits: The budget (bits on the chosen axis).
        series: Winning precision series.
        model: The largest trained model of that series within the budget.
        x_bits: Bits the choice uses (observed: the cell's; fitted: where the curve was evaluated).
        fid: Observed or predicted metric.
        source: ``'observed'`` or ``'fitted'``.
    """

    budget_bits: float
    series: str
    model: str
    x_bits: float
    fid: float
    source: str


@dataclasses.dataclass(frozen=True)
class BudgetRow:
    """Observed and fitted winners for one budget (None when nothing fits)."""

    budget_bits: float
    observed: Optional[BudgetChoice]
    fitted: Optional[BudgetChoice]


def budget_grid(cells: Sequence[Cell], family: str, x: str = "mt_bits", n: int = 8) -> np.ndarray:
    """``[n]`` log-spaced budgets from the family's smallest to its largest cell on axis `x`."""
    values = [c.x(x) for c in cells if c.family == family]
    if not values:
        return np.zeros((0,))
    return np.geomspace(min(values), max(values), n)


def pareto_frontier(rows: Union[RowsLike, Sequence[Cell]], family: str, x: str = "mt_bits") -> list[Cell]:
    """Observed cells of `family` no other cell beats on both bits (`x`) and metric, sorted by bits."""
    cells = sorted((c for c in ensure_cells(rows) if c.family == family), key=lambda c: (c.x(x), c.fid))
    frontier, best = [], math.inf
    for cell in cells:
        if cell.fid < best:
            frontier.append(cell)
            best = cell.fid
    return frontier


def _largest_within(cells: Sequence[Cell], budget: float, x: str) -> Optional[Cell]:
    within = [c for c in cells if c.x(x) <= budget]
    return max(within, key=lambda c: c.x(x)) if within else None


def best_under_budget(rows: Union[RowsLike, Sequence[Cell]], family: str, budgets: Sequence[float],
                      x: str = "mt_bits", fits: Optional[Mapping[str, PowerLawFit]] = None) -> list[BudgetRow]:
    """For each budget: the lowest observed cell within it, and the lowest fitted-curve prediction.

    The fitted choice evaluates each series' curve at ``min(budget, its largest trained x)`` — no
    extrapolation beyond the trained sizes — for every series whose smallest cell fits the budget.

    Args:
        rows: Cells, rows or a results path.
        family: The family.
        budgets: Budgets in bits on axis `x`.
        x: ``'mt_bits'`` or ``'ct_bits'``.
        fits: ``{series: PowerLawFit}`` on axis `x`; without it only observed choices are made.
    """
    cells = [c for c in ensure_cells(rows) if c.family == family]
    by_series: dict[str, list[Cell]] = {}
    for cell in cells:
        by_series.setdefault(cell.series, []).append(cell)
    table = []
    for budget in budgets:
        within = [c for c in cells if c.x(x) <= budget]
        observed = None
        if within:
            best = min(within, key=lambda c: c.fid)
            observed = BudgetChoice(float(budget), best.series, best.model, best.x(x), best.fid, "observed")
        fitted = None
        for series, members in (by_series.items() if fits else ()):
            fit = fits.get(series)
            largest = _largest_within(members, budget, x)
            if fit is None or not fit.ok or largest is None:
                continue
            x_eval = min(float(budget), max(c.x(x) for c in members))
            predicted = float(fit.predict(x_eval))
            if math.isfinite(predicted) and (fitted is None or predicted < fitted.fid):
                fitted = BudgetChoice(float(budget), series, largest.model, x_eval, predicted, "fitted")
        table.append(BudgetRow(float(budget), observed, fitted))
    return table


@dataclasses.dataclass(frozen=True)
class SeriesComparison:
    """One quantized series against the W16A16 curve.

    Attributes:
        series: The quantized series.
        overlap: (low, high) bits both curves cover; NaN when they do not overlap.
        frac_lower: Fraction of the log-spaced overlap where the series predicts a lower metric (NaN if none).
        mean_log_ratio: Mean of ``log(series / baseline)`` over the overlap (negative = series lower).
        position: ``'lower-left'``, ``'upper-right'``, ``'crossing'``, ``'no overlap'`` or ``'no fit'``.
    """

    series: str
    overlap: tuple[float, float]
    frac_lower: float
    mean_log_ratio: float
    position: str

    @property
    def compared(self) -> bool:
        return self.position in ("lower-left", "upper-right", "crossing")


def _baseline_series(fits: Mapping[str, PowerLawFit]) -> Optional[str]:
    candidates = [s for s in fits if s.split("-", 1)[0] == BASELINE_SETTING]
    return sorted(candidates, key=len)[0] if candidates else None


def compare_to_baseline(fits: Mapping[str, PowerLawFit], baseline: Optional[str] = None) -> list[SeriesComparison]:
    """Compares every quantized (non-W16A16) series' fitted curve with the baseline's on their shared x range.

    Args:
        fits: ``{series: PowerLawFit}`` of one family on one axis (each fit carries its `x_range`).
        baseline: The baseline series (default: the ``W16A16`` one).

    Returns:
        One `SeriesComparison` per non-baseline series; empty when there is no baseline fit.
    """
    baseline = baseline or _baseline_series(fits)
    if baseline is None or baseline not in fits:
        return []
    base = fits[baseline]
    comparisons = []
    for series, fit in fits.items():
        if series.split("-", 1)[0] == BASELINE_SETTING:
            continue
        if not (fit.ok and base.ok) or fit.kind == "constant" or base.kind == "constant":
            comparisons.append(SeriesComparison(series, (math.nan, math.nan), math.nan, math.nan, "no fit"))
            continue
        low, high = max(fit.x_range[0], base.x_range[0]), min(fit.x_range[1], base.x_range[1])
        if not low < high:
            comparisons.append(SeriesComparison(series, (math.nan, math.nan), math.nan, math.nan, "no overlap"))
            continue
        grid = np.geomspace(low, high, _GRID_POINTS)  # [G]
        ours, theirs = fit.predict(grid), base.predict(grid)  # [G], [G]
        frac = float(np.mean(ours < theirs))
        mean_log_ratio = float(np.mean(np.log(ours / theirs)))
        if frac >= LOWER_LEFT_FRACTION:
            position = "lower-left"
        elif frac <= UPPER_RIGHT_FRACTION:
            position = "upper-right"
        else:
            position = "crossing"
        comparisons.append(SeriesComparison(series, (float(low), float(high)), frac, mean_log_ratio, position))
    return comparisons


@dataclasses.dataclass(frozen=True)
class Verdict:
    """Whether the paper's claim about one family holds on the data.

    Attributes:
        family: The family.
        claim: The paper's claim in words (None when the paper makes none for this family).
        share_lower_left: Share of compared quantized series lying lower-left (crossing counts half); NaN if none.
        verdict: ``'holds'``, ``'does not hold'``, ``'mixed'``, ``'inconclusive'`` (nothing comparable) or
            ``'no claim'``.
        comparisons: The per-series comparisons it rests on.
        explanation: One sentence with the numbers.
    """

    family: str
    claim: Optional[str]
    share_lower_left: float
    verdict: str
    comparisons: tuple[SeriesComparison, ...]
    explanation: str


def _claim_text(family: str) -> Optional[str]:
    if family not in PAPER_CLAIMS:
        return None
    negation = "" if PAPER_CLAIMS[family] else "do not "
    return f"{family_title(family)}'s quantized curves {negation}lie lower-left of its {BASELINE_SETTING} curve"


def family_verdict(family: str, comparisons: Sequence[SeriesComparison], axis_name: str = "MT") -> Verdict:
    """Decides the paper's claim for `family` from its per-series comparisons.

    The share s of compared quantized series lying lower-left (crossing = ½) decides: for a "lie lower-left"
    claim it holds when s ≥ 2/3, does not hold when s ≤ 1/3 and is mixed in between; for a "do not" claim
    the other way round.
    """
    compared = [c for c in comparisons if c.compared]
    counts = {p: sum(c.position == p for c in compared) for p in ("lower-left", "crossing", "upper-right")}
    claim = _claim_text(family)
    if not compared:
        skipped = ", ".join(f"{c.series} ({c.position})" for c in comparisons) or "no quantized series"
        return Verdict(family, claim, math.nan, "inconclusive" if claim else "no claim", tuple(comparisons),
                       f"no quantized curve could be compared with {BASELINE_SETTING} on {axis_name}: {skipped}")
    share = (counts["lower-left"] + 0.5 * counts["crossing"]) / len(compared)
    if claim is None:
        verdict = "no claim"
    else:
        lower_left_claim = PAPER_CLAIMS[family]
        if share >= LOWER_LEFT_FRACTION:
            verdict = "holds" if lower_left_claim else "does not hold"
        elif share <= UPPER_RIGHT_FRACTION:
            verdict = "does not hold" if lower_left_claim else "holds"
        else:
            verdict = "mixed"
    not_compared = len(comparisons) - len(compared)
    explanation = (f"on {axis_name}, {counts['lower-left']} of {len(compared)} compared quantized curves lie "
                   f"lower-left of {BASELINE_SETTING}, {counts['crossing']} cross it and {counts['upper-right']} lie "
                   f"upper-right (lower-left share {share:.2f})"
                   + (f"; {not_compared} could not be compared (no shared bit range or no fit)" if not_compared else ""))
    return Verdict(family, claim, share, verdict, tuple(comparisons), explanation)


def verdicts(rows: Union[RowsLike, Sequence[Cell]], fits: Optional[LawFits] = None,
             x: str = "mt_bits") -> dict[str, Verdict]:
    """`family_verdict` for every family present, from the fitted curves on axis `x`."""
    cells = ensure_cells(rows)
    fits = fits if fits is not None else fit_all(cells, n_boot=0)
    axis_name = {"mt_bits": "MT", "ct_bits": "CT"}[x]
    result = {}
    for family in families_of(cells):
        if family not in fits.families:
            continue
        comparisons = compare_to_baseline(fits.families[family].by_axis(x))
        result[family] = family_verdict(family, comparisons, axis_name)
    return result
