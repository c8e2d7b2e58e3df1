"""The released study on several hosts: the same command on every host, one JAX process per host.

    python -m bitlaws.sweep.released_multihost --config configs/sweeps/released.py --out runs/released \\
        [--set KEY=VALUE ...] [--coordinator HOST:PORT --num-processes N --process-id P]

Without ``--coordinator`` `jax.distributed.initialize()` finds its peers itself on Cloud TPU slices, under
SLURM and Open MPI, or from ``JAX_COORDINATOR_ADDRESS`` (then pass ``--num-processes`` / ``--process-id``).

What each process does (`run`): every process checks its inputs (the evaluator's pre-check: its ported folders,
reference and Inception weights must exist on that host); process 0 reads which cells ``OUT/results.jsonl``
already holds and broadcasts that list, so all processes walk the same unfinished cells in the same order.
Process 0 runs the ordinary sweep (`bitlaws.sweep.runner.run_sweep`: the folder lock, ``config.json``,
``results.jsonl``); the others evaluate the same cells without writing results. Inside a cell each process
samples the shards it owns on its own devices (`bitlaws.sweep.released`), so processes wait for each other only
when the statistics are merged at the end of a cell. ``OUT`` may be a shared folder (shards of any process count
are reused on resume) or a local folder of the same path on every host (each host resumes its own shards).

A failure on one process leaves the others waiting in the next collective until JAX's heartbeat times out; rerun
the same command on every host to resume.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from bitlaws import configlib
from bitlaws.sweep import grid as grid_lib
from bitlaws.sweep import runner
from bitlaws.sweep.results import read_records


def _unfinished_on_process_0(out: pathlib.Path, cells: Sequence[grid_lib.Cell]) -> list[grid_lib.Cell]:
    """The cells process 0 finds unfinished, the same list on every process (collective)."""
    mask = np.zeros(len(cells), np.int32)
    if jax.process_index() == 0:
        path = out / runner.RESULTS_NAME
        finished = {record["key"] for record in read_records(path)} if path.is_file() else set()
        mask = np.array([cell.key not in finished for cell in cells], np.int32)
    mask = np.asarray(multihost_utils.broadcast_one_to_all(mask))
    return [cell for cell, todo in zip(cells, mask) if todo]


def _check_everywhere(config, todo: Sequence[grid_lib.Cell]) -> None:
    """Every process runs the evaluator's pre-check on its own inputs; all fail if one does (collective)."""
    check = runner.get_check(config)
    error = None
    if check is not None and todo:
        try:
            check(config, todo)
        except ValueError as e:
            error = e
    passed = np.asarray(multihost_utils.process_allgather(np.int32(error is None)))
    if error is not None:
        raise error
    if not passed.all():
        failed = [int(p) for p in np.flatnonzero(passed == 0)]
        raise RuntimeError(f"the pre-check failed on process(es) {failed} (their error says why); nothing was run")


def run(config_spec: str, out_dir: str, overrides: Sequence[str] = (), *, progress: bool = True, force: bool = False,
        log: Callable[[str], Any] = print) -> int:
    """Runs a sweep on every process of an initialised `jax.distributed` job; returns the exit status.

    With one process it is `runner.run_sweep_from_config`. Otherwise see the module docstring.

    Raises:
        ValueError: what the pre-check or `run_sweep` raise (on the process that finds the problem).
    """
    if jax.process_count() == 1:
        return runner.run_sweep_from_config(config_spec, out_dir, overrides, progress=progress, log=log,
                                            force=force).exit_code
    config = configlib.load_config(config_spec, overrides)
    path, sep, arg = config_spec.partition(":")
    with config.unlocked():
        config.config_file = str(pathlib.Path(path).resolve()) + sep + arg
    out = pathlib.Path(out_dir)
    cells = grid_lib.expand_grid(config)
    factory = runner.get_evaluator(config)
    todo = _unfinished_on_process_0(out, cells)
    _check_everywhere(config, todo)
    if jax.process_index() == 0:
        summary = runner.run_sweep(config, out, progress=progress, log=log, force=force)
        return summary.exit_code
    evaluate = factory(runner.with_out_dir(config, out))
    for cell in todo:
        evaluate(cell)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line: initialises `jax.distributed`, then `run` (errors: one line, exit status 2)."""
    from bitlaws import cli, compile_cache  # pylint: disable=g-import-not-at-top

    parser = argparse.ArgumentParser(prog="python -m bitlaws.sweep.released_multihost",
                                     description="Run a released-model sweep with one process per host.")
    cli.add_sweep_arguments(parser)  # the same flags as `bitlaws sweep`
    parser.add_argument("--coordinator", help="HOST:PORT of process 0 (default: detected by JAX)")
    parser.add_argument("--num-processes", type=int, help="processes in the job (default: detected by JAX)")
    parser.add_argument("--process-id", type=int, help="this process's id, 0..N-1 (default: detected by JAX)")
    args = parser.parse_args(argv)
    if args.workers != 1:
        parser.error("--workers is not supported with several hosts (each host already uses all its devices)")
    compile_cache.enable()
    jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                               process_id=args.process_id)
    try:
        return run(args.config, args.out, args.overrides, progress=not args.no_progress, force=args.force)
    except cli.USER_ERRORS as e:
        print(f"released study (process {jax.process_index()}): error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
