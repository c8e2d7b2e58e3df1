"""``report.md``: how the numbers were made, every cell, the fitted laws, who wins where, and the verdict.

`analyze` is the post-sweep step: fits (with bootstrap), plots and the report into one directory.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

from bitlaws.analysis.summary import ANALYSIS_DIR, SUMMARY_FILE, summary_lines
from bitlaws.laws import pareto
from bitlaws.laws.methods_report import method_tables
from bitlaws.laws.qat_report import qat_section
from bitlaws.laws.fit import (BASELINE_SETTING, FAMILY_ORDER, BivariateFit, Cell, LawFits, PowerLawFit, RowsLike,
                              as_rows, cells_from_rows, families_of, family_title, fit_all, metric_label, metric_name,
                              series_of)
from bitlaws.laws.results_file import read_results
from bitlaws.laws.uncertainty import DEFAULT_DRAWS, MetricDraws, cell_interval, metric_draws, uncertainty_section

REPORT_FILE = "report.md"
_SAMPLE_KEYS = ("n_samples", "num_samples", "samples")
_EXTRA_COLUMNS = (("accuracy", "classifier acc."), ("wall_s", "wall s"), ("wall_time_s", "wall s"))
_BUDGET_POINTS = 8
_BITS_PER_MB = 8e6


def _num(value: Any, digits: int = 4) -> str:
    """Compact number; ``–`` for missing/NaN."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return "–"
    if not math.isfinite(value):
        return "–"
    return f"{value:.{digits}g}"


def _interval(ci: Mapping[str, tuple[float, float]], name: str) -> str:
    low, high = ci.get(name, (math.nan, math.nan))
    if not (math.isfinite(low) and math.isfinite(high)):
        return "–"
    return f"[{_num(low, 3)}, {_num(high, 3)}]"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _distinct(cells: Sequence[Cell], key: str) -> list[str]:
    return sorted({str(c.raw[key]) for c in cells if c.raw.get(key) is not None})


def _provenance(cells: Sequence[Cell], n_rows: int, fits: LawFits, source: Optional[str],
                notices: Sequence[str] = ()) -> list[str]:
    metric = metric_name(cells)
    lines = ["## How the numbers were produced", ""]
    lines.append(f"* Source: {source or 'rows passed in memory'}; {n_rows} rows, {len(cells)} usable cells "
                 f"(rows without a finite positive metric, MT or CT are left out).")
    lines += [f"* Skipped: {notice}." for notice in notices]
    lines.append(f"* Metric: **{metric}**, lower is better.")
    samples = sorted({str(c.raw[k]) for c in cells for k in _SAMPLE_KEYS if c.raw.get(k) is not None})
    if samples:
        lines.append(f"* Samples per cell: {', '.join(samples)}.")
    for key, label in (("method", "Quantization methods"), ("format", "Formats"), ("seed", "Seeds")):
        values = _distinct(cells, key)
        if values:
            lines.append(f"* {label}: {', '.join(values)}.")
    derived = sum(c.params_derived for c in cells)
    lines.append("* MT = total model bits (quantized kernels at the weight bits, everything else at 16 bits); "
                 "CT = total compute bits (weight bits × activation bits per quantized kernel parameter, 16 × 16 "
                 "otherwise). MB = bits / 8e6.")
    if derived:
        lines.append(f"* Parameter count N: read from the rows where given; for {derived} cells derived as "
                     f"MT(W16A16 of the same model) / 16 (exact), or MT / weight bits when no W16A16 cell exists "
                     f"(slight over-estimate).")
    boot = (f"{fits.n_boot} bootstrap resamples (seed {fits.seed}), percentile {fits.level:.0%} intervals"
            if fits.n_boot else "no bootstrap")
    lines.append(f"* Fits: least squares on log residuals of {metric_label(cells)} = a·x^(−α) + c (c ≥ 0) per family × "
                 f"precision, x = MT or CT; {boot}. Curves with fewer than 3 sizes get no interval.")
    return lines + [""]


def _cells_table(cells: Sequence[Cell]) -> list[str]:
    extras = []
    for key, label in _EXTRA_COLUMNS:
        if any(c.raw.get(key) is not None for c in cells) and label not in [e[1] for e in extras]:
            extras.append((key, label))
    intervals = {c.key: cell_interval(c) for c in cells}
    level = next((ci[2] for ci in intervals.values() if ci), None)
    header = ["family", "model", "N", "setting", "format", "method", metric_label(cells)]
    header += [f"{level:.0%} interval"] if level is not None else []
    header += ["MT (MB)", "CT (Gbit)"] + [label for _, label in extras]
    ordered = sorted(cells, key=lambda c: (families_of(cells).index(c.family), c.params, not c.is_baseline,
                                           -c.w_bits, -c.a_bits, c.series))
    rows = []
    for c in ordered:
        row = [family_title(c.family), c.model, f"{c.params:,.0f}", c.setting, c.fmt, c.method, _num(c.fid)]
        if level is not None:
            ci = intervals[c.key]
            row.append(f"[{_num(ci[0])}, {_num(ci[1])}]" if ci else "–")
        row += [_num(c.mt_bits / _BITS_PER_MB), _num(c.ct_bits / 1e9)]
        row += [_num(c.raw.get(key)) for key, _ in extras]
        rows.append(row)
    return ["## All cells", ""] + _table(header, rows) + [""]


def _power_table(fits: Mapping[str, PowerLawFit]) -> list[str]:
    rows = []
    for series, fit in fits.items():
        shown_reason = fit.ci_reason if fit.ci_reason != "no bootstrap requested" else ""
        note = "; ".join(text for text in (fit.note, shown_reason) if text)
        rows.append([series, str(fit.n_points), _num(fit.alpha), _interval(fit.ci, "alpha"), _num(fit.c),
                     _interval(fit.ci, "c"), _num(fit.a), _interval(fit.ci, "a"), _num(fit.rmse_log, 3), note])
    return _table(["precision", "cells", "α", "α CI", "c", "c CI", "a", "a CI", "RMS log resid.", "note"], rows)


def _fits_section(fits: LawFits, metric: str) -> list[str]:
    lines = [f"## Fitted power laws: {metric} = a·x^(−α) + c", ""]
    for family, family_fits in fits.families.items():
        for axis, label in (("mt_bits", "MT"), ("ct_bits", "CT")):
            lines += [f"### {family_title(family)} vs {label}", ""]
            lines += _power_table(family_fits.by_axis(axis)) + [""]
    return lines


def _bivariate_row(name: str, value: float, law: BivariateFit) -> list[str]:
    return [name, _num(value), _interval(law.ci, name)]


def _bivariate_section(fits: LawFits, metric: str) -> list[str]:
    lines = [f"## Bivariate law: {metric} = A·N^(−α)·b^(−β)·b_a^(−γ) + E", "",
             "N = parameters, b = MT / N (bits per parameter), b_a = activation bits; fitted across every "
             "precision, format and method of a family (γ only when activation bits vary). With MT = N·b this is "
             "A·MT^(−α)·b^(α−β)·b_a^(−γ) + E: at equal MT, fewer bits per parameter (and more parameters) "
             "help exactly when β < α.", ""]
    for family, family_fits in fits.families.items():
        law = family_fits.bivariate
        lines += [f"### {family_title(family)}", ""]
        if not law.ok:
            lines += [f"Not fitted: {law.note}", ""]
            continue
        names = [("A", law.A), ("alpha", law.alpha), ("beta", law.beta)]
        names += [("gamma", law.gamma)] if law.fit_gamma else []
        names += [("E", law.E)]
        lines += _table(["parameter", "value", "CI"], [_bivariate_row(n, v, law) for n, v in names])
        trade = 2.0 ** (law.beta - law.alpha)
        lines += ["", f"{law.n_points} cells, RMS log residual {_num(law.rmse_log, 3)}"
                  + (f"; intervals: {law.ci_reason}" if law.ci_reason else "") + ". "
                  f"β − α = {law.beta - law.alpha:+.3f}: at a fixed MT, halving the bits per parameter (doubling N) "
                  f"multiplies the reducible part of {metric} by {trade:.3g} "
                  f"({'better' if trade < 1 else 'worse' if trade > 1 else 'no change'}).", ""]
    return lines


def _choice_text(choice: Optional[pareto.BudgetChoice]) -> tuple[str, str]:
    if choice is None:
        return "nothing fits", "–"
    return f"{choice.series} ({choice.model})", _num(choice.fid)


def _budget_section(cells: Sequence[Cell], fits: LawFits, metric: str) -> list[str]:
    lines = ["## Which precision wins at which budget", "",
             "Observed: the best measured cell within the budget. Fitted: the lowest fitted curve evaluated at the "
             "budget (capped at each precision's largest trained size); the model named is the largest trained "
             "one of that precision within the budget.", ""]
    for family in families_of(cells):
        family_fits = fits.families.get(family)
        for axis, label in (("mt_bits", "MT"), ("ct_bits", "CT")):
            budgets = pareto.budget_grid(cells, family, axis, _BUDGET_POINTS)
            table = pareto.best_under_budget(cells, family, budgets, axis,
                                             family_fits.by_axis(axis) if family_fits else None)
            rows = []
            for entry in table:
                observed, observed_fid = _choice_text(entry.observed)
                fitted, fitted_fid = _choice_text(entry.fitted)
                rows.append([_num(entry.budget_bits / _BITS_PER_MB), observed, observed_fid, fitted, fitted_fid])
            lines += [f"### {family_title(family)}, budget in {label}", ""]
            lines += _table([f"{label} budget (MB)", "best observed", metric, "best by fitted curves",
                             f"predicted {metric}"], rows)
            frontier = pareto.pareto_frontier(cells, family, axis)
            lines += ["", f"Pareto frontier ({label} vs {metric}): " + ", ".join(
                f"{c.model} {c.series} ({_num(c.x(axis) / _BITS_PER_MB)} MB, {_num(c.fid)})" for c in frontier), ""]
    return lines


def _draws_text(draws: MetricDraws) -> str:
    sources = []
    if draws.paired:
        sources.append(f"{draws.paired} cells jointly from their stored jackknife replicates, so that sampling "
                       "noise the cells of one seed share (the same noise and labels) stays shared")
    if draws.independent:
        sources.append(f"{draws.independent} cells independently from their interval's standard error")
    return "; ".join(sources + ["cells without either as measured"])


def _curve_table(comparisons: Sequence[pareto.SeriesComparison], axis_name: str) -> list[str]:
    rows = []
    for c in comparisons:
        if not c.compared:
            rows.append([c.series, c.position, "–", "–", "–", "–", "–"])
            continue
        low, high = c.log_ratio_interval
        interval = f"[{low:+.3f}, {high:+.3f}]" if math.isfinite(low) and math.isfinite(high) else "–"
        shares = ", ".join(f"{p} {share:.0%}" for p, share in sorted(c.draw_shares.items(), key=lambda i: -i[1]))
        rows.append([c.series, c.position, f"{c.frac_lower:.0%}", f"{c.mean_log_ratio:+.3f}", interval,
                     shares or "–", "yes" if c.resolved else f"**{c.resolved_position}**"])
    level = f"{pareto.INTERVAL_LEVEL:.0%}"
    return _table(["precision", "position (point fits)", f"{axis_name} range lower", "mean log ratio",
                   f"{level} interval", "positions in the draws", "resolved"], rows)


def _counterparts_lines(on_mt: Mapping[str, pareto.Verdict]) -> list[str]:
    """Appendix C.2: does each autoregressive family behave like its counterpart (LlamaGen ~ VAR, MAR ~ DiT)?"""
    pairs = [(f, c) for f, c in pareto.COUNTERPARTS.items() if f in on_mt]
    if not pairs:
        return []
    lines = ["**Discrete or continuous (paper appendix C.2).** The paper pairs LlamaGen (discrete tokens, "
             "autoregressive) with VAR and MAR (continuous tokens, autoregressive) with DiT: if discreteness is what "
             "absorbs quantization error, each should behave like its partner. On MT, from the verdicts above:", ""]
    for family, partner in pairs:
        mine = pareto.behaviour(on_mt[family])
        if partner not in on_mt:
            lines.append(f"* {family_title(family)}: quantized curves {mine or 'not settled'}; no "
                         f"{family_title(partner)} cells in these results to compare with.")
            continue
        theirs = pareto.behaviour(on_mt[partner])
        result = pareto.follows(on_mt[family], on_mt[partner])
        lines.append(f"* {family_title(family)}'s quantized curves: {mine or 'not settled'} "
                     f"({on_mt[family].verdict}); {family_title(partner)}'s: {theirs or 'not settled'} "
                     f"({on_mt[partner].verdict}) → **{family_title(family)} "
                     f"{'is not resolved against' if result == pareto.UNRESOLVED else result} "
                     f"{family_title(partner)}**.")
    return lines + [""]


def _verdict_section(cells: Sequence[Cell], fits: LawFits, draws: Optional[MetricDraws] = None) -> list[str]:
    lines = ["## Verdict on the paper's finding", "",
             f"The paper reports that VAR's quantized curves lie lower-left of its {BASELINE_SETTING} curve (at equal "
             "model bits the quantized models are better) while DiT's do not. Each quantized curve is compared with "
             f"the {BASELINE_SETTING} curve on the bit range both cover: lower-left when its fitted curve is lower "
             f"on ≥ {pareto.LOWER_LEFT_FRACTION:.0%} of that range, upper-right when on ≤ "
             f"{pareto.UPPER_RIGHT_FRACTION:.0%}, crossing otherwise. A family's claim holds when ≥ 2/3 of its "
             "compared curves agree with it (crossing counts half), does not hold when ≤ 1/3 do, and is mixed in "
             "between.", ""]
    if draws is not None:
        lines += [f"How sure: every cell's metric is redrawn {draws.n_draws} times (seed {draws.seed}) from its "
                  f"sampling noise: {_draws_text(draws)}. Every curve is refitted to each draw, and a curve's "
                  f"position is resolved when ≥ {pareto.RESOLVED_AGREEMENT:.0%} of the draws give it; otherwise "
                  "it is **not resolved**, and every position more than "
                  f"{1 - pareto.RESOLVED_AGREEMENT:.0%} of the draws give stays possible. A family's verdict "
                  "stands when the lowest and the highest lower-left share those possible positions allow give "
                  "the same verdict, and is **not resolved** otherwise. Mean log ratio: the mean of "
                  f"log(quantized / {BASELINE_SETTING}) over the shared "
                  f"range (negative: quantized lower), with the {pareto.INTERVAL_LEVEL:.0%} percentile interval of "
                  "the draws.", ""]
    on_mt = pareto.verdicts(cells, fits, "mt_bits", draws=draws)
    on_ct = pareto.verdicts(cells, fits, "ct_bits", draws=draws)
    order = FAMILY_ORDER
    shown = set(on_mt) | {"var", "dit"}  # the main claims are always mentioned; the appendix ones when present
    for family in sorted(shown, key=lambda f: (order.get(f, len(order)), f)):
        if family not in on_mt:
            lines += [f"* **{family_title(family)}**: no cells in these results, so the paper's claim about "
                      f"{family_title(family)} could not be checked.", ""]
            continue
        mt, ct = on_mt[family], on_ct[family]
        claim = mt.claim or f"no claim in the paper about {family_title(family)}"
        positions = "; ".join(f"{c.series}: {c.position}" + (f" ({c.frac_lower:.0%} of range lower)"
                                                              if c.compared else "") for c in mt.comparisons)
        law = fits.families[family].bivariate if family in fits.families else None
        law_text = ""
        if law is not None and law.ok:
            favours_quantized = law.beta < law.alpha
            law_text = (f" The bivariate law has β − α = {law.beta - law.alpha:+.3f}, so at equal MT it "
                        f"{'favours' if favours_quantized else 'does not favour'} fewer bits per parameter"
                        + (f", {'in line with' if favours_quantized == pareto.PAPER_CLAIMS[family] else 'against'}"
                           f" the paper's claim" if family in pareto.PAPER_CLAIMS else "") + ".")
        if draws is None:
            lines.append(f"* **{family_title(family)}** — claim: {claim}. Result on MT: **{mt.verdict}** "
                         f"({mt.explanation}). On CT: {ct.verdict} ({ct.explanation}). Per curve on MT: "
                         f"{positions or 'none'}.{law_text}")
            lines.append("")
            continue
        lines += [f"* **{family_title(family)}** — claim: {claim}. Result on MT: **{mt.verdict}** "
                  f"({mt.explanation}). On CT: {ct.verdict} ({ct.explanation}).{law_text} Per curve on MT:", ""]
        lines += (_curve_table(mt.comparisons, "MT") if mt.comparisons else ["No quantized curve."]) + [""]
    lines += _counterparts_lines(on_mt)
    if draws is None:
        lines.append("These verdicts are computed from the fitted curves of this run; with few sizes per curve the "
                     "intervals above are wide, so treat a verdict whose curves mostly cross as weak evidence.")
    else:
        lines.append("The draws carry the cells' sampling noise at their sample count into the curves; they do not "
                     "cover the choice of model sizes or of the law's form, so with few sizes per curve even a "
                     "resolved position can move when sizes are added.")
    return lines + [""]


def _samples_section(cells: Sequence[Cell], samples_root: Optional[pathlib.Path], out_dir: pathlib.Path,
                     metric: str) -> list[str]:
    """Sample grids (a record's ``samples_image``, relative to `samples_root`) of each family's largest model."""
    if samples_root is None:
        return []
    lines: list[str] = []
    for family in families_of(cells):
        with_images = [c for c in cells if c.family == family and c.raw.get("samples_image")
                       and (samples_root / str(c.raw["samples_image"])).is_file()]
        if not with_images:
            continue
        largest = max(with_images, key=lambda c: c.params).model
        order = {series: i for i, series in enumerate(series_of(cells, family))}
        shown = sorted((c for c in with_images if c.model == largest), key=lambda c: (order.get(c.series, 0), c.key))
        if not lines:
            lines += ["## Samples", "",
                      "The first samples of each digit (columns 0-9) drawn by each family's largest model at every "
                      "precision, with the same noise and labels; all cells' grids are next to the results.", ""]
        lines += [f"### {family_title(family)}: {largest}", ""]
        rows = []
        for c in shown:
            image = os.path.relpath(samples_root / str(c.raw["samples_image"]), out_dir)
            rows.append([c.series, c.method, _num(c.fid), f"![{c.key.replace('|', ' ')}]({pathlib.Path(image).as_posix()})"])
        lines += _table(["precision", "method", metric, "samples"], rows) + [""]
    return lines


def _analysis_section(root: Optional[pathlib.Path], out_dir: pathlib.Path) -> list[str]:
    """What ``bitlaws analyze`` found, when the sweep folder has an ``analysis/`` folder with its JSON files."""
    if root is None:
        return []
    directory = root / ANALYSIS_DIR
    body = summary_lines(directory, relative_to=out_dir)
    if not body:
        return []
    shown = os.path.relpath(directory, out_dir)
    return ["## Error-tolerance analyses (paper section 3.2)", "",
            f"From `bitlaws analyze` (JSON, PNG, SVG and `{SUMMARY_FILE}` in `{shown}/`).", "", *body]


def write_report(rows: Union[RowsLike, Sequence[Cell]], out_dir: Union[str, pathlib.Path],
                 fits: Optional[LawFits] = None, plots: Sequence[pathlib.Path] = (),
                 source: Optional[str] = None, n_boot: int = 200, seed: int = 0,
                 samples_root: Optional[Union[str, pathlib.Path]] = None,
                 notices: Sequence[str] = (), n_draws: int = DEFAULT_DRAWS) -> pathlib.Path:
    """Writes ``out_dir/report.md`` and returns its path.

    Args:
        rows: Rows, cells, or a results file / sweep directory.
        out_dir: Output directory (created if needed).
        fits: Precomputed `fit_all` result; computed with `n_boot`, `seed` when None.
        plots: Plot files to link (relative to `out_dir` when inside it).
        source: Where the rows came from, for the provenance section.
        n_boot: Bootstrap resamples when fitting here.
        seed: Bootstrap seed when fitting here, and the seed of the verdicts' draws.
        samples_root: Folder that records' ``samples_image`` paths are relative to (the sweep folder); when
            given, a Samples section shows each family's largest model at every precision.
        notices: What reading the rows skipped (`ResultsRead.notices`), listed in the provenance section.
        n_draws: Draws of the cells' metrics behind the verdicts when any cell has an interval
            (`bitlaws.laws.uncertainty.metric_draws`; stored jackknife replicates are read under `samples_root`);
            0 decides the verdicts on the point fits alone.

    Raises:
        ValueError: No usable cells, or cells with intervals that share a key.
    """
    if isinstance(rows, (str, pathlib.Path)):
        source = source or str(rows)
    if isinstance(rows, (list, tuple)) and rows and all(isinstance(c, Cell) for c in rows):
        cells, n_rows = list(rows), len(rows)
    else:
        row_list = as_rows(rows)
        cells, n_rows = cells_from_rows(row_list), len(row_list)
    if not cells:
        raise ValueError("no usable cells for the report (every row lacks a finite fid / mt_bits / ct_bits)")
    fits = fits if fits is not None else fit_all(cells, n_boot=n_boot, seed=seed)
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metric = metric_label(cells)
    families = ", ".join(family_title(f) for f in families_of(cells))
    lines = ["# Bit-level scaling laws: report", "",
             f"Families: {families}. Precisions: "
             + ", ".join(sorted({s for f in families_of(cells) for s in series_of(cells, f)})) + ".", ""]
    lines += _provenance(cells, n_rows, fits, source, notices)
    root = pathlib.Path(samples_root) if samples_root is not None else None
    draws = metric_draws(cells, root, n_draws=n_draws, seed=seed) if n_draws > 0 else None
    lines += _verdict_section(cells, fits, draws)
    lines += uncertainty_section(cells, root, metric)
    lines += _analysis_section(root, out_dir)
    lines += method_tables(cells, metric, draws)
    lines += qat_section(cells, metric)
    png = [pathlib.Path(p) for p in plots if pathlib.Path(p).suffix == ".png"]
    if png:
        lines += ["## Plots", ""]
        for path in png:
            shown = path.name if path.parent.resolve() == out_dir.resolve() else str(path)
            lines += [f"![{path.stem}]({shown})", ""]
    lines += _samples_section(cells, root, out_dir, metric)
    lines += _fits_section(fits, metric)
    lines += _bivariate_section(fits, metric)
    lines += _budget_section(cells, fits, metric)
    lines += _cells_table(cells)
    path = out_dir / REPORT_FILE
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


@dataclasses.dataclass(frozen=True)
class AnalysisOutputs:
    """What `analyze` wrote, and what it skipped while reading the results (``notices``, also in the report)."""

    report: pathlib.Path
    plots: tuple[pathlib.Path, ...]
    fits: LawFits
    notices: tuple[str, ...] = ()


def analyze(results: Union[str, pathlib.Path], out_dir: Optional[Union[str, pathlib.Path]] = None, *,
            n_boot: int = 200, seed: int = 0, workers: int = 1) -> AnalysisOutputs:
    """The post-sweep step: fits with bootstrap intervals, ``scaling_{mt,ct}.{png,svg}`` and ``report.md``.

    Args:
        results: ``results.jsonl`` or the sweep directory holding it.
        out_dir: Where to write (default: the sweep directory).
        n_boot: Bootstrap resamples (>= 0).
        seed: Bootstrap seed.
        workers: Processes for the bootstrap fits (`fit_all`; the results do not depend on it).

    The results file is only read (see `bitlaws.laws.results_file`); a cut-off last line is skipped and
    named in ``notices`` and in the report.

    Raises:
        FileNotFoundError: no results there.
        ValueError: bad arguments, an unreadable results line (file and line named), no usable cells, or an
            output path that is a file (all before anything is written).
    """
    from bitlaws.laws.plots import plot_scaling  # pylint: disable=g-import-not-at-top  (matplotlib is optional)

    if n_boot < 0:
        raise ValueError(f"n_boot (bootstrap resamples) must be >= 0, got {n_boot}")
    results = pathlib.Path(results)
    out_dir = pathlib.Path(out_dir) if out_dir is not None else (results if results.is_dir() else results.parent)
    read = read_results(results)
    cells = cells_from_rows(read.rows)
    if not cells:
        raise ValueError(f"no usable cells in {read.path}")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"report output folder {out_dir} is an existing file")
    fits = fit_all(cells, n_boot=n_boot, seed=seed, workers=workers)
    plots = plot_scaling(cells, out_dir, fits)
    report = write_report(read.rows, out_dir, fits=fits, plots=plots, source=str(results), seed=seed,
                          samples_root=results if results.is_dir() else results.parent, notices=read.notices)
    return AnalysisOutputs(report, tuple(plots), fits, read.notices)
