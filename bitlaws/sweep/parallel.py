"""Runs a sweep's cells in several worker processes; the parent stays the only writer of ``results.jsonl``.

Why processes: on a CPU host most of a small model's cell is XLA compilation, which is single threaded,
so two workers on two cores finish a compile-bound sweep nearly twice as fast. Each worker is a fresh
``spawn`` process (JAX is not fork-safe) that builds the evaluator from the config once and then takes
*model groups* (every unfinished cell of one model, in grid order) from a shared queue, largest group
first: a model is loaded and its sampler compiled in one worker only, and a worker that finishes early
takes the next model.

Workers send each finished record (or the error of a failed cell) back to the parent, which appends it with
`ResultsFile.append` exactly as the serial runner does, so kill safety and resume are unchanged: a SIGKILL
of the parent loses at most the cells in flight, and workers notice their parent is gone (their parent pid
changes) and exit after the cell they are on.

What a worker imports: a spawned process starts with nothing registered, so before it builds the evaluator
it redoes what registered the parent's names (`prepare_worker`): it imports the modules of ``config.imports``
and ``config.evaluator_module``, then re-executes the config file the sweep was loaded from (the runtime field
``config.config_file``, ``FILE.py[:ARG]``, set by `runner.run_sweep_from_config`), which runs the file's own
imports and its ``get_config`` (where user code registers methods, calibrators and formats). The config
*values* stay the parent's. Evaluators, methods, calibrators and formats registered only inside the parent
process (e.g. in a notebook cell, with a config built in memory) are unknown in the workers: put them in a
module and list it in ``config.imports``.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import queue as queue_lib
import traceback
from typing import Iterator, Sequence

import ml_collections

from bitlaws import configlib
from bitlaws.sweep import settings
from bitlaws.sweep.grid import Cell

_POLL_S = 1.0  # how often the parent checks that its workers are alive while waiting for a message


@dataclasses.dataclass(frozen=True)
class Finished:
    """Cell `key` finished (in a worker or in process); `record` is what goes into ``results.jsonl``."""

    key: str
    record: dict


@dataclasses.dataclass(frozen=True)
class Failed:
    """Cell `key` raised (in a worker or in process); `message` is ``Type: text``, `details` the traceback."""

    key: str
    message: str
    details: str


@dataclasses.dataclass(frozen=True)
class WorkerDone:
    """Worker `index` has no more work (or stopped after a failure with ``stop_on_error``)."""

    index: int


def model_groups(cells: Sequence[Cell]) -> list[list[Cell]]:
    """The cells grouped by model (grid order inside a group), largest group first.

    Groups of equal size go in *reverse* grid order: sweep configs list models smallest first (the demo, the
    paper's tables), so the most expensive models start first and the cheap ones fill the tail. Replaying the
    per-model times of a measured 2-worker demo sweep (README), this order ends it about a minute earlier than
    grid order (703 s against 763 s: in grid order the largest DiT ran alone at the end).
    """
    groups: dict[str, list[Cell]] = {}
    for cell in cells:
        groups.setdefault(cell.model, []).append(cell)
    ordered = list(groups.values())[::-1]
    return sorted(ordered, key=lambda group: -len(group))  # stable: equal sizes keep the reversed order


def prepare_worker(config_dict: dict) -> ml_collections.ConfigDict:
    """Imports what the parent's config imported and returns the parent's config (see the module docstring).

    Order: ``config.imports``, ``config.evaluator_module``, then the config file ``config.config_file`` (if
    any) is re-executed; its result is discarded, only its side effects (registrations) matter.
    """
    config = ml_collections.ConfigDict(config_dict)
    settings.import_modules(config)
    config_file = config.get("config_file", None)
    if config_file:
        configlib.load_config(config_file)
    return config


def _worker(index: int, config_dict: dict, tasks, messages, parent_pid: int) -> None:
    """Worker process body: evaluate model groups from `tasks` until its None, report on `messages`."""
    # Imports happen here, in the spawned process, so the parent never has to be fork-safe.
    from bitlaws.sweep import runner  # pylint: disable=g-import-not-at-top

    stop_on_error = bool(config_dict.get("stop_on_error", True))
    try:
        config = prepare_worker(config_dict)
        runner.use_compilation_cache(config)
        evaluate = runner.get_evaluator(config)(config)
        version_info = runner.versions()
    except Exception as e:  # pylint: disable=broad-except
        messages.put(Failed("<evaluator setup>", f"{type(e).__name__}: {e}", traceback.format_exc()))
        messages.put(WorkerDone(index))
        return
    try:
        while True:
            group = tasks.get()  # blocking: every queued group is followed by one None per worker
            if group is None:
                break
            for cell in group:
                if os.getppid() != parent_pid:  # the parent died (e.g. SIGKILL): nobody records our work
                    return
                try:
                    record = runner.evaluate_cell(evaluate, cell, version_info)
                except Exception as e:  # pylint: disable=broad-except
                    messages.put(Failed(cell.key, f"{type(e).__name__}: {e}", traceback.format_exc()))
                    if stop_on_error:
                        return
                    continue
                messages.put(Finished(cell.key, record))
    except KeyboardInterrupt:  # Ctrl-C reaches the whole process group; the parent handles it
        return
    finally:
        messages.put(WorkerDone(index))


def run_in_workers(config: ml_collections.ConfigDict, cells: Sequence[Cell], workers: int,
                   ) -> Iterator[Finished | Failed]:
    """Evaluates `cells` in `workers` spawned processes and yields their messages as they arrive.

    The caller records `Finished` messages and decides what to do with `Failed` ones; closing the
    generator early (e.g. stopping on an error, or Ctrl-C) terminates the workers.

    Args:
        config: The sweep config (sent to each worker as a plain dict; `prepare_worker` redoes its imports).
        cells: The unfinished cells.
        workers: Number of processes (at most the number of model groups are started).

    Raises:
        RuntimeError: a worker died without reporting (killed, out of memory).
    """
    groups = model_groups(cells)
    workers = max(1, min(int(workers), len(groups)))
    context = multiprocessing.get_context("spawn")
    tasks, messages = context.Queue(), context.Queue()
    for group in groups:
        tasks.put(group)
    for _ in range(workers):
        tasks.put(None)  # end of work; a blocking get never mistakes a not-yet-flushed queue for an empty one
    processes = [context.Process(target=_worker, args=(i, config.to_dict(), tasks, messages, os.getpid()),
                                 name=f"bitlaws-sweep-worker-{i}", daemon=True) for i in range(workers)]
    for process in processes:
        process.start()
    running = set(range(workers))
    try:
        while running:
            try:
                message = messages.get(timeout=_POLL_S)
            except queue_lib.Empty:
                dead = [i for i in running if not processes[i].is_alive()]
                if dead and messages.empty():
                    codes = {i: processes[i].exitcode for i in dead}
                    raise RuntimeError(f"sweep worker(s) {sorted(dead)} died without reporting "
                                       f"(exit codes {codes}); finished cells are kept, rerun to resume")
                continue
            if isinstance(message, WorkerDone):
                running.discard(message.index)
                continue
            yield message
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
        for process in processes:
            process.join(timeout=10)
        tasks.cancel_join_thread()  # groups nobody took may still sit in the pipe: do not wait to flush them
        for channel in (tasks, messages):
            channel.close()
