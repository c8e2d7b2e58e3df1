"""Runs a sweep: evaluates every unfinished cell of the grid and appends one record per finished cell.

Evaluators are registered by name: ``register_evaluator(name, factory, check=None)`` where ``factory(config)``
returns ``evaluate(cell) -> dict`` of metrics, at least ``fid``, ``mt_bits`` and ``ct_bits`` (anything else JSON
serialisable is kept, e.g. ``metric_name``). A sweep config names its evaluator in ``config.evaluator``
and, when registering it needs an import, the module in ``config.evaluator_module``.

Pre-check: the optional ``check(config, cells)`` registered with the evaluator is called once with every
unfinished cell before anything is evaluated or written (no output folder, ``config.json`` or
``results.jsonl`` is created when it fails). It must be cheap (e.g. abstract models from ``nnx.eval_shape``)
and raise ONE ValueError naming what cannot work (e.g. a ``quant.weight_group_size`` that does not divide a
layer's reduction axis); `check_each` builds that error from a per-cell check. The runner itself checks the
``quant`` block (`check_quant_block`) and that the output path is not a file.

Output folder::

    OUT/config.json     snapshot of the sweep config (a resume with different grid fields is refused)
    OUT/results.jsonl   one record per finished cell (see `bitlaws.sweep.results`)

Resuming: rerunning the same command skips every cell whose key is already in ``results.jsonl``. A cell
whose evaluation raises is not recorded; the error is logged with the cell key and the sweep stops, or
goes on when ``config.stop_on_error`` is False. Ctrl-C stops cleanly after keeping every finished cell.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import importlib.metadata
import json
import math
import os
import pathlib
import platform
import sys
import time
import traceback
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import ml_collections
from tqdm import tqdm

from bitlaws import configlib
from bitlaws.sweep import grid as grid_lib
from bitlaws.sweep import parallel, settings
from bitlaws.sweep.grid import Cell
from bitlaws.sweep.results import REQUIRED_FIELDS, ResultsFile, exclusive_lock, read_records

RESULTS_NAME = "results.jsonl"
SNAPSHOT_NAME = "config.json"
REQUIRED_METRICS = ("fid", "mt_bits", "ct_bits")
# Config leaves that do not change what a cell's record means; they may differ on resume. A config can
# add dotted paths in ``config.runtime_fields``.
RUNTIME_FIELDS = frozenset({"stop_on_error", "sleep_s", "progress", "runtime_fields", "description", "out_dir",
                            "config_file", "compilation_cache"})
# ``config.compilation_cache = True``: JAX's persistent compilation cache in this folder of the sweep's output.
COMPILATION_CACHE_DIR = "xla_cache"

EvaluateFn = Callable[[Cell], Mapping[str, Any]]
EvaluatorFactory = Callable[[ml_collections.ConfigDict], EvaluateFn]
CheckFn = Callable[[ml_collections.ConfigDict, Sequence[Cell]], None]
_EVALUATORS: dict[str, EvaluatorFactory] = {}
_CHECKS: dict[str, CheckFn] = {}
_MORE_KEYS_SHOWN = 3  # failing cells named in a pre-check error besides the first


def register_evaluator(name: str, factory: EvaluatorFactory, *, check: Optional[CheckFn] = None) -> None:
    """Registers ``factory(config) -> evaluate(cell) -> metrics`` under `name` (re-registering replaces it).

    Args:
        name: The name sweep configs give in ``config.evaluator``.
        factory: Builds the evaluate function from the sweep config.
        check: Optional pre-check ``check(config, unfinished cells)`` run before anything is evaluated or
            written; raises ValueError (see the module docstring).
    """
    _EVALUATORS[name] = factory
    if check is None:
        _CHECKS.pop(name, None)
    else:
        _CHECKS[name] = check


def evaluator_names() -> list[str]:
    return sorted(_EVALUATORS)


def get_evaluator(config: ml_collections.ConfigDict) -> EvaluatorFactory:
    """The factory named by ``config.evaluator``, importing ``config.evaluator_module`` first if set.

    Raises:
        ValueError: no ``evaluator`` field, or an unregistered name (the message lists registered ones).
    """
    module = config.get("evaluator_module", None)
    if module:
        importlib.import_module(module)
    name = config.get("evaluator", None)
    if not name:
        raise ValueError("sweep config has no 'evaluator' field")
    if name not in _EVALUATORS:
        raise ValueError(f"unknown sweep evaluator {name!r}; registered evaluators: {evaluator_names()}")
    return _EVALUATORS[name]


def get_check(config: ml_collections.ConfigDict) -> Optional[CheckFn]:
    """The pre-check registered with ``config.evaluator`` (None if it has none); call `get_evaluator` first."""
    return _CHECKS.get(config.get("evaluator", None) or "")


def check_each(cells: Sequence[Cell], check_one: Callable[[Cell], None],
               key: Callable[[Cell], Any] = lambda cell: cell.key) -> None:
    """Runs ``check_one(cell)`` once per distinct ``key(cell)``; raises ONE ValueError for all failures.

    The error names the first failing cell with its message and counts (and names a few of) the others.

    Raises:
        ValueError: ``check_one`` raised ValueError for at least one cell.
    """
    failed: list[tuple[str, str]] = []
    seen = set()
    for cell in cells:
        group = key(cell)
        if group in seen:
            continue
        seen.add(group)
        try:
            check_one(cell)
        except ValueError as e:
            failed.append((cell.key, str(e)))
    if not failed:
        return
    first_key, message = failed[0]
    others = [k for k, _ in failed[1:]]
    more = ""
    if others:
        shown = ", ".join(others[:_MORE_KEYS_SHOWN]) + (", ..." if len(others) > _MORE_KEYS_SHOWN else "")
        more = f" ({len(others)} more cell(s) fail this check: {shown})"
    raise ValueError(f"cell {first_key}: {message}{more}")


def check_quant_block(config: ml_collections.ConfigDict) -> None:
    """Checks the optional ``config.quant`` block (see `bitlaws.sweep.settings.quant_options`).

    Raises:
        ValueError: ``quant.weight_group_size`` is not None, 0 (one scale per output channel) or a positive
            integer; ``quant.weight_calibrator`` is not a string; ``quant.backend`` is not a known backend.
    """
    block = config.get("quant", None)
    if not block:
        return
    group = block.get("weight_group_size", None)
    if group is not None and (isinstance(group, bool) or not isinstance(group, int) or group < 0):
        raise ValueError(f"config field quant.weight_group_size must be 0 (one scale per output channel) or a "
                         f"positive group size, got {group!r}")
    calibrator = block.get("weight_calibrator", None)
    if calibrator is not None and not isinstance(calibrator, str):
        raise ValueError(f"config field quant.weight_calibrator must be a calibrator name, got {calibrator!r}")
    settings.materialize_for(config, "W16A16")  # quant.materialize and quant.packed_settings are valid
    settings.backend_for(config)  # quant.backend names a backend


def _finished_keys_read_only(path: pathlib.Path) -> set[str]:
    """Keys already in a results file, without repairing it (unreadable lines count as unfinished)."""
    return {record["key"] for record in read_records(path)} if path.is_file() else set()


@dataclasses.dataclass
class SweepSummary:
    """What one `run_sweep` call did.

    Attributes:
        out_dir: The output folder.
        results_path: Its ``results.jsonl``.
        total: Cells in the grid.
        already_done: Grid cells found finished at the start.
        evaluated: Keys finished by this call, in order.
        failed: ``(key, error message)`` of cells whose evaluation raised.
        left_out: ``(combination, reason)`` of grid combinations with no cell (e.g. W3 with fp).
        repairs: Messages of `ResultsFile.repair` (cut-off lines moved to ``results.jsonl.corrupt``).
        interrupted: True when Ctrl-C stopped the sweep.
        wall_s: Seconds this call took.
    """

    out_dir: pathlib.Path
    results_path: pathlib.Path
    total: int
    already_done: int
    evaluated: list[str] = dataclasses.field(default_factory=list)
    failed: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    left_out: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    repairs: list[str] = dataclasses.field(default_factory=list)
    interrupted: bool = False
    wall_s: float = 0.0

    @property
    def finished(self) -> int:
        return self.already_done + len(self.evaluated)

    @property
    def complete(self) -> bool:
        return self.finished == self.total

    @property
    def exit_code(self) -> int:
        """0 when every cell is finished, 130 after Ctrl-C, 1 otherwise."""
        if self.interrupted:
            return 130
        return 0 if self.complete else 1


def versions() -> dict[str, str]:
    """Versions recorded with every cell: python, jax, flax, numpy, bitlaws."""
    import flax  # pylint: disable=g-import-not-at-top
    import jax  # pylint: disable=g-import-not-at-top
    import numpy  # pylint: disable=g-import-not-at-top

    try:
        bitlaws_version = importlib.metadata.version("bitlaws")
    except importlib.metadata.PackageNotFoundError:
        bitlaws_version = "unknown"
    return {"python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
            "numpy": numpy.__version__, "bitlaws": bitlaws_version}


def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def make_record(cell: Cell, metrics: Mapping[str, Any], wall_s: float,
                version_info: Optional[Mapping[str, str]] = None) -> dict[str, Any]:
    """The results record of a finished cell.

    Raises:
        ValueError: `metrics` misses ``fid`` / ``mt_bits`` / ``ct_bits`` or sets a field the runner owns.
    """
    missing = [name for name in REQUIRED_METRICS if name not in metrics]
    if missing:
        raise ValueError(f"evaluator returned no {missing} for cell {cell.key}")
    reserved = sorted((set(REQUIRED_FIELDS) | {"params", "prng_seed"}).difference(REQUIRED_METRICS) & set(metrics))
    if reserved:
        raise ValueError(f"evaluator may not set the runner's fields {reserved} (cell {cell.key})")
    record: dict[str, Any] = {
        "key": cell.key, "model": cell.model, "setting": cell.setting, "format": cell.format,
        "method": cell.method, "params": dict(cell.params), "seed": cell.seed, "prng_seed": cell.prng_seed,
    }
    record.update(metrics)
    record["wall_s"] = round(float(wall_s), 4)
    record["versions"] = dict(version_info or versions())
    record["time"] = _utc_now()
    return record


# -------------------------------------------------------------------------------------------- snapshot

def config_snapshot(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as plain JSON data (tuples become lists), as stored in ``config.json``."""
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.loads(json.dumps(data, default=str, sort_keys=True))


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


def grid_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Dotted config fields that differ between two snapshots, ignoring runtime fields.

    A field is ignored when its last component is in `RUNTIME_FIELDS` or its dotted path is listed in the
    new snapshot's ``runtime_fields``.
    """
    ignored = set(new.get("runtime_fields") or ())
    flat_old, flat_new = _flatten(dict(old)), _flatten(dict(new))
    differing = []
    for field in sorted(set(flat_old) | set(flat_new)):
        if field.rsplit(".", 1)[-1] in RUNTIME_FIELDS or field in ignored:
            continue
        if flat_old.get(field, "<absent>") != flat_new.get(field, "<absent>"):
            differing.append(field)
    return differing


def _write_json_atomically(path: pathlib.Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_snapshot(out_dir: pathlib.Path, config: ml_collections.ConfigDict, *, force: bool = False) -> None:
    """Writes ``out_dir/config.json``, or checks that an existing one matches `config`.

    Raises:
        ValueError: the existing snapshot differs in grid-defining fields (named) and `force` is False.
    """
    path = out_dir / SNAPSHOT_NAME
    snapshot = config_snapshot(config)
    if path.exists() and not force:
        old = json.loads(path.read_text(encoding="utf-8"))
        differing = grid_differences(old, snapshot)
        if differing:
            flat_old, flat_new = _flatten(old), _flatten(snapshot)
            details = "; ".join(f"{f}: {flat_old.get(f, '<absent>')!r} -> {flat_new.get(f, '<absent>')!r}"
                                for f in differing)
            raise ValueError(f"{out_dir} holds a sweep with a different config ({details}); use another output "
                             f"folder, or force=True (--force) to resume into it anyway")
        if old == snapshot:
            return
    _write_json_atomically(path, snapshot)


# ------------------------------------------------------------------------------------------------- run

def _log_to(log: Callable[[str], Any], progress: bool) -> Callable[[str], Any]:
    """Routes `print` through tqdm while the bar is shown so lines do not tear it."""
    if progress and log is print:
        return lambda message: tqdm.write(str(message), file=sys.stderr)
    return log


def evaluate_cell(evaluate: EvaluateFn, cell: Cell, version_info: Mapping[str, str]) -> dict[str, Any]:
    """Runs `evaluate` on `cell` and returns its validated record (raises what the evaluator raises)."""
    start = time.perf_counter()
    metrics = evaluate(cell)
    wall_s = time.perf_counter() - start
    if not isinstance(metrics, Mapping):
        raise TypeError(f"evaluator returned {type(metrics).__name__}, not a mapping of metrics")
    record = make_record(cell, dict(metrics), wall_s, version_info)
    fid = record["fid"]
    if not isinstance(fid, (int, float)) or isinstance(fid, bool):
        raise TypeError(f"metric 'fid' must be a number, got {type(fid).__name__}")
    if math.isnan(fid):
        raise ValueError("metric 'fid' is NaN")
    return record


def with_out_dir(config: ml_collections.ConfigDict, out: pathlib.Path) -> ml_collections.ConfigDict:
    """A copy of `config` with ``out_dir`` set to the sweep folder (absolute), for evaluators that write files.

    An evaluator may write per-cell artifacts (e.g. sample grids) under ``config.out_dir`` and name them in its
    record by path relative to it. ``out_dir`` is a runtime field: it is not part of the config snapshot.
    """
    copy = ml_collections.ConfigDict(config.to_dict())
    copy.out_dir = str(out.resolve())
    return copy


def use_compilation_cache(config: ml_collections.ConfigDict, *, default: bool = True) -> Optional[pathlib.Path]:
    """Turns on JAX's persistent compilation cache for this process as ``config.compilation_cache`` says.

    ``True``: ``<out_dir>/xla_cache``; a path: that folder; ``False``: off; absent: when `default`, the user's
    cache folder (`bitlaws.compile_cache.default_dir`: ``~/.cache/bitlaws/xla`` unless
    ``BITLAWS_COMPILATION_CACHE`` says otherwise), else untouched. Worker processes (``--workers N``, fresh
    processes) use the default; the in-process runner only acts when the config asks, since the setting is
    global to a process and JAX reads it once (the `bitlaws` command has already turned on the user's cache; a
    test or notebook keeps its own). Every program compiled in the sweep is stored there and reused wherever the
    same program is compiled again - by the other worker, by the next sweep or resumed sweep, after an
    evaluator's ``jax.clear_caches()``, or by cells whose Python-level jit caches miss although XLA receives the
    same program (e.g. the QAT steps of the different losses, `bitlaws.qat.qat`). A hit replaces XLA's
    compilation by reading the executable back, so records do not change; the folder can be deleted at any time.

    Returns:
        The cache folder, or None when off.
    """
    from bitlaws import compile_cache  # pylint: disable=g-import-not-at-top

    setting = config.get("compilation_cache", None)
    if setting is None:
        return compile_cache.enable() if default else None
    if setting is False:
        return None
    if setting is True:
        if not config.get("out_dir", None):
            return None
        return compile_cache.enable(pathlib.Path(config.out_dir) / COMPILATION_CACHE_DIR)
    return compile_cache.enable(str(setting))


def run_sweep(config: ml_collections.ConfigDict, out_dir: Union[str, os.PathLike], *, progress: bool = True,
              log: Callable[[str], Any] = print, force: bool = False, workers: int = 1) -> SweepSummary:
    """Evaluates every unfinished cell of `config`'s grid, appending a record to ``out_dir/results.jsonl`` each.

    Args:
        config: Sweep config (grid fields as in `bitlaws.sweep.grid`, plus ``evaluator``, optional
            ``evaluator_module``, ``stop_on_error`` (default True), ``quant``, evaluator-specific blocks).
        out_dir: Output folder, created if needed.
        progress: Show a tqdm bar (total = all cells, starting at the finished ones) with ETA.
        log: Receives one string per event (left-out combinations, repairs, errors, interruption).
        force: Resume even if ``config.json`` in `out_dir` differs in grid-defining fields (it is replaced).
        workers: Evaluate cells in this many spawned processes (`bitlaws.sweep.parallel`; one model per
            worker at a time); 1 evaluates them in this process. Records are the same either way.

    Returns:
        A `SweepSummary`; ``summary.exit_code`` is what a command line should return.

    Raises:
        ValueError: bad config, unknown evaluator/method, cells the evaluator's pre-check
            rejects, an output path that is a file (all before anything is written), or a snapshot mismatch
            without `force`.
        RuntimeError: another sweep holds the folder's lock.
    """
    start = time.perf_counter()
    expansion = grid_lib.expand_grid_report(config)
    factory = get_evaluator(config)
    check_quant_block(config)
    out = pathlib.Path(out_dir)
    for parent in (out, *out.parents):
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"sweep output folder {out} is (or is inside) an existing file: {parent}")
            break
    check = get_check(config)
    if check is not None:
        finished_before = _finished_keys_read_only(out / RESULTS_NAME)
        unfinished = [cell for cell in expansion.cells if cell.key not in finished_before]
        if unfinished:
            check(config, unfinished)
    out.mkdir(parents=True, exist_ok=True)
    emit = _log_to(log, progress)
    with exclusive_lock(out):
        check_snapshot(out, config, force=force)
        results = ResultsFile(out / RESULTS_NAME)
        finished = {record["key"] for record in results.load()}
        cells = expansion.cells
        todo = [cell for cell in cells if cell.key not in finished]
        summary = SweepSummary(out, results.path, len(cells), len(cells) - len(todo),
                               left_out=list(expansion.skipped), repairs=list(results.repairs))
        for combination, reason in expansion.skipped:
            emit(f"sweep: left out {combination}: {reason}")
        for message in results.repairs:
            emit(f"sweep: repaired {message}")
        evaluator_config = with_out_dir(config, out)
        if todo and workers > 1:
            _run_cells_in_workers(evaluator_config, todo, int(workers), results, summary, progress, emit)
        elif todo:
            _run_cells(evaluator_config, factory, todo, results, summary, progress, emit)
    summary.wall_s = time.perf_counter() - start
    return summary


def _run_cells(config: ml_collections.ConfigDict, factory: EvaluatorFactory, todo: list[Cell],
               results: ResultsFile, summary: SweepSummary, progress: bool, emit: Callable[[str], Any]) -> None:
    """Evaluates `todo` in this process and records each cell as it finishes."""
    bar = _progress_bar(summary, progress, "sweep")

    def messages() -> Iterator[parallel.Finished | parallel.Failed]:
        use_compilation_cache(config, default=False)
        evaluate = factory(config)
        version_info = versions()
        for cell in todo:
            bar.set_postfix_str(cell.key, refresh=False)  # the cell being evaluated (cells can take minutes)
            try:
                record = evaluate_cell(evaluate, cell, version_info)
            except Exception as e:  # pylint: disable=broad-except
                yield parallel.Failed(cell.key, f"{type(e).__name__}: {e}", traceback.format_exc())
                continue
            yield parallel.Finished(cell.key, record)

    _record_cells(messages(), config, results, summary, bar, emit)


def _run_cells_in_workers(config: ml_collections.ConfigDict, todo: list[Cell], workers: int, results: ResultsFile,
                          summary: SweepSummary, progress: bool, emit: Callable[[str], Any]) -> None:
    """`_run_cells` with the evaluation in worker processes; this process appends every record."""
    bar = _progress_bar(summary, progress, f"sweep ({workers} workers)")
    _record_cells(parallel.run_in_workers(config, todo, workers), config, results, summary, bar, emit)


def _progress_bar(summary: SweepSummary, progress: bool, desc: str) -> tqdm:
    return tqdm(total=summary.total, initial=summary.already_done, unit="cell", desc=desc, disable=not progress,
                dynamic_ncols=True)


def _record_cells(messages: Iterator[parallel.Finished | parallel.Failed], config: ml_collections.ConfigDict,
                  results: ResultsFile, summary: SweepSummary, bar: tqdm, emit: Callable[[str], Any]) -> None:
    """Appends each finished cell's record; logs failures (stopping on the first unless ``stop_on_error=False``).

    Closing `messages` when this returns early (a failure, Ctrl-C) stops the evaluation: the in-process
    generator is abandoned, worker processes are terminated.
    """
    stop_on_error = bool(config.get("stop_on_error", True))
    try:
        for message in messages:
            if isinstance(message, parallel.Failed):
                summary.failed.append((message.key, message.message))
                emit(f"sweep: cell {message.key} failed: {message.message}\n{message.details.rstrip()}")
                if stop_on_error:
                    emit("sweep: stopping (stop_on_error=True); rerun to retry the failed cell")
                    return
                continue
            results.append(message.record)
            summary.evaluated.append(message.key)
            bar.set_postfix_str(message.key, refresh=False)
            bar.update(1)
    except KeyboardInterrupt:
        summary.interrupted = True
        emit(f"sweep: interrupted; {summary.finished}/{summary.total} cells are in {results.path}; "
             f"rerun the same command to resume")
    finally:
        messages.close()
        bar.close()


def run_sweep_from_config(config_spec: str, out_dir: Union[str, os.PathLike], overrides: Sequence[str] = (), *,
                          progress: bool = True, log: Callable[[str], Any] = print,
                          force: bool = False, workers: int = 1) -> SweepSummary:
    """Loads ``file.py[:arg]`` with ``--set`` style `overrides` and runs `run_sweep` on it.

    The config remembers where it came from in the runtime field ``config_file`` (absolute ``FILE.py[:ARG]``):
    worker processes re-execute that file, so what it and its imports register exists there too.
    """
    config = configlib.load_config(config_spec, overrides)
    path, sep, arg = config_spec.partition(":")
    with config.unlocked():
        config.config_file = str(pathlib.Path(path).resolve()) + sep + arg
    return run_sweep(config, out_dir, progress=progress, log=log, force=force, workers=workers)
