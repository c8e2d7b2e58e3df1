"""The report's distillation section: the paper's table 5 questions answered from a sweep's ``qat:*`` cells.

The per-method tables themselves come from `bitlaws.laws.methods_report` (QAT losses are methods like any
other). This section states, from the data, for each family with distillation cells:

1. whether **TopKLD beats forward and reverse KL**: on every (model, precision) where both ran, how often
   ``qat:topkld``'s metric is lower, and the geometric mean of the ratio;
2. whether **distillation moves the low-bit curves past the higher-bit ones** (the paper: with TopKLD, W3A16
   beats W4A16 and W4A8 beats W8A8): the fitted MT curve of ``W3A16-<fmt>-<loss>`` is compared with the
   W4A16 curve of RTN and of the same loss (and ``W4A8`` with ``W8A8``), with the lower-left test of
   `bitlaws.laws.pareto.compare_to_baseline` (lower on >= 2/3 of the shared bit range = past it).
"""

from __future__ import annotations

import math
from typing import Sequence

from bitlaws.laws import pareto
from bitlaws.laws.fit import Cell, families_of, family_title, fit_all, mean_over_seeds, series_label

QAT_PREFIX = "qat:"
TOPKLD, FKL, RKL = "qat:topkld", "qat:fkl", "qat:rkl"
CROSSINGS = (("W3A16", "W4A16"), ("W4A8", "W8A8"))  # (low-bit setting, the setting it should pass)


def qat_methods(cells: Sequence[Cell]) -> list[str]:
    return sorted({c.method for c in cells if c.method.startswith(QAT_PREFIX)})


def _head_to_head(cells: Sequence[Cell], ours: str, theirs: str) -> str | None:
    by_key = mean_over_seeds(cells)
    pairs = [(value, by_key[key[:3] + (theirs,)]) for key, value in by_key.items()
             if key[3] == ours and key[:3] + (theirs,) in by_key]
    pairs = [(a, b) for a, b in pairs if math.isfinite(a) and math.isfinite(b) and a > 0 and b > 0]
    if not pairs:
        return None
    won = sum(a < b for a, b in pairs)
    ratio = math.exp(sum(math.log(a / b) for a, b in pairs) / len(pairs))
    verdict = "beats" if won * 2 > len(pairs) else "does not beat"
    return (f"* **{ours}** {verdict} **{theirs}**: lower in {won} of {len(pairs)} (model, precision) cells, "
            f"geometric-mean ratio {ratio:.3f}.")


def _crossing_lines(cells: Sequence[Cell], family: str, methods: Sequence[str]) -> list[str]:
    try:
        fits = fit_all(cells, n_boot=0).families[family].by_axis("mt_bits")
    except (KeyError, ValueError):
        return []
    lines = []
    formats = sorted({c.fmt for c in cells if not c.is_baseline})
    for low, high in CROSSINGS:
        for fmt in formats:
            for method in methods:
                series = series_label(low, fmt, method)
                if series not in fits:
                    continue
                for reference in (series_label(high, fmt, "rtn"), series_label(high, fmt, method)):
                    if reference not in fits:
                        continue
                    found = [c for c in pareto.compare_to_baseline(fits, baseline=reference) if c.series == series]
                    if not found or not found[0].compared:
                        why = found[0].position if found else "no fit"
                        lines.append(f"* {series} vs {reference}: not comparable ({why}).")
                        continue
                    comparison = found[0]
                    moved = "moves past" if comparison.position == "lower-left" else (
                        "does not move past" if comparison.position == "upper-right" else "crosses")
                    lines.append(f"* {series} {moved} {reference} on MT: lower on {comparison.frac_lower:.0%} of "
                                 f"the shared bit range (mean log ratio {comparison.mean_log_ratio:+.3f}).")
    return lines


def qat_section(cells: Sequence[Cell], metric: str) -> list[str]:
    """Markdown lines of the distillation section (empty when no ``qat:*`` cells ran)."""
    methods = qat_methods(cells)
    if not methods:
        return []
    lines = ["## Distillation (QAT; the paper's table 5 questions)", "",
             f"{metric} of the distilled models is in the method tables above (columns `qat:<loss>`). From the "
             f"same cells:", ""]
    for family in families_of(cells):
        mine = [c for c in cells if c.family == family]
        present = [m for m in methods if any(c.method == m for c in mine)]
        if not present:
            continue
        lines += [f"### {family_title(family)}", ""]
        for other in (FKL, RKL):
            if TOPKLD in present and other in present:
                lines.append(_head_to_head(mine, TOPKLD, other) or f"* {TOPKLD} and {other} share no cell.")
        crossings = _crossing_lines(mine, family, present)
        lines += crossings or ["* No distilled low-bit curve could be compared with a higher-bit one (too few "
                               "models per curve)."]
        lines.append("")
    return lines
