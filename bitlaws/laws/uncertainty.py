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

Fitted curves: `metric_draws` draws every cell's metric jointly ``n_draws`` times (cells with stored replicates
together, so that noise the cells' samples share stays shared; cells with only an interval independently from
their ``se``; cells without either stay exact), and `refit_curve` refits a precision curve to every draw at once
(a batched least squares, ~100x faster than one scipy fit per draw), so that `bitlaws.laws.pareto` can tell
whether a curve's position against the float curve survives the cells' sampling noise. At equal model bits a
quantized cell faces the float cell of a *smaller* model, so the curves' comparison gains from noise shared
across models, not from the pairing within one model that the paired differences use.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
import statistics
from typing import Mapping, Optional, Sequence

import numpy as np

from bitlaws.eval.intervals import (DEFAULT_GROUPS, FrechetReference, Interval, interval_from_replicates,
                                   paired_difference_interval)
from bitlaws.laws.fit import (_ALPHA_BOUNDS, BASELINE_SETTING, Cell, PowerLawFit, families_of, family_title,
                              fit_power_law)

WORSE, BETTER, UNRESOLVED = "worse", "better", "not resolved"
DEFAULT_DRAWS = 200


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


def cell_se(cell: Cell) -> Optional[float]:
    """The standard error of the cell's metric: the record's ``fid_interval["se"]``, else the interval's half
    width over the normal quantile of its level; None when the record has no usable interval."""
    interval = cell_interval(cell)
    if interval is None:
        return None
    se = cell.raw["fid_interval"].get("se")
    if isinstance(se, (int, float)) and not isinstance(se, bool) and math.isfinite(se) and se >= 0:
        return float(se)
    lo, hi, level = interval
    if not (0 < level < 1 and lo <= hi):
        return None
    return (hi - lo) / (2 * statistics.NormalDist().inv_cdf(0.5 + level / 2))


def _seed(cell: Cell) -> object:
    return cell.raw.get("seed", 0)


def _verdict(interval: Interval) -> str:
    if not interval.excludes(0.0):
        return UNRESOLVED
    return WORSE if interval.lo > 0 else BETTER


def features_path(cell: Cell, root: Optional[pathlib.Path]) -> Optional[pathlib.Path]:
    """The cell's ``features_file`` under `root` when the record names one and it exists, else None."""
    name = cell.raw.get("features_file")
    if root is None or not name:
        return None
    path = pathlib.Path(root) / str(name)
    return path if path.is_file() else None


def read_features_file(path: pathlib.Path) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
    """``(features [N, d], replicates [G])`` of a cell's features file (an ``.npz`` written by the demo evaluator,
    or a plain ``.npy`` of features); an array the file lacks, or every array of an unreadable file, is None."""
    try:
        if path.suffix == ".npz":
            with np.load(path) as arrays:
                return (arrays["features"] if "features" in arrays else None,
                        arrays["replicates"] if "replicates" in arrays else None)
        return np.load(path), None
    except (OSError, ValueError, KeyError):
        return None, None


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
    load = functools.lru_cache(maxsize=None)(read_features_file)

    def features(cell: Cell) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
        path = features_path(cell, root)
        return load(path) if path is not None else (None, None)

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


# ----------------------------------------------------------------------------------------------------------------
# Draws of every cell's metric, and the precision curves refitted to each draw
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MetricDraws:
    """Joint draws of the cells' metrics, to carry their sampling noise into the fitted curves.

    Draw b of a cell is ``metric · exp(δ_b)``, δ its relative sampling error: normal with standard deviation
    ``se / metric`` for a cell drawn from its interval alone; ``sqrt((G − 1) / G) · Σ_g z_bg (d_g − mean(d)) /
    metric`` for a cell with stored jackknife replicates ``d [G]``, with the normal weights ``z [n_draws, G]``
    shared by the cells of one seed (their sample i has the same noise and label in every cell, and replicate g
    leaves out the same samples), so the draws have the replicates' jackknife covariance across those cells and
    move together as far as their replicates do; other seeds' samples are independent and get their own weights.
    Draws are log-normal, positive like the metric and on the log scale of the fits' residuals.

    Attributes:
        values: ``{cell key: [n_draws] float64}``; cells not in it are exact (every draw is their metric).
        n_draws: Draws per cell.
        seed: Generator seed.
        paired: Cells drawn from stored replicates.
        independent: Cells drawn from their interval's se alone.
    """

    values: Mapping[str, np.ndarray]
    n_draws: int
    seed: int
    paired: int
    independent: int

    def of(self, cells: Sequence[Cell]) -> np.ndarray:
        """``[n_draws, len(cells)]`` draws of `cells`."""
        return np.stack([self.values[c.key] if c.key in self.values else np.full(self.n_draws, c.fid)
                         for c in cells], axis=1)


def stored_replicates(cell: Cell, root: Optional[pathlib.Path]) -> Optional[np.ndarray]:
    """The ``[G]`` leave-one-group-out metrics in the cell's ``features_file`` ``.npz`` (relative to `root`), or
    None when there is no such file, it holds no (usable) replicates, or it cannot be read."""
    path = features_path(cell, root)
    if path is None or path.suffix != ".npz":
        return None
    _, replicates = read_features_file(path)
    if replicates is None:
        return None
    values = np.asarray(replicates, dtype=np.float64)
    return values if values.ndim == 1 and values.size >= 2 and np.all(np.isfinite(values)) else None


def metric_draws(cells: Sequence[Cell], root: Optional[pathlib.Path] = None, *, n_draws: int = DEFAULT_DRAWS,
                 seed: int = 0) -> Optional[MetricDraws]:
    """`MetricDraws` of `cells`, or None when no cell has an interval or stored replicates (nothing to draw).

    Args:
        cells: The cells (keys unique).
        root: Folder the records' ``features_file`` paths are relative to; without it no replicates are read
            and every cell with an interval is drawn independently.
        n_draws: Draws per cell (>= 1).
        seed: Seed of ``numpy.random.default_rng``; the draws do not depend on the order of `cells`.

    Raises:
        ValueError: `n_draws` < 1, or two cells share a key while some cell has something to draw.
    """
    if isinstance(n_draws, bool) or not isinstance(n_draws, int) or n_draws < 1:
        raise ValueError(f"n_draws must be a positive integer, got {n_draws!r}")
    replicates = {c.key: r for c in cells if (r := stored_replicates(c, root)) is not None}
    ses = {c.key: se for c in cells if c.key not in replicates and (se := cell_se(c)) is not None}
    if not replicates and not ses:
        return None
    by_key: dict[str, Cell] = {}
    for cell in cells:
        if cell.key in by_key:
            raise ValueError(f"cell key {cell.key!r} appears more than once: draws are kept per key")
        by_key[cell.key] = cell
    rng = np.random.default_rng(seed)
    values: dict[str, np.ndarray] = {}

    def sample_set(key: str) -> tuple[int, str]:  # cells whose replicates leave out the same samples
        return replicates[key].size, str(_seed(by_key[key]))

    for group in sorted({sample_set(k) for k in replicates}):
        weights = rng.standard_normal((n_draws, group[0])) * math.sqrt((group[0] - 1) / group[0])  # [B, G]
        for key in sorted(k for k in replicates if sample_set(k) == group):
            metric, r = by_key[key].fid, replicates[key]
            values[key] = metric * np.exp(weights @ (r - r.mean()) / metric)  # [B]
    for key in sorted(ses):
        metric = by_key[key].fid
        values[key] = metric * np.exp(rng.standard_normal(n_draws) * ses[key] / metric)  # [B]
    return MetricDraws(values, n_draws, seed, len(replicates), len(ses))


@dataclasses.dataclass(frozen=True)
class CurveDraws:
    """One precision curve refitted to every draw: ``y = exp(θ₀ − α · log(x / x_ref)) + c`` per draw.

    Attributes:
        theta: ``[n_draws, 3]`` float64 rows ``(θ₀, α, c)``; NaN where the refit failed.
        x_ref: The geometric mean of the curve's x, as in `bitlaws.laws.fit.fit_power_law`.
    """

    theta: np.ndarray
    x_ref: float

    def predict(self, x: np.ndarray) -> np.ndarray:
        """``[n_draws, G]`` predictions at ``[G]`` positive x (NaN rows where the refit failed)."""
        log_u = np.log(np.asarray(x, dtype=np.float64) / self.x_ref)  # [G]
        return np.exp(self.theta[:, :1] - self.theta[:, 1:2] * log_u) + self.theta[:, 2:]


_GRAD_TOL = 1e-9  # scaled gradient (residual units) at which a batched refit has converged
_ACCEPT_TOL = 1e-6  # ... and above which a finished refit is redone by `fit_power_law`


def _floor_law_batch(log_u: np.ndarray, log_y: np.ndarray, start: np.ndarray,
                     max_iter: int = 400) -> tuple[np.ndarray, np.ndarray]:
    """Least squares of ``log(exp(θ₀ − α·u) + c) − log y`` for every row of `log_y` at once.

    Levenberg-Marquardt with Marquardt scaling under `fit_power_law`'s bounds (α in its range, 0 ≤ c ≤ max y);
    a parameter on a bound that the gradient pushes outwards is held there. Each iteration works on the rows
    that have not converged yet (most converge in 10-30 iterations; flat valleys take a few hundred).

    Args:
        log_u: ``[n]`` log of x over its geometric mean.
        log_y: ``[B, n]`` log metrics, one problem per row.
        start: ``[3]`` starting ``(θ₀, α, c)`` (the point fit).
        max_iter: Iterations at most.

    Returns:
        ``theta [B, 3]`` and ``converged [B]``.
    """
    n_rows = log_y.shape[0]
    lower = np.broadcast_to(np.array([-np.inf, _ALPHA_BOUNDS[0], 0.0]), (n_rows, 3))
    upper = np.stack([np.full(n_rows, np.inf), np.full(n_rows, _ALPHA_BOUNDS[1]), np.exp(log_y).max(axis=1)], 1)
    theta = np.clip(np.broadcast_to(start, (n_rows, 3)), lower, upper)
    theta[:, 2] = np.minimum(theta[:, 2], upper[:, 2] * (1 - 1e-9))

    def evaluate(t: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        power = np.exp(t[:, :1] - t[:, 1:2] * log_u)  # [b, n]
        total = power + t[:, 2:]
        residual = np.log(total) - log_y[rows]  # [b, n]
        jac = np.stack([power / total, -power * log_u / total, 1.0 / total], axis=2)  # [b, n, 3]
        return residual, jac, 0.5 * np.sum(residual ** 2, axis=1)

    def scaled_gradient(residual: np.ndarray, jac: np.ndarray, t: np.ndarray,
                        rows: np.ndarray) -> tuple[np.ndarray, ...]:
        grad = np.einsum("bnk,bn->bk", jac, residual)  # [b, 3]
        hess = np.einsum("bnk,bnl->bkl", jac, jac)  # [b, 3, 3]
        free = ~(((t <= lower[rows]) & (grad > 0)) | ((t >= upper[rows]) & (grad < 0)))  # [b, 3]
        diag = np.maximum(np.diagonal(hess, axis1=1, axis2=2), 1e-300)  # [b, 3]
        largest = np.max(np.abs(np.where(free, grad, 0.0)) / np.sqrt(diag), axis=1)  # [b]
        return largest, grad, hess, free, diag

    everything = np.arange(n_rows)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        residual, jac, cost = evaluate(theta, everything)
        damping = np.full(n_rows, 1e-3)
        active = np.isfinite(cost)  # [B]
        for _ in range(max_iter):
            rows = np.flatnonzero(active)
            if rows.size == 0:
                break
            largest, grad, hess, free, diag = scaled_gradient(residual[rows], jac[rows], theta[rows], rows)
            stop = (largest <= _GRAD_TOL) | (damping[rows] > 1e12)
            active[rows[stop]] = False
            go = ~stop
            rows, grad, hess, free, diag = rows[go], grad[go], hess[go], free[go], diag[go]
            both_free = free[:, :, None] & free[:, None, :]  # [b, 3, 3]
            system = (np.where(both_free, hess, 0.0)
                      + np.eye(3) * np.where(free, damping[rows, None] * diag, 1.0)[:, None])  # [b, 3, 3]
            step = np.linalg.solve(system, -np.where(free, grad, 0.0)[..., None])[..., 0]  # [b, 3]
            trial = np.clip(theta[rows] + step, lower[rows], upper[rows])
            t_residual, t_jac, t_cost = evaluate(trial, rows)
            better = np.isfinite(t_cost) & (t_cost < cost[rows])  # [b]
            taken = rows[better]
            theta[taken], residual[taken], jac[taken], cost[taken] = (trial[better], t_residual[better],
                                                                      t_jac[better], t_cost[better])
            damping[rows] = np.where(better, np.maximum(damping[rows] * 0.3, 1e-12), damping[rows] * 10.0)
        largest = scaled_gradient(residual, jac, theta, everything)[0]
    return theta, np.isfinite(cost) & (largest <= _ACCEPT_TOL)


def refit_curve(fit: PowerLawFit, x: Sequence[float], ys: np.ndarray) -> Optional[CurveDraws]:
    """`fit`'s law refitted to every row of `ys`, starting from `fit` (what `fit_power_law` would find).

    Args:
        fit: The point fit of the curve to the measured metrics at `x`.
        x: ``[n]`` positive x of the curve's cells.
        ys: ``[B, n]`` positive draws of their metrics.

    Returns:
        The refits, or None for a fit that is not a power law (``'constant'``, ``'none'``). A 2-point curve
        (``'power'``) is the log-log line through each draw; a full fit that does not converge in the batch
        is redone by `fit_power_law` from its own starting points (NaN if that is not a full fit).
    """
    x = np.asarray(x, dtype=np.float64)  # [n]
    ys = np.asarray(ys, dtype=np.float64)  # [B, n]
    if fit.kind not in ("power", "power+floor"):
        return None
    x_ref = float(np.exp(np.mean(np.log(x))))
    log_u, log_y = np.log(x / x_ref), np.log(ys)  # [n], [B, n]
    if fit.kind == "power":
        design = np.stack([np.ones_like(log_u), -log_u], axis=1)  # [n, 2]
        coef = np.linalg.lstsq(design, log_y.T, rcond=None)[0]  # [2, B]
        return CurveDraws(np.stack([coef[0], coef[1], np.zeros(ys.shape[0])], axis=1), x_ref)
    start = np.array([math.log(fit.a) - fit.alpha * math.log(x_ref), fit.alpha, fit.c])
    theta, converged = _floor_law_batch(log_u, log_y, start)
    for row in np.flatnonzero(~converged):  # rare; the scipy fit is ~100x slower per draw
        again = fit_power_law(x, ys[row])
        theta[row] = ((math.log(again.a) - again.alpha * math.log(x_ref), again.alpha, again.c)
                      if again.kind == "power+floor" else (math.nan,) * 3)
    return CurveDraws(theta, x_ref)


def refit_family(cells: Sequence[Cell], family: str, axis: str, fits: Mapping[str, PowerLawFit],
                 draws: MetricDraws) -> dict[str, CurveDraws]:
    """``{series: CurveDraws}`` of every power-law curve of `family` on `axis` (``'mt_bits'``/``'ct_bits'``)."""
    out = {}
    for series, fit in fits.items():
        members = [c for c in cells if c.family == family and c.series == series]
        if not members:
            continue
        refits = refit_curve(fit, [c.x(axis) for c in members], draws.of(members))
        if refits is not None:
            out[series] = refits
    return out
