"""The bit-budget advisor: the best model size × precision under a weight-storage budget.

Budget: ``budget_mb`` megabytes of MT (``MT / 8e6``; with ``metric='ct'`` the same unit of CT). For every
family and precision series, sizes are considered from the smallest to the largest trained one (no
extrapolation): the trained sizes themselves and a log-spaced grid between them, capped where
``N · bits-per-parameter`` reaches the budget. Each is scored by the family's bivariate law
(`bitlaws.laws.fit.BivariateFit`) anchored to the series' observed cells: the law's prediction times the
series' observed/predicted ratio, interpolated linearly in log N between trained sizes. At a trained size the
score is therefore the measured value, and between sizes it follows the law's shape. The lowest score wins.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

import numpy as np

from bitlaws.laws.fit import (BivariateFit, Cell, RowsLike, ensure_cells, families_of, family_title, fit_bivariate,
                              metric_name, series_of)

BITS_PER_MB = 8e6
_GRID_POINTS = 32
_SAME_SIZE_RTOL = 1e-9


class BudgetTooSmallError(ValueError):
    """No trained size × precision fits the budget."""


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One size × precision option.

    Attributes:
        family: Family.
        series: Precision series (``W4A16-int`` ...).
        setting, fmt, method: Its parts.
        params: Parameter count N.
        size_mb: Its cost on the budget's axis in MB (bits / 8e6).
        predicted_fid: The anchored law's score.
        observed_fid: The measured metric when this is a trained size, else None.
        source: ``'observed'`` or ``'interpolated'``.
        model: The trained model (observed) or ``'between A and B'`` (interpolated).
    """

    family: str
    series: str
    setting: str
    fmt: str
    method: str
    params: float
    size_mb: float
    predicted_fid: float
    observed_fid: Optional[float]
    source: str
    model: str


@dataclasses.dataclass(frozen=True)
class Advice:
    """The advisor's answer: the best candidate and the runners-up (best first)."""

    budget_mb: float
    metric: str
    metric_name: str
    best: Candidate
    alternatives: tuple[Candidate, ...]
    laws: dict


def _law_scores(law: Optional[BivariateFit], params: np.ndarray, bits: float, act_bits: float) -> np.ndarray:
    """The bivariate prediction at `params` ``[k]`` (ones when no law: plain interpolation of the cells)."""
    if law is None or not law.ok:
        return np.ones_like(params)
    return law.predict(params, bits, act_bits)


def _series_candidates(members: Sequence[Cell], law: Optional[BivariateFit], budget_bits: float,
                       axis: str) -> list[Candidate]:
    """Feasible sizes of one series with their anchored scores (empty when even the smallest is too big)."""
    members = sorted(members, key=lambda c: c.params)
    sizes = np.array([c.params for c in members])  # [m]
    cost_per_param = float(np.median([c.x(axis) / c.params for c in members]))
    model_bits = float(np.median([c.bits_per_param for c in members]))
    act_bits = float(members[0].a_bits)
    if sizes[0] * cost_per_param > budget_bits:
        return []
    observed_fid = np.array([c.fid for c in members])  # [m]
    log_ratio = np.log(observed_fid / _law_scores(law, sizes, model_bits, act_bits))  # [m]
    largest = min(float(sizes[-1]), budget_bits / cost_per_param)
    grid = np.unique(np.concatenate([sizes[sizes <= largest], np.geomspace(sizes[0], largest, _GRID_POINTS)]))
    scores = _law_scores(law, grid, model_bits, act_bits) * np.exp(
        np.interp(np.log(grid), np.log(sizes), log_ratio))  # [k]
    first = members[0]
    candidates = []
    for params, score in zip(grid, scores):
        matches = np.flatnonzero(np.isclose(sizes, params, rtol=_SAME_SIZE_RTOL, atol=0.0))
        if matches.size:
            cell = members[int(matches[0])]
            model, observed, source = cell.model, cell.fid, "observed"
        else:
            upper = int(np.searchsorted(sizes, params))
            model = f"between {members[upper - 1].model} and {members[upper].model}"
            observed, source = None, "interpolated"
        candidates.append(Candidate(first.family, first.series, first.setting, first.fmt, first.method,
                                    float(params), float(params) * cost_per_param / BITS_PER_MB, float(score),
                                    observed, source, model))
    return candidates


def _cheapest(cells: Sequence[Cell], axis: str) -> Cell:
    return min(cells, key=lambda c: c.x(axis))


def advise(rows_or_dir: Union[RowsLike, Sequence[Cell]], budget_mb: float, family: Optional[str] = None,
           metric: str = "mt", n_alternatives: int = 5) -> Advice:
    """Best size × precision under `budget_mb` megabytes of model bits (``metric='mt'``) or compute bits (``'ct'``).

    Args:
        rows_or_dir: Cells, rows, or a results file / sweep directory.
        budget_mb: Budget in MB (bits / 8e6).
        family: Restrict to one family (``'var'``, ``'dit'``); all families when None.
        metric: ``'mt'`` or ``'ct'``.
        n_alternatives: Runners-up to keep (best size of each other series).

    Raises:
        ValueError: Bad arguments or no cells for the family.
        BudgetTooSmallError: Nothing fits; the message names the smallest option and its size.
    """
    if metric not in ("mt", "ct"):
        raise ValueError(f"metric must be 'mt' or 'ct', got {metric!r}")
    if not budget_mb > 0:
        raise ValueError(f"budget must be positive, got {budget_mb} MB")
    axis = f"{metric}_bits"
    cells = ensure_cells(rows_or_dir)
    if family is not None:
        cells = [c for c in cells if c.family == family.lower()]
    if not cells:
        where = f"family {family!r}" if family else "the results"
        raise ValueError(f"no usable cells for {where}")
    budget_bits = budget_mb * BITS_PER_MB
    laws, best_per_series = {}, []
    for fam in families_of(cells):
        laws[fam] = fit_bivariate(cells, fam)
        for series in series_of(cells, fam):
            members = [c for c in cells if c.family == fam and c.series == series]
            candidates = _series_candidates(members, laws[fam], budget_bits, axis)
            if candidates:
                best_per_series.append(min(candidates, key=lambda c: (c.predicted_fid, c.source != "observed")))
    if not best_per_series:
        smallest = _cheapest(cells, axis)
        raise BudgetTooSmallError(
            f"nothing fits {budget_mb:g} MB of {metric.upper()}: the smallest option is {smallest.model} "
            f"{smallest.series} at {smallest.x(axis) / BITS_PER_MB:.4g} MB")
    ranked = sorted(best_per_series, key=lambda c: c.predicted_fid)
    return Advice(float(budget_mb), metric, metric_name(cells), ranked[0], tuple(ranked[1:1 + n_alternatives]), laws)


def _describe(candidate: Candidate, metric_label: str) -> str:
    if candidate.source == "observed":
        where = f"{candidate.model}, a trained size (observed {metric_label}: {candidate.observed_fid:.4g})"
    else:
        where = f"an interpolated size {candidate.model} (predicted {metric_label}: {candidate.predicted_fid:.4g})"
    return (f"{family_title(candidate.family)} with N = {candidate.params:,.0f} parameters at {candidate.series} "
            f"— {candidate.size_mb:.4g} MB; {where}")


def _power(exponent: float) -> str:
    """The exponent of ``x^(−e)`` written with one sign: ``(−0.737)`` for e = 0.737, ``(0.208)`` for e = −0.208."""
    return f"(−{exponent:.3f})" if exponent >= 0 else f"({-exponent:.3f})"


def render_advice(advice: Advice) -> str:
    """Human-readable answer, several lines."""
    axis = advice.metric.upper()
    lines = [f"Budget: {advice.budget_mb:g} MB of {axis} ({advice.budget_mb * BITS_PER_MB:.3g} bits).",
             f"Metric: {advice.metric_name} (lower is better).",
             f"Best: {_describe(advice.best, 'metric')}."]
    law = advice.laws.get(advice.best.family)
    if law is not None and law.ok:
        lines.append(f"Law used ({family_title(advice.best.family)}): metric = {law.A:.3g}·N^{_power(law.alpha)}"
                     f"·b^{_power(law.beta)}·b_a^{_power(law.gamma)} + {law.E:.3g}, anchored to the observed cells.")
    else:
        lines.append("No bivariate law could be fitted; sizes between trained ones are interpolated log-linearly.")
    if advice.alternatives:
        lines.append("Runners-up:")
        lines.extend(f"  {i}. {_describe(c, 'metric')}" for i, c in enumerate(advice.alternatives, 2))
    return "\n".join(lines)
