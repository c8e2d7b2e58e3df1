"""Which precision wins: budgets, Pareto frontiers, and the paper's lower-left comparison against W16A16.

The paper's finding (its Figure 1): VAR's quantized curves lie lower-left of its W16A16 curve (at equal model
bits, quantized models are better), DiT's do not. `family_verdict` checks that claim on the data: for each
quantized series, the fitted curves of the series and of W16A16 are compared on the MT range both cover, and
the fraction of that (log-spaced) range where the quantized curve predicts the lower metric is its score.

How sure: given `bitlaws.laws.uncertainty.MetricDraws` (the cells' metrics redrawn from their sampling noise),
both curves are refitted to every draw. A curve's position is resolved when at least `RESOLVED_AGREEMENT` of the
draws give it; otherwise it is "not resolved", and every position that more than ``1 − RESOLVED_AGREEMENT`` of
the draws give stays possible. The family verdict is then decided on the range of lower-left shares those
possible positions allow: when both ends of the range give the same verdict it stands, otherwise the verdict is
"not resolved". Without draws everything is decided on the point fits, as before.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Optional, Sequence, Union

import numpy as np

from bitlaws.laws.fit import (BASELINE_SETTING, Cell, LawFits, PowerLawFit, RowsLike, ensure_cells, families_of,
                              family_title, fit_all)
from bitlaws.laws.uncertainty import UNRESOLVED, CurveDraws, MetricDraws, refit_family

# Claim of the paper per family: True = "quantized curves lie lower-left of W16A16", False = "they do not".
# LlamaGen and MAR: the paper's appendix C.2 (Figure 17: LlamaGen "demonstrates exceptional bit-level scaling
# laws", MAR "fails to exhibit superior bit-level scaling laws").
PAPER_CLAIMS: Mapping[str, bool] = {"var": True, "dit": False, "llamagen": True, "mar": False}
# Appendix C.2's pairing: a discrete autoregressive family should behave like VAR, a continuous one like DiT.
COUNTERPARTS: Mapping[str, str] = {"llamagen": "var", "mar": "dit"}
LOWER_LEFT_FRACTION = 2.0 / 3.0  # a series is lower-left when its curve is lower on ≥ 2/3 of the shared range
UPPER_RIGHT_FRACTION = 1.0 / 3.0  # ... and upper-right when on ≤ 1/3
RESOLVED_AGREEMENT = 0.95  # a position is resolved when at least this share of the draws gives it
INTERVAL_LEVEL = 0.95  # level of the percentile interval of the mean log ratio over the draws
_GRID_POINTS = 200
_NAN_PAIR = (math.nan, math.nan)
_POSITIONS = ("lower-left", "crossing", "upper-right")
_SCORE = {"lower-left": 1.0, "crossing": 0.5, "upper-right": 0.0}  # a position's part in the lower-left share


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
        position: ``'lower-left'``, ``'upper-right'``, ``'crossing'``, ``'no overlap'`` or ``'no fit'`` (of the
            point fits).
        log_ratio_interval: `INTERVAL_LEVEL` percentile interval of `mean_log_ratio` over the draws (NaN
            without draws).
        draw_shares: ``{position: share of the draws}`` the refitted curves give (a failed refit gives none;
            empty without draws).
        n_draws: Draws behind `draw_shares` (0: point fits only).
    """

    series: str
    overlap: tuple[float, float]
    frac_lower: float
    mean_log_ratio: float
    position: str
    log_ratio_interval: tuple[float, float] = _NAN_PAIR
    draw_shares: Mapping[str, float] = dataclasses.field(default_factory=dict)
    n_draws: int = 0

    @property
    def compared(self) -> bool:
        return self.position in _POSITIONS

    @property
    def agreement(self) -> float:
        """Share of the draws that give `position` (NaN without draws)."""
        return self.draw_shares.get(self.position, 0.0) if self.n_draws else math.nan

    @property
    def resolved(self) -> bool:
        """True when the position holds in ≥ `RESOLVED_AGREEMENT` of the draws, or no draws were made."""
        return self.n_draws == 0 or self.agreement >= RESOLVED_AGREEMENT

    @property
    def possible(self) -> tuple[str, ...]:
        """The positions the draws do not rule out: `position` when resolved, else it and every position more
        than ``1 − RESOLVED_AGREEMENT`` of the draws give."""
        if self.resolved or not self.compared:
            return (self.position,)
        return tuple(p for p in _POSITIONS
                     if p == self.position or self.draw_shares.get(p, 0.0) > 1.0 - RESOLVED_AGREEMENT)

    @property
    def resolved_position(self) -> str:
        """`position`, or ``'not resolved'`` for a compared curve whose position the draws do not settle."""
        return self.position if self.resolved or not self.compared else UNRESOLVED


def _baseline_series(fits: Mapping[str, PowerLawFit]) -> Optional[str]:
    candidates = [s for s in fits if s.split("-", 1)[0] == BASELINE_SETTING]
    return sorted(candidates, key=len)[0] if candidates else None


def _positions(frac_lower: np.ndarray) -> np.ndarray:
    """``[...]`` positions of fractions of the range where the quantized curve is lower."""
    return np.where(frac_lower >= LOWER_LEFT_FRACTION, "lower-left",
                    np.where(frac_lower <= UPPER_RIGHT_FRACTION, "upper-right", "crossing"))


def _with_draws(comparison: SeriesComparison, grid: np.ndarray, ours: CurveDraws,
                theirs: CurveDraws) -> SeriesComparison:
    """`comparison` with the positions of the refitted curves and the interval of the mean log ratio."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        log_ratio = np.log(ours.predict(grid) / theirs.predict(grid))  # [B, G]
    ok = np.all(np.isfinite(log_ratio), axis=1)  # [B]
    positions = _positions(np.mean(log_ratio < 0, axis=1))  # [B]
    shares = {p: float(np.mean(ok & (positions == p))) for p in _POSITIONS}
    interval = _NAN_PAIR
    if ok.any():
        tail = 100.0 * (1.0 - INTERVAL_LEVEL) / 2.0
        means = np.mean(log_ratio[ok], axis=1)  # [B_ok]
        interval = (float(np.percentile(means, tail)), float(np.percentile(means, 100.0 - tail)))
    return dataclasses.replace(comparison, log_ratio_interval=interval,
                               draw_shares={p: v for p, v in shares.items() if v > 0}, n_draws=int(log_ratio.shape[0]))


def compare_to_baseline(fits: Mapping[str, PowerLawFit], baseline: Optional[str] = None, *,
                        draws: Optional[Mapping[str, CurveDraws]] = None) -> list[SeriesComparison]:
    """Compares every quantized (non-W16A16) series' fitted curve with the baseline's on their shared x range.

    Args:
        fits: ``{series: PowerLawFit}`` of one family on one axis (each fit carries its `x_range`).
        baseline: The baseline series (default: the ``W16A16`` one).
        draws: ``{series: CurveDraws}``, the curves refitted to draws of their cells' metrics
            (`bitlaws.laws.uncertainty.refit_family`); when given, each comparison of two curves that have draws
            also says how often the draws agree with its position and how wide its mean log ratio is.

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
        comparison = SeriesComparison(series, (float(low), float(high)), frac, mean_log_ratio, str(_positions(frac)))
        if draws is not None and series in draws and baseline in draws:
            comparison = _with_draws(comparison, grid, draws[series], draws[baseline])
        comparisons.append(comparison)
    return comparisons


@dataclasses.dataclass(frozen=True)
class Verdict:
    """Whether the paper's claim about one family holds on the data.

    Attributes:
        family: The family.
        claim: The paper's claim in words (None when the paper makes none for this family).
        share_lower_left: Share of compared quantized series lying lower-left on the point fits (crossing counts
            half); NaN if none.
        verdict: ``'holds'``, ``'does not hold'``, ``'mixed'``, ``'not resolved'`` (with draws: the positions the
            draws allow give different verdicts), ``'inconclusive'`` (nothing comparable) or ``'no claim'``.
        comparisons: The per-series comparisons it rests on.
        explanation: One sentence with the numbers.
        unresolved: Compared curves whose position the draws do not settle (0 without draws).
        n_draws: Draws behind the comparisons (0: point fits only).
        share_range: Lowest and highest lower-left share over the positions the draws allow (both equal to
            `share_lower_left` without draws; NaN if nothing was compared).
    """

    family: str
    claim: Optional[str]
    share_lower_left: float
    verdict: str
    comparisons: tuple[SeriesComparison, ...]
    explanation: str
    unresolved: int = 0
    n_draws: int = 0
    share_range: tuple[float, float] = _NAN_PAIR


def _claim_text(family: str) -> Optional[str]:
    if family not in PAPER_CLAIMS:
        return None
    negation = "" if PAPER_CLAIMS[family] else "do not "
    return f"{family_title(family)}'s quantized curves {negation}lie lower-left of its {BASELINE_SETTING} curve"


def _decide(family: str, share: float) -> str:
    lower_left_claim = PAPER_CLAIMS[family]
    if share >= LOWER_LEFT_FRACTION:
        return "holds" if lower_left_claim else "does not hold"
    if share <= UPPER_RIGHT_FRACTION:
        return "does not hold" if lower_left_claim else "holds"
    return "mixed"


def family_verdict(family: str, comparisons: Sequence[SeriesComparison], axis_name: str = "MT") -> Verdict:
    """Decides the paper's claim for `family` from its per-series comparisons.

    The share s of compared quantized series lying lower-left (crossing = ½) decides: for a "lie lower-left"
    claim it holds when s ≥ 2/3, does not hold when s ≤ 1/3 and is mixed in between; for a "do not" claim
    the other way round. When the comparisons carry draws, s ranges over the positions the draws allow each
    curve (`SeriesComparison.possible`); the verdict stands when both ends of that range give it, and is
    ``'not resolved'`` otherwise.
    """
    compared = [c for c in comparisons if c.compared]
    claim = _claim_text(family)
    if not compared:
        skipped = ", ".join(f"{c.series} ({c.position})" for c in comparisons) or "no quantized series"
        return Verdict(family, claim, math.nan, "inconclusive" if claim else "no claim", tuple(comparisons),
                       f"no quantized curve could be compared with {BASELINE_SETTING} on {axis_name}: {skipped}")
    share = sum(_SCORE[c.position] for c in compared) / len(compared)
    low = sum(min(_SCORE[p] for p in c.possible) for c in compared) / len(compared)
    high = sum(max(_SCORE[p] for p in c.possible) for c in compared) / len(compared)
    if claim is None:
        verdict = "no claim"
    else:
        verdict = _decide(family, low) if _decide(family, low) == _decide(family, high) else UNRESOLVED
    n_draws = max(c.n_draws for c in compared)
    resolved = [c for c in compared if c.resolved]
    counts = {p: sum(c.position == p for c in resolved) for p in _POSITIONS}
    positions = (f"{counts['lower-left']} lie lower-left of {BASELINE_SETTING}, {counts['crossing']} cross it and "
                 f"{counts['upper-right']} lie upper-right")
    if n_draws == 0:
        explanation = (f"on {axis_name}, {counts['lower-left']} of {len(compared)} compared quantized curves "
                       f"{positions.split(' ', 1)[1]} (lower-left share {share:.2f})")
    else:
        unresolved = ", ".join(f"{c.series} ({' or '.join(c.possible)})" for c in compared if not c.resolved)
        explanation = (f"on {axis_name}, {len(resolved)} of {len(compared)} compared quantized curves keep their "
                       f"position in ≥ {RESOLVED_AGREEMENT:.0%} of {n_draws} draws of the cells' metrics: "
                       f"{positions}" + (f"; not resolved: {unresolved}" if unresolved else "")
                       + f"; lower-left share {share:.2f} on the point fits"
                       + (f", {low:.2f} to {high:.2f} over the positions the draws allow" if low != high else ""))
    not_compared = len(comparisons) - len(compared)
    if not_compared:
        explanation += f"; {not_compared} could not be compared (no shared bit range or no fit)"
    return Verdict(family, claim, share, verdict, tuple(comparisons), explanation,
                   len(compared) - len(resolved), n_draws, (low, high))


def verdicts(rows: Union[RowsLike, Sequence[Cell]], fits: Optional[LawFits] = None, x: str = "mt_bits", *,
             draws: Optional[MetricDraws] = None) -> dict[str, Verdict]:
    """`family_verdict` for every family present, from the fitted curves on axis `x`.

    Args:
        rows: Cells, rows or a results path.
        fits: `fit_all` of the same cells (computed without bootstrap when None).
        x: ``'mt_bits'`` or ``'ct_bits'``.
        draws: Draws of the cells' metrics (`bitlaws.laws.uncertainty.metric_draws`); when given, every curve
            is refitted to each draw and the verdicts say which positions are not resolved.
    """
    cells = ensure_cells(rows)
    fits = fits if fits is not None else fit_all(cells, n_boot=0)
    axis_name = {"mt_bits": "MT", "ct_bits": "CT"}[x]
    result = {}
    for family in families_of(cells):
        if family not in fits.families:
            continue
        family_fits = fits.families[family].by_axis(x)
        refits = refit_family(cells, family, x, family_fits, draws) if draws is not None else None
        comparisons = compare_to_baseline(family_fits, draws=refits)
        result[family] = family_verdict(family, comparisons, axis_name)
    return result


def behaviour(verdict: Verdict) -> Optional[str]:
    """Where a family's quantized curves lie, read from its verdict: ``'lower-left'`` (quantized better at equal
    bits), ``'not lower-left'``, ``'mixed'``, or None when the verdict settles nothing (not resolved,
    inconclusive, or a family without a claim)."""
    if verdict.family not in PAPER_CLAIMS or verdict.verdict not in ("holds", "does not hold", "mixed"):
        return None
    if verdict.verdict == "mixed":
        return "mixed"
    lower_left = PAPER_CLAIMS[verdict.family] == (verdict.verdict == "holds")
    return "lower-left" if lower_left else "not lower-left"


def follows(verdict: Verdict, counterpart: Verdict) -> str:
    """Whether `verdict`'s family behaves like its counterpart's (`COUNTERPARTS`): ``'follows'`` when both
    behaviours are settled and equal, ``'does not follow'`` when settled and different, ``'not resolved'``
    otherwise."""
    mine, theirs = behaviour(verdict), behaviour(counterpart)
    if mine is None or theirs is None:
        return UNRESOLVED
    return "follows" if mine == theirs else "does not follow"
