"""The report's method comparison: the paper's PTQ tables (appendix A, tables 2-4) computed from a sweep.

For each family and each (setting, format) that ran under more than one quantization method, one table: rows
are the family's models (smallest first), columns the methods, entries the metric (lower is better; the best
of a row in bold). Below each family: each method's geometric-mean ratio to RTN per precision, how often it
beats RTN on the same (model, setting, format), and the bit-level verdict (`bitlaws.laws.pareto.verdicts`)
recomputed on each method's cells alone (with the float baseline), so the report says whether any PTQ method
changes the verdict RTN gives.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

from bitlaws.laws import pareto
from bitlaws.laws.uncertainty import MetricDraws
from bitlaws.laws.fit import BASELINE_SETTING, Cell, families_of, family_title, fit_all, mean_over_seeds

RTN = "rtn"
# The paper's tables 2-5 (PTQ, then the distillation losses); others after, by name.
_METHOD_ORDER = ("rtn", "gptq", "gptvq", "omniquant", "awq", "smoothquant", "qat:mse", "qat:js", "qat:fkl",
                 "qat:rkl", "qat:topkld")
_SETTING_ORDER = ("W8A16", "W4A16", "W3A16", "W8A8", "W4A8")


def _num(value: float) -> str:
    return f"{value:.4g}" if math.isfinite(value) else "–"


def _setting_key(pair: tuple[str, str]) -> tuple:
    setting, fmt = pair
    order = _SETTING_ORDER.index(setting) if setting in _SETTING_ORDER else len(_SETTING_ORDER)
    return (order, setting, fmt)


def quantized_methods(cells: Sequence[Cell]) -> list[str]:
    """Methods of the quantized (non-baseline) cells: RTN first, then the paper's order, then the rest by name."""
    names = {c.method for c in cells if not c.is_baseline}
    order = {m: i for i, m in enumerate(_METHOD_ORDER)}
    return sorted(names, key=lambda m: (order.get(m, len(order)), m))


def method_tables(cells: Sequence[Cell], metric: str, draws: Optional[MetricDraws] = None) -> list[str]:
    """Markdown lines of the method comparison (empty when the cells hold one method only).

    `draws` (`bitlaws.laws.uncertainty.metric_draws` of the cells) makes the per-method bit-level verdicts say
    "not resolved" where the cells' sampling noise leaves a curve's position open, as the main verdict does.
    """
    methods = quantized_methods(cells)
    if len(methods) < 2:
        return []
    lines = ["## Methods (the paper's PTQ and distillation tables)", "",
             f"{metric} per model, precision and method (lower is better; the best of each row in bold). A method "
             f"beats RTN on a (model, precision) when its {metric} is lower than RTN's there.", ""]
    for family in families_of(cells):
        mine = [c for c in cells if c.family == family]
        by_key = mean_over_seeds(mine)
        models = sorted({c.model for c in mine}, key=lambda m: min(c.params for c in mine if c.model == m))
        pairs = sorted({(c.setting, c.fmt) for c in mine if not c.is_baseline}, key=_setting_key)
        lines += [f"### {family_title(family)}", ""]
        wins = {m: [0, 0] for m in methods if m != RTN}
        ratios: dict[tuple[str, str], dict[str, list[float]]] = {}  # (setting, fmt) -> method -> value / RTN's
        for setting, fmt in pairs:
            present = [m for m in methods if any((mod, setting, fmt, m) in by_key for mod in models)]
            if len(present) < 2:
                continue
            lines += [f"**{setting}-{fmt}**", "", "| model | " + " | ".join(present) + " |",
                      "|---|" + "|".join("---" for _ in present) + "|"]
            for model in models:
                values = [by_key.get((model, setting, fmt, m), math.nan) for m in present]
                finite = [v for v in values if math.isfinite(v)]
                best = min(finite) if finite else math.nan
                shown = [f"**{_num(v)}**" if v == best else _num(v) for v in values]
                lines.append(f"| {model} | " + " | ".join(shown) + " |")
                rtn = by_key.get((model, setting, fmt, RTN), math.nan)
                for method, value in zip(present, values):
                    if method != RTN and math.isfinite(value) and math.isfinite(rtn):
                        wins[method][0] += value < rtn
                        wins[method][1] += 1
                        if value > 0 and rtn > 0:
                            ratios.setdefault((setting, fmt), {}).setdefault(method, []).append(value / rtn)
            lines.append("")
        lines += _ratio_table(ratios, [m for m in methods if m != RTN], metric)
        lines += _summary(family, mine, wins, draws)
    return lines


def _ratio_table(ratios: dict[tuple[str, str], dict[str, list[float]]], methods: Sequence[str],
                 metric: str) -> list[str]:
    """One row per precision: each method's geometric mean over the sizes of its metric / RTN's, and its wins."""
    shown = [m for m in methods if any(m in by_method for by_method in ratios.values())]
    if not ratios or not shown:
        return []
    lines = [f"Relative to RTN: geometric mean over the sizes of {metric}(method) / {metric}(RTN) (below 1: better "
             "than RTN); in brackets the sizes where the method beats RTN.", "",
             "| precision | " + " | ".join(shown) + " |", "|---|" + "|".join("---" for _ in shown) + "|"]
    for (setting, fmt), by_method in ratios.items():
        entries = []
        for method in shown:
            values = by_method.get(method, [])
            if not values:
                entries.append("–")
                continue
            mean = math.exp(sum(math.log(v) for v in values) / len(values))
            entries.append(f"{mean:.2f} ({sum(v < 1 for v in values)}/{len(values)})")
        lines.append(f"| {setting}-{fmt} | " + " | ".join(entries) + " |")
    return lines + [""]


def _summary(family: str, cells: Sequence[Cell], wins: dict[str, list[int]],
             draws: Optional[MetricDraws] = None) -> list[str]:
    lines = []
    for method, (won, total) in wins.items():
        if total:
            lines.append(f"* **{method}** beats RTN in {won} of {total} comparable cells: "
                         f"{'better than RTN on most' if won * 2 > total else 'not better than RTN on most'}.")
    verdicts = {}
    baseline = [c for c in cells if c.setting == BASELINE_SETTING]
    for method in quantized_methods(cells):
        subset = baseline + [c for c in cells if c.method == method and not c.is_baseline]
        try:
            verdict = pareto.verdicts(subset, fit_all(subset, n_boot=0), draws=draws).get(family)
        except ValueError:
            verdict = None
        if verdict is not None:
            verdicts[method] = verdict.verdict
    if verdicts:
        text = "; ".join(f"{m}: {v}" for m, v in verdicts.items())
        rtn = verdicts.get(RTN)
        changed = sorted(m for m, v in verdicts.items() if m != RTN and rtn is not None and v != rtn)
        lines.append(f"* Bit-level verdict on MT per method (its cells + {BASELINE_SETTING}): {text}. "
                     + (f"Changed from RTN's by: {', '.join(changed)}." if changed
                        else "No other method changes RTN's verdict." if rtn is not None else ""))
    return lines + [""]
