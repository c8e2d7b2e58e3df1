"""Sweep results → cells, and the scaling-law fits (univariate power laws and the bivariate N × bits law).

Input rows are the JSON objects of a sweep's ``results.jsonl`` with at least ``key``, ``model`` (``var-d4``; the
family is the part before the first ``-``), ``setting`` (``W4A16`` ...), ``format`` (``int``/``fp``/``none``),
``method`` (``rtn``), ``fid`` (lower is better), ``mt_bits`` and ``ct_bits``; optional ``n_params`` (parameter count
of the quantized network) and ``metric_name``.

Parameter count N. When a row has no ``n_params``, N is derived from bit accounting: the model's W16A16 row (same
``model``) stores every parameter at 16 bits, so ``N = mt_bits(W16A16) / 16`` exactly. Without a W16A16 row,
``N ≈ mt_bits / b_w`` with ``b_w`` the setting's weight bits; this over-estimates N slightly, because the
parameters the setting leaves in float (biases, norms, embeddings) count 16 bits each in MT.

A *series* is one precision curve: setting + format (+ method when it is not RTN), e.g. ``W4A16-int``,
``W8A8-fp``, ``W16A16``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import multiprocessing
import pathlib
import re
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
from scipy import optimize

from bitlaws.laws.results_file import RESULTS_FILE, read_results  # noqa: F401  (RESULTS_FILE: re-exported)

BASELINE_SETTING = "W16A16"
FLOAT_BITS = 16
DEFAULT_METRIC_NAME = "FID"
_SETTING_RE = re.compile(r"^W(\d+)A(\d+)$", re.IGNORECASE)
_ALPHA_BOUNDS = (-4.0, 8.0)
_MIN_DISTINCT_FOR_FULL_FIT = 3

RowsLike = Union[str, pathlib.Path, Iterable[Mapping[str, Any]]]


# ----------------------------------------------------------------------------------------------------------------
# Rows and cells
# ----------------------------------------------------------------------------------------------------------------


def parse_setting(setting: str) -> tuple[int, int]:
    """``'W4A16'`` → ``(4, 16)`` (weight bits, activation bits)."""
    match = _SETTING_RE.match(setting.strip())
    if not match:
        raise ValueError(f"precision setting {setting!r} is not of the form W<bits>A<bits> (e.g. W4A16)")
    return int(match.group(1)), int(match.group(2))


def family_of(model: str) -> str:
    """``'var-d4'`` → ``'var'``."""
    return model.split("-", 1)[0].lower()


FAMILY_ORDER = {"var": 0, "dit": 1, "llamagen": 2, "mar": 3}


def family_title(family: str) -> str:
    """Display name: ``'var'`` → ``'VAR'``, ``'dit'`` → ``'DiT'``, ``'llamagen'`` → ``'LlamaGen'``, others upper-cased."""
    return {"var": "VAR", "dit": "DiT", "llamagen": "LlamaGen", "mar": "MAR"}.get(family, family.upper())


def series_label(setting: str, fmt: str, method: str) -> str:
    """Name of a precision curve: ``W4A16-int``, ``W16A16``, ``W4A16-fp-gptq`` (method shown when not RTN)."""
    label = setting.upper()
    if fmt and fmt.lower() not in ("none", ""):
        label += f"-{fmt.lower()}"
    if method and method.lower() not in ("rtn", "none", ""):
        label += f"-{method.lower()}"
    return label


@dataclasses.dataclass(frozen=True)
class Cell:
    """One finished sweep cell, normalised.

    Attributes:
        key: The cell's unique key.
        model: Member name, e.g. ``var-d4``.
        family: ``var``, ``dit`` ...
        setting: ``W4A16`` ...
        fmt: ``int``, ``fp`` or ``none``.
        method: ``rtn`` ...
        series: Precision-curve label (`series_label`).
        w_bits: Nominal weight bits of the setting.
        a_bits: Nominal activation bits of the setting.
        fid: The metric (lower is better).
        mt_bits: Total model bits MT.
        ct_bits: Total compute bits CT.
        params: Parameter count N (given or derived, see the module docstring).
        params_derived: True when N was derived from MT rather than read from the row.
        raw: The original row.
    """

    key: str
    model: str
    family: str
    setting: str
    fmt: str
    method: str
    series: str
    w_bits: int
    a_bits: int
    fid: float
    mt_bits: float
    ct_bits: float
    params: float
    params_derived: bool
    raw: Mapping[str, Any]

    @property
    def is_baseline(self) -> bool:
        return self.setting == BASELINE_SETTING

    @property
    def bits_per_param(self) -> float:
        """Effective model bits per parameter, ``MT / N``."""
        return self.mt_bits / self.params

    def x(self, axis: str) -> float:
        """The value on the ``'mt_bits'`` or ``'ct_bits'`` axis."""
        return {"mt_bits": self.mt_bits, "ct_bits": self.ct_bits}[_check_axis(axis)]


def _check_axis(axis: str) -> str:
    if axis not in ("mt_bits", "ct_bits"):
        raise ValueError(f"x axis must be 'mt_bits' or 'ct_bits', got {axis!r}")
    return axis


def load_results(path_or_dir: Union[str, pathlib.Path]) -> list[dict]:
    """The rows of a sweep's ``results.jsonl`` (or the file inside a directory), read-only.

    See `bitlaws.laws.results_file.read_results` (which also returns notices about skipped lines): a cut-off
    last line is skipped, any other unreadable line is an error naming the file and line. When a key appears
    more than once the last row wins.

    Raises:
        FileNotFoundError: No results file there.
        ValueError: A line in the file that is not UTF-8, not JSON or not a JSON object.
    """
    return read_results(path_or_dir).rows


def as_rows(rows_or_path: RowsLike) -> list[dict]:
    """Rows from a path (file or directory) or an iterable of mappings."""
    if isinstance(rows_or_path, (str, pathlib.Path)):
        return load_results(rows_or_path)
    return [dict(r) for r in rows_or_path]


def _finite_positive(value: Any) -> bool:
    try:
        return math.isfinite(float(value)) and float(value) > 0
    except (TypeError, ValueError):
        return False


def cells_from_rows(rows: RowsLike) -> list[Cell]:
    """Normalises rows into `Cell`s; rows without a finite positive ``fid``/``mt_bits``/``ct_bits`` are dropped."""
    rows = as_rows(rows)
    usable = [r for r in rows if all(_finite_positive(r.get(k)) for k in ("fid", "mt_bits", "ct_bits"))]
    baseline_params = {
        r["model"]: float(r["mt_bits"]) / FLOAT_BITS
        for r in usable if str(r.get("setting", "")).upper() == BASELINE_SETTING
    }
    cells = []
    for r in usable:
        setting = str(r["setting"]).upper()
        w_bits, a_bits = parse_setting(setting)
        fmt = str(r.get("format") or "none").lower()
        method = str(r.get("method") or "none").lower()
        if _finite_positive(r.get("n_params")):
            params, derived = float(r["n_params"]), False
        elif r["model"] in baseline_params:
            params, derived = baseline_params[r["model"]], True
        else:
            params, derived = float(r["mt_bits"]) / w_bits, True
        cells.append(Cell(
            key=str(r.get("key", "")), model=str(r["model"]), family=family_of(str(r["model"])), setting=setting,
            fmt=fmt, method=method, series=series_label(setting, fmt, method), w_bits=w_bits, a_bits=a_bits,
            fid=float(r["fid"]), mt_bits=float(r["mt_bits"]), ct_bits=float(r["ct_bits"]), params=params,
            params_derived=derived, raw=r))
    return cells


def ensure_cells(rows: Union[RowsLike, Sequence[Cell]]) -> list[Cell]:
    """Accepts cells, rows or a results path."""
    if isinstance(rows, (list, tuple)) and rows and all(isinstance(c, Cell) for c in rows):
        return list(rows)
    return cells_from_rows(rows)  # type: ignore[arg-type]


def mean_over_seeds(cells: Sequence[Cell]) -> dict[tuple[str, str, str, str], float]:
    """The metric per ``(model, setting, format, method)``, averaged over the cells' seeds.

    A sweep may run several seeds per cell (``config.seeds``); tables that show one value per configuration use
    the mean (a non-finite value in any seed makes the mean non-finite, so it stays visible).
    """
    values: dict[tuple[str, str, str, str], list[float]] = {}
    for c in cells:
        values.setdefault((c.model, c.setting, c.fmt, c.method), []).append(c.fid)
    return {key: float(np.mean(v)) for key, v in values.items()}


def families_of(cells: Sequence[Cell]) -> list[str]:
    """Families present, VAR first, then DiT, LlamaGen, MAR, then the rest alphabetically."""
    order = FAMILY_ORDER
    return sorted({c.family for c in cells}, key=lambda f: (order.get(f, len(order)), f))


def series_of(cells: Sequence[Cell], family: str) -> list[str]:
    """Series of a family, baseline first, then by weight bits (descending), activation bits, label."""
    chosen = {c.series: c for c in cells if c.family == family}
    return sorted(chosen, key=lambda s: (not chosen[s].is_baseline, -chosen[s].w_bits, -chosen[s].a_bits, s))


def metric_name(cells: Sequence[Cell]) -> str:
    """The metric's name from the rows' ``metric_name`` fields (joined if several), default ``FID``."""
    names = sorted({str(c.raw["metric_name"]) for c in cells if c.raw.get("metric_name")})
    return " / ".join(names) if names else DEFAULT_METRIC_NAME


def metric_label(cells: Sequence[Cell]) -> str:
    """A short label for axes and table headers: each `metric_name` up to its first `` (`` (``DFD (...)`` -> ``DFD``)."""
    names = sorted({str(c.raw["metric_name"]).split(" (", 1)[0] for c in cells if c.raw.get("metric_name")})
    return " / ".join(names) if names else DEFAULT_METRIC_NAME


# ----------------------------------------------------------------------------------------------------------------
# Univariate power law  y = a · x^(−α) + c
# ----------------------------------------------------------------------------------------------------------------

Interval = tuple[float, float]
_NAN_INTERVAL: Interval = (math.nan, math.nan)


@dataclasses.dataclass(frozen=True)
class PowerLawFit:
    """``y = a · x^(−α) + c`` with ``c ≥ 0``.

    Attributes:
        a: Amplitude in the original x units.
        alpha: Exponent α (NaN when fewer than 2 distinct x).
        c: Irreducible floor (≥ 0).
        n_points: Points used.
        n_distinct_x: Distinct x values.
        rmse_log: Root mean square of ``log(pred) − log(y)``.
        kind: ``'power+floor'`` (full fit), ``'power'`` (2 distinct x: c fixed at 0) or ``'constant'``.
        note: Why a reduced form was fitted, or ``''``.
        ci: 95% (or `ci_level`) bootstrap percentile intervals for ``'a'``, ``'alpha'``, ``'c'``; NaN when absent.
        ci_level: Confidence level of `ci`.
        ci_reason: Why the intervals are NaN, or ``''``.
        n_boot_ok: Bootstrap refits that succeeded.
        x_range: (min x, max x) of the data.
    """

    a: float
    alpha: float
    c: float
    n_points: int
    n_distinct_x: int
    rmse_log: float
    kind: str
    note: str = ""
    ci: Mapping[str, Interval] = dataclasses.field(
        default_factory=lambda: {"a": _NAN_INTERVAL, "alpha": _NAN_INTERVAL, "c": _NAN_INTERVAL})
    ci_level: float = 0.95
    ci_reason: str = "no bootstrap requested"
    n_boot_ok: int = 0
    x_range: Interval = _NAN_INTERVAL

    @property
    def ok(self) -> bool:
        """True when the fit can predict (at least a constant)."""
        return self.kind != "none"

    def predict(self, x: Union[float, np.ndarray]) -> np.ndarray:
        """Predicted y at `x` (any shape, float64)."""
        x = np.asarray(x, dtype=np.float64)
        if self.kind == "constant":
            return np.full_like(x, self.c)
        return self.a * np.power(x, -self.alpha) + self.c


def _power_residuals(theta: np.ndarray, log_u: np.ndarray, log_y: np.ndarray) -> np.ndarray:
    log_amp, alpha, floor = theta
    power = np.exp(log_amp - alpha * log_u)  # [n]
    return np.log(power + floor) - log_y


def _power_jacobian(theta: np.ndarray, log_u: np.ndarray, log_y: np.ndarray) -> np.ndarray:
    log_amp, alpha, floor = theta
    power = np.exp(log_amp - alpha * log_u)  # [n]
    total = power + floor
    return np.stack([power / total, -power * log_u / total, 1.0 / total], axis=1)  # [n, 3]


def _power_inits(log_u: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
    """Starting points: log-log line through y − f·min(y) for a few floor fractions f (0.9 first)."""
    inits = []
    for fraction in (0.9, 0.5, 0.0):
        floor = fraction * float(np.min(y))
        slope, intercept = np.polyfit(log_u, np.log(y - floor), 1)
        alpha = float(np.clip(-slope, *_ALPHA_BOUNDS))
        inits.append(np.array([intercept, alpha, floor]))
    return inits


def _solve_power(log_u: np.ndarray, y: np.ndarray, inits: Sequence[np.ndarray]) -> tuple[np.ndarray, float]:
    """Best least-squares solution over `inits` of the log-space residuals; returns (theta, cost)."""
    log_y = np.log(y)
    upper_floor = float(np.max(y))
    lower = np.array([-np.inf, _ALPHA_BOUNDS[0], 0.0])
    upper = np.array([np.inf, _ALPHA_BOUNDS[1], upper_floor])
    best_theta, best_cost = None, math.inf
    for init in inits:
        start = np.clip(init, lower, upper)
        start[2] = min(start[2], upper_floor * (1 - 1e-9))
        result = optimize.least_squares(_power_residuals, start, jac=_power_jacobian, bounds=(lower, upper),
                                        args=(log_u, log_y), x_scale="jac", method="trf")
        if result.cost < best_cost:
            best_theta, best_cost = result.x, float(result.cost)
    return best_theta, best_cost


def _clean_xy(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    y = np.asarray(y, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"x and y differ in length: {x.shape[0]} vs {y.shape[0]}")
    keep = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    return x[keep], y[keep]


def _fit_power_arrays(x: np.ndarray, y: np.ndarray, inits: Optional[Sequence[np.ndarray]] = None) -> PowerLawFit:
    """Point estimate on clean arrays (no bootstrap)."""
    n_distinct = int(np.unique(x).size)
    x_range = (float(np.min(x)), float(np.max(x))) if x.size else _NAN_INTERVAL
    if n_distinct == 0:
        return PowerLawFit(math.nan, math.nan, math.nan, 0, 0, math.nan, "none", note="no valid points",
                           x_range=x_range)
    if n_distinct == 1:
        return PowerLawFit(0.0, math.nan, float(np.mean(y)), int(x.size), 1, float(np.std(np.log(y))), "constant",
                           note="a single x value: only the mean is known", x_range=x_range)
    x_ref = float(np.exp(np.mean(np.log(x))))
    log_u = np.log(x / x_ref)  # [n]
    if n_distinct == 2:
        slope, intercept = np.polyfit(log_u, np.log(y), 1)
        alpha = -float(slope)
        a = float(np.exp(intercept)) * x_ref ** alpha
        fit = PowerLawFit(a, alpha, 0.0, int(x.size), 2, 0.0, "power",
                          note="2 distinct x: fitted y = a·x^(−α) with c = 0", x_range=x_range)
        residual = np.log(fit.predict(x)) - np.log(y)
        return dataclasses.replace(fit, rmse_log=float(np.sqrt(np.mean(residual ** 2))))
    theta, cost = _solve_power(log_u, y, inits if inits is not None else _power_inits(log_u, y))
    log_amp, alpha, floor = (float(v) for v in theta)
    a = math.exp(log_amp + alpha * math.log(x_ref))
    rmse = math.sqrt(2.0 * cost / x.size)
    return PowerLawFit(a, alpha, floor, int(x.size), n_distinct, rmse, "power+floor", x_range=x_range)


def _theta_of(fit: PowerLawFit, x_ref: float) -> np.ndarray:
    return np.array([math.log(fit.a) - fit.alpha * math.log(x_ref), fit.alpha, fit.c])


def _percentile_intervals(samples: Mapping[str, np.ndarray], level: float) -> dict[str, Interval]:
    tail = 100.0 * (1.0 - level) / 2.0
    return {name: (float(np.percentile(v, tail)), float(np.percentile(v, 100.0 - tail))) for name, v in
            samples.items()}


@dataclasses.dataclass(frozen=True)
class BootstrapResult:
    """Percentile intervals from a bootstrap.

    Attributes:
        ci: ``{parameter: (low, high)}``; NaN when not computable.
        level: Confidence level.
        n_ok: Successful refits.
        n_boot: Resamples drawn.
        reason: Why the intervals are NaN, or ``''``.
    """

    ci: Mapping[str, Interval]
    level: float
    n_ok: int
    n_boot: int
    reason: str = ""


def _bootstrap_generic(n_points: int, names: Sequence[str], refit: Callable[[np.ndarray], Optional[np.ndarray]],
                       n_boot: int, seed: int, level: float) -> BootstrapResult:
    """Resamples point indices with replacement; `refit(indices)` returns a parameter vector or None (skipped)."""
    rng = np.random.default_rng(seed)
    estimates = []
    for _ in range(n_boot):
        indices = rng.integers(0, n_points, size=n_points)
        theta = refit(indices)
        if theta is not None and np.all(np.isfinite(theta)):
            estimates.append(theta)
    needed = max(10, n_boot // 4)
    if len(estimates) < needed:
        nan_ci = {name: _NAN_INTERVAL for name in names}
        return BootstrapResult(nan_ci, level, len(estimates), n_boot,
                               f"only {len(estimates)} of {n_boot} resamples could be refitted (need {needed})")
    stacked = np.stack(estimates)  # [n_ok, n_params]
    samples = {name: stacked[:, i] for i, name in enumerate(names)}
    return BootstrapResult(_percentile_intervals(samples, level), level, len(estimates), n_boot)


def bootstrap(x: Sequence[float], y: Sequence[float], *, n_boot: int = 200, seed: int = 0, level: float = 0.95,
              base: Optional[PowerLawFit] = None) -> BootstrapResult:
    """Bootstrap percentile intervals for ``a``, ``alpha``, ``c`` of `fit_power_law`.

    Points are resampled with replacement (``numpy.random.default_rng(seed)``) and refitted, starting from the
    full-sample fit; resamples with fewer than 3 distinct x are skipped.

    Args:
        x: ``[n]`` positive x values.
        y: ``[n]`` positive y values.
        n_boot: Resamples.
        seed: Generator seed.
        level: Confidence level of the intervals.
        base: The full-sample fit (computed when None).

    Returns:
        The intervals, or NaN intervals with a reason when fewer than 3 distinct x exist or too few refits worked.
    """
    x, y = _clean_xy(x, y)
    names = ("a", "alpha", "c")
    n_distinct = int(np.unique(x).size)
    if n_distinct < _MIN_DISTINCT_FOR_FULL_FIT:
        return BootstrapResult({n: _NAN_INTERVAL for n in names}, level, 0, 0,
                               f"fewer than 3 distinct x ({n_distinct}): the 3-parameter law is not identifiable")
    base = base if base is not None and base.kind == "power+floor" else _fit_power_arrays(x, y)
    x_ref = float(np.exp(np.mean(np.log(x))))
    start = _theta_of(base, x_ref)
    fitted: dict[tuple[int, ...], Optional[np.ndarray]] = {}

    def refit(indices: np.ndarray) -> Optional[np.ndarray]:
        # The least-squares cost is a sum over points, so a resample's fit depends only on which points it
        # holds, not on their order: each distinct multiset is fitted once, its points in sorted order. With
        # one point per model size (4-6 points) 200 resamples hold only a few dozen distinct multisets.
        key = tuple(sorted(int(i) for i in indices))
        if key not in fitted:
            chosen = np.asarray(key)
            xs, ys = x[chosen], y[chosen]
            if np.unique(xs).size < _MIN_DISTINCT_FOR_FULL_FIT:
                fitted[key] = None
            else:
                theta, _ = _solve_power(np.log(xs / x_ref), ys, [start])
                fitted[key] = np.array([math.exp(theta[0] + theta[1] * math.log(x_ref)), theta[1], theta[2]])
        return fitted[key]

    return _bootstrap_generic(x.size, names, refit, n_boot, seed, level)


def fit_power_law(x: Sequence[float], y: Sequence[float], *, n_boot: int = 0, seed: int = 0,
                  level: float = 0.95) -> PowerLawFit:
    """Fits ``y = a · x^(−α) + c`` (``c ≥ 0``) by least squares on ``log(y)`` residuals.

    x is normalised by its geometric mean for conditioning. Starts from log-log lines through
    ``y − f·min(y)`` (f = 0.9, 0.5, 0) and keeps the best; bounds ``α ∈ [−4, 8]``, ``0 ≤ c ≤ max(y)``.
    Non-positive or non-finite points are dropped. Degenerate inputs do not raise: 2 distinct x give a
    pure power law (c = 0), 1 distinct x a constant, and the intervals are NaN with `ci_reason` saying why.

    Args:
        x: ``[n]`` x values (MT or CT bits).
        y: ``[n]`` metric values (lower is better).
        n_boot: Bootstrap resamples for the intervals (0 = none).
        seed: Bootstrap seed.
        level: Confidence level.
    """
    x, y = _clean_xy(x, y)
    fit = _fit_power_arrays(x, y)
    if n_boot <= 0:
        return fit
    if fit.kind != "power+floor":
        return dataclasses.replace(fit, ci_level=level, ci_reason=(
            f"fewer than 3 distinct x ({fit.n_distinct_x}): the 3-parameter law is not identifiable"))
    boot = bootstrap(x, y, n_boot=n_boot, seed=seed, level=level, base=fit)
    return dataclasses.replace(fit, ci=dict(boot.ci), ci_level=level, ci_reason=boot.reason, n_boot_ok=boot.n_ok)


def _series_data(cells: Sequence[Cell], family: str, x: str) -> dict[str, tuple[list[float], list[float]]]:
    """``{series label: (x values, FIDs)}`` of one family (baseline first)."""
    _check_axis(x)
    cells = [c for c in cells if c.family == family]
    return {series: ([c.x(x) for c in cells if c.series == series], [c.fid for c in cells if c.series == series])
            for series in series_of(cells, family)}


def fit_family(rows: Union[RowsLike, Sequence[Cell]], family: str, x: str = "mt_bits", *, n_boot: int = 200,
               seed: int = 0) -> dict[str, PowerLawFit]:
    """Per-series fits ``FID = a · x^(−α) + c`` for one family, ``{series label: fit}`` (baseline first)."""
    data = _series_data(ensure_cells(rows), family, x)
    return {series: fit_power_law(xs, ys, n_boot=n_boot, seed=seed + index)
            for index, (series, (xs, ys)) in enumerate(data.items())}


# ----------------------------------------------------------------------------------------------------------------
# Bivariate law in parameters N and bits
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BivariateFit:
    """``FID = A · N^(−α) · b^(−β) · b_a^(−γ) + E``.

    N is the parameter count, b = MT / N the effective model bits per parameter and b_a the activation bits of
    the setting. γ is fitted only when the data hold more than one activation precision (else fixed at 0).

    Why the multiplicative form and not the additive ``A·N^(−α) + B·b^(−β) + E``: at a fixed precision it
    reduces to the per-series law ``a·N^(−α) + E`` with one exponent shared by all precisions (what the
    per-setting fits show: precisions shift the curve rather than bend it), it has one parameter fewer, and
    since ``MT = N·b`` it reads ``FID − E = A·MT^(−α)·b^(α−β)·b_a^(−γ)``: at equal model bits, lowering the
    bits per parameter (and spending them on parameters) lowers FID exactly when ``β < α``. The sign of
    ``β − α`` is therefore the paper's lower-left question in one number. The additive form instead gives
    quantization an error floor that does not shrink with model size, which the paper's VAR results contradict.

    Attributes:
        A, alpha, beta, gamma, E: Parameters (original units).
        fit_gamma: Whether γ was fitted.
        n_points: Cells used.
        rmse_log: RMS of log residuals.
        ci: Bootstrap intervals per parameter name (``'A'``, ``'alpha'``, ``'beta'``, ``'gamma'``, ``'E'``).
        ci_reason: Why the intervals are NaN, or ``''``.
        note: Why the fit is unavailable, or ``''``.
    """

    A: float
    alpha: float
    beta: float
    gamma: float
    E: float
    fit_gamma: bool
    n_points: int
    rmse_log: float
    ci: Mapping[str, Interval] = dataclasses.field(default_factory=dict)
    ci_level: float = 0.95
    ci_reason: str = "no bootstrap requested"
    note: str = ""

    @property
    def ok(self) -> bool:
        return math.isfinite(self.alpha) and math.isfinite(self.beta)

    def predict(self, params: Union[float, np.ndarray], bits: Union[float, np.ndarray],
                act_bits: Union[float, np.ndarray] = FLOAT_BITS) -> np.ndarray:
        """Predicted FID for parameter count N, bits per parameter b and activation bits (broadcasting)."""
        n, b, ba = (np.asarray(v, dtype=np.float64) for v in (params, bits, act_bits))
        return self.A * n ** -self.alpha * b ** -self.beta * ba ** -self.gamma + self.E


def _bivariate_design(n: np.ndarray, b: np.ndarray, ba: np.ndarray, fit_gamma: bool,
                      refs: np.ndarray) -> np.ndarray:
    """Columns −log(N/N₀), −log(b/b₀) (, −log(b_a/b_a₀)): ``[n_points, 2 or 3]``."""
    columns = [-np.log(n / refs[0]), -np.log(b / refs[1])]
    if fit_gamma:
        columns.append(-np.log(ba / refs[2]))
    return np.stack(columns, axis=1)


def _solve_bivariate(design: np.ndarray, y: np.ndarray, inits: Sequence[np.ndarray]) -> tuple[np.ndarray, float]:
    """Least squares of log residuals for theta = [log A₀, exponents..., E]."""
    log_y = np.log(y)
    k = design.shape[1]

    def residuals(theta: np.ndarray) -> np.ndarray:
        power = np.exp(theta[0] + design @ theta[1:1 + k])  # [n]
        return np.log(power + theta[-1]) - log_y

    def jacobian(theta: np.ndarray) -> np.ndarray:
        power = np.exp(theta[0] + design @ theta[1:1 + k])  # [n]
        total = power + theta[-1]
        return np.concatenate([(power / total)[:, None], design * (power / total)[:, None],
                               (1.0 / total)[:, None]], axis=1)  # [n, k + 2]

    lower = np.array([-np.inf] + [_ALPHA_BOUNDS[0]] * k + [0.0])
    upper = np.array([np.inf] + [_ALPHA_BOUNDS[1]] * k + [float(np.max(y))])
    best_theta, best_cost = None, math.inf
    for init in inits:
        start = np.clip(init, lower, upper)
        start[-1] = min(start[-1], upper[-1] * (1 - 1e-9))
        result = optimize.least_squares(residuals, start, jac=jacobian, bounds=(lower, upper), x_scale="jac",
                                        method="trf")
        if result.cost < best_cost:
            best_theta, best_cost = result.x, float(result.cost)
    return best_theta, best_cost


def _bivariate_inits(design: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
    inits = []
    for fraction in (0.9, 0.5, 0.0):
        floor = fraction * float(np.min(y))
        lhs = np.concatenate([np.ones((design.shape[0], 1)), design], axis=1)  # [n, k + 1]
        coef, *_ = np.linalg.lstsq(lhs, np.log(y - floor), rcond=None)
        inits.append(np.concatenate([coef, [floor]]))
    return inits


def fit_bivariate_arrays(params: Sequence[float], bits: Sequence[float], act_bits: Sequence[float],
                         fid: Sequence[float], *, n_boot: int = 0, seed: int = 0,
                         level: float = 0.95) -> BivariateFit:
    """Fits `BivariateFit` to ``[n]`` arrays of N, bits per parameter, activation bits and FID."""
    n, b, ba, y = (np.asarray(v, dtype=np.float64).reshape(-1) for v in (params, bits, act_bits, fid))
    keep = np.isfinite(y) & (y > 0) & (n > 0) & (b > 0) & (ba > 0)
    n, b, ba, y = n[keep], b[keep], ba[keep], y[keep]
    fit_gamma = np.unique(ba).size > 1
    names = ["A", "alpha", "beta"] + (["gamma"] if fit_gamma else []) + ["E"]
    n_free = len(names)
    if np.unique(n).size < 2 or np.unique(b).size < 2 or y.size < n_free + 1:
        nan = math.nan
        return BivariateFit(nan, nan, nan, nan, nan, fit_gamma, int(y.size), nan,
                            note=(f"needs ≥ 2 sizes, ≥ 2 bit widths and ≥ {n_free + 1} cells; has "
                                  f"{np.unique(n).size} sizes, {np.unique(b).size} bit widths, {y.size} cells"))
    refs = np.array([np.exp(np.mean(np.log(v))) for v in (n, b, ba)])
    design = _bivariate_design(n, b, ba, fit_gamma, refs)
    theta, cost = _solve_bivariate(design, y, _bivariate_inits(design, y))

    def to_named(t: np.ndarray) -> np.ndarray:
        exponents = t[1:-1]
        log_amp = t[0] + float(np.dot(exponents, np.log(refs[:exponents.size])))
        return np.concatenate([[math.exp(log_amp)], exponents, [t[-1]]])

    values = {k: float(v) for k, v in zip(names, to_named(theta))}
    fit = BivariateFit(values["A"], values["alpha"], values["beta"], values.get("gamma", 0.0), values["E"],
                       fit_gamma, int(y.size), math.sqrt(2.0 * cost / y.size), ci_level=level)
    if n_boot <= 0:
        return fit

    def refit(indices: np.ndarray) -> Optional[np.ndarray]:
        if np.unique(n[indices]).size < 2 or np.unique(b[indices]).size < 2:
            return None
        if fit_gamma and np.unique(ba[indices]).size < 2:
            return None
        t, _ = _solve_bivariate(design[indices], y[indices], [theta])
        return to_named(t)

    boot = _bootstrap_generic(y.size, names, refit, n_boot, seed, level)
    return dataclasses.replace(fit, ci=dict(boot.ci), ci_reason=boot.reason)


def fit_bivariate(rows: Union[RowsLike, Sequence[Cell]], family: str, *, n_boot: int = 0,
                  seed: int = 0) -> BivariateFit:
    """`BivariateFit` across all cells (every setting, format and method) of one family."""
    cells = [c for c in ensure_cells(rows) if c.family == family]
    return fit_bivariate_arrays([c.params for c in cells], [c.bits_per_param for c in cells],
                                [c.a_bits for c in cells], [c.fid for c in cells], n_boot=n_boot, seed=seed)


# ----------------------------------------------------------------------------------------------------------------
# Everything at once
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FamilyFits:
    """All fits of one family: ``mt``/``ct`` are ``{series: PowerLawFit}``."""

    family: str
    mt: Mapping[str, PowerLawFit]
    ct: Mapping[str, PowerLawFit]
    bivariate: BivariateFit

    def by_axis(self, axis: str) -> Mapping[str, PowerLawFit]:
        return {"mt_bits": self.mt, "ct_bits": self.ct}[_check_axis(axis)]


@dataclasses.dataclass(frozen=True)
class LawFits:
    """Fits of every family, plus the settings they were made with."""

    families: Mapping[str, FamilyFits]
    n_boot: int
    seed: int
    level: float = 0.95


def fit_all(rows: Union[RowsLike, Sequence[Cell]], *, n_boot: int = 200, seed: int = 0,
            workers: int = 1) -> LawFits:
    """Per-series MT and CT fits and the bivariate fit for every family present, with bootstrap intervals.

    `workers` > 1 fits the series in that many spawned processes when there are bootstrap resamples (each
    series refits 200 resamples at a few ms each); the results are identical to one process (every series has
    its own seed, as in `fit_family`).
    """
    cells = ensure_cells(rows)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    jobs = {}  # (family, axis) -> {series: (x, y, seed)}
    for index, family in enumerate(families_of(cells)):
        for axis, offset in (("mt_bits", 0), ("ct_bits", 500)):
            data = _series_data(cells, family, axis)
            jobs[family, axis] = {series: (xs, ys, seed + 1000 * index + offset + i)
                                  for i, (series, (xs, ys)) in enumerate(data.items())}
    executor = None
    if workers > 1 and n_boot > 0:
        executor = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        run = (lambda xs, ys, s: executor.submit(fit_power_law, xs, ys, n_boot=n_boot, seed=s)) if executor else (
            lambda xs, ys, s: fit_power_law(xs, ys, n_boot=n_boot, seed=s))
        started = {key: {series: run(*job) for series, job in by_series.items()} for key, by_series in jobs.items()}
        per_family = {}
        for index, family in enumerate(families_of(cells)):
            bivariate = fit_bivariate(cells, family, n_boot=n_boot, seed=seed + 1000 * index + 900)
            fits = {axis: {series: job.result() if executor else job for series, job in started[family, axis].items()}
                    for axis in ("mt_bits", "ct_bits")}
            per_family[family] = FamilyFits(family=family, mt=fits["mt_bits"], ct=fits["ct_bits"],
                                            bivariate=bivariate)
    finally:
        if executor is not None:
            executor.shutdown()
    return LawFits(per_family, n_boot, seed)
