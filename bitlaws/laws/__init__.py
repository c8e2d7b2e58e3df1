"""Scaling laws of quantized generative models: fits, Pareto analysis, plots, report and the bit-budget advisor.

Public API::

    from bitlaws.laws import (load_results, read_results, fit_power_law, bootstrap, fit_family, fit_bivariate,
                              fit_all, pareto_frontier, best_under_budget, verdicts, plot_scaling, write_report,
                              analyze, advise, render_advice, metric_draws, MetricDraws)

``plot_scaling`` (matplotlib) is imported lazily so that the fits work without the ``demo`` extra.
"""

from typing import Any

from bitlaws.laws.advise import Advice, BudgetTooSmallError, Candidate, advise, render_advice
from bitlaws.laws.fit import (BivariateFit, BootstrapResult, Cell, FamilyFits, LawFits, PowerLawFit, bootstrap,
                              cells_from_rows, fit_all, fit_bivariate, fit_bivariate_arrays, fit_family,
                              fit_power_law, load_results, parse_setting, series_label)
from bitlaws.laws.pareto import (BudgetChoice, BudgetRow, SeriesComparison, Verdict, best_under_budget,
                                 budget_grid, compare_to_baseline, family_verdict, pareto_frontier, verdicts)
from bitlaws.laws.report import AnalysisOutputs, analyze, write_report
from bitlaws.laws.results_file import ResultsRead, read_results
from bitlaws.laws.uncertainty import MetricDraws, metric_draws

__all__ = [
    "Advice", "AnalysisOutputs", "BivariateFit", "MetricDraws", "BootstrapResult", "BudgetChoice", "BudgetRow",
    "BudgetTooSmallError", "Candidate", "Cell", "FamilyFits", "LawFits", "PowerLawFit", "ResultsRead",
    "SeriesComparison", "Verdict", "advise", "analyze", "best_under_budget", "bootstrap", "budget_grid",
    "cells_from_rows", "compare_to_baseline", "family_verdict", "fit_all", "fit_bivariate", "fit_bivariate_arrays",
    "fit_family", "fit_power_law", "load_results", "metric_draws", "pareto_frontier", "parse_setting", "plot_scaling",
    "read_results", "render_advice", "series_label", "verdicts", "write_report",
]


def __getattr__(name: str) -> Any:
    if name == "plot_scaling":
        from bitlaws.laws.plots import plot_scaling  # pylint: disable=g-import-not-at-top

        return plot_scaling
    raise AttributeError(f"module 'bitlaws.laws' has no attribute {name!r}")
