"""The sweep engine: grid of model × precision setting × format × method × seed, resumable and kill-safe.

Public API::

    from bitlaws.sweep import Cell, expand_grid, ResultsFile, run_sweep, run_sweep_from_config

`run_sweep` and friends live in `bitlaws.sweep.runner` and are imported lazily. The command line is
``bitlaws sweep --config FILE.py[:ARG] --out DIR``.
"""

from bitlaws.sweep.grid import Cell, GridExpansion, expand_grid, expand_grid_report
from bitlaws.sweep.results import ResultsFile, read_records
from bitlaws.sweep.settings import (MethodContext, NotApplicable, Setting, get_method, materialize_for, method_names,
                                    parse_setting, quant_options, quant_rules, quantize_for_cell)

_RUNNER_NAMES = ("SweepSummary", "register_evaluator", "run_sweep", "run_sweep_from_config")

__all__ = [
    "Cell", "GridExpansion", "MethodContext", "NotApplicable", "ResultsFile", "Setting", "expand_grid",
    "expand_grid_report", "get_method", "materialize_for", "method_names", "parse_setting", "quant_options",
    "quant_rules", "quantize_for_cell", "read_records", *_RUNNER_NAMES,
]


def __getattr__(name: str):
    if name in _RUNNER_NAMES:
        from bitlaws.sweep import runner  # pylint: disable=g-import-not-at-top

        return getattr(runner, name)
    raise AttributeError(f"module 'bitlaws.sweep' has no attribute {name!r}")
