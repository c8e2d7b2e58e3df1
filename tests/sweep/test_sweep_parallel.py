"""`run_sweep(..., workers=N)`: worker processes give the same records as the serial runner; errors and resume."""

import pathlib

import pytest

from bitlaws.configlib import load_config
from bitlaws.sweep import grid, parallel, runner
from bitlaws.sweep.results import read_records

REPO = pathlib.Path(__file__).resolve().parents[2]
TOY = str(REPO / "configs/sweeps/toy.py")


def _toy_config(*overrides):
    return load_config(TOY, ["formats=('int',)", *overrides])  # 2 models x 6 cells


def test_model_groups_keep_models_together_largest_first():
    config = _toy_config("models=('mlp-w8-d1', 'mlp-w8-d2')", "settings=('W16A16', 'W4A16', 'W8A8')")
    cells = grid.expand_grid(config)
    short = [cell for cell in cells if not (cell.model == "mlp-w8-d1" and cell.setting == "W8A8")]
    groups = parallel.model_groups(short)
    assert [[cell.model for cell in group] for group in groups] == [["mlp-w8-d2"] * 3, ["mlp-w8-d1"] * 2]
    assert [cell.key for cell in groups[0]] == [cell.key for cell in cells if cell.model == "mlp-w8-d2"]


def test_model_groups_of_equal_size_start_with_the_last_model_of_the_grid():
    config = _toy_config("models=('mlp-w8-d1', 'mlp-w8-d2', 'mlp-w16-d1')", "settings=('W16A16', 'W4A16')")
    cells = grid.expand_grid(config)
    groups = parallel.model_groups(cells)
    assert [group[0].model for group in groups] == ["mlp-w16-d1", "mlp-w8-d2", "mlp-w8-d1"]
    short = [cell for cell in cells if not (cell.model == "mlp-w16-d1" and cell.setting == "W4A16")]
    assert [group[0].model for group in parallel.model_groups(short)] == ["mlp-w8-d2", "mlp-w8-d1", "mlp-w16-d1"]


def test_two_workers_write_the_same_records_as_one_process(tmp_path):
    config = _toy_config()
    serial = runner.run_sweep(config, tmp_path / "serial", progress=False)
    parallel_run = runner.run_sweep(config, tmp_path / "parallel", progress=False, workers=2)
    assert serial.complete and parallel_run.complete and parallel_run.failed == []
    by_key = {record["key"]: record for record in read_records(serial.results_path)}
    records = read_records(parallel_run.results_path)
    assert sorted(record["key"] for record in records) == sorted(by_key)  # each cell exactly once
    for record in records:
        for field in ("fid", "mt_bits", "ct_bits", "seed", "model", "setting", "format", "method"):
            assert record[field] == by_key[record["key"]][field], (record["key"], field)
    again = runner.run_sweep(config, tmp_path / "parallel", progress=False, workers=2)
    assert again.evaluated == [] and again.complete


def test_worker_failure_is_reported_and_the_rest_is_kept(tmp_path):
    # An unknown method fails at evaluation time inside the worker (bits validate at grid expansion).
    config = _toy_config("models=('mlp-w8-d1', 'mlp-bad')", "settings=('W16A16', 'W4A16')", "stop_on_error=False")
    summary = runner.run_sweep(config, tmp_path / "run", progress=False, workers=2)
    failed_keys = {key for key, _ in summary.failed}
    assert failed_keys == {"mlp-bad|W16A16|none|none|s0", "mlp-bad|W4A16|int|rtn|s0"}
    assert all("mlp-bad" in message for _, message in summary.failed)
    assert sorted(summary.evaluated) == ["mlp-w8-d1|W16A16|none|none|s0", "mlp-w8-d1|W4A16|int|rtn|s0"]
    assert summary.exit_code == 1


def test_stop_on_error_stops_the_workers(tmp_path):
    config = _toy_config("models=('mlp-bad',)", "settings=('W16A16', 'W4A16', 'W8A8')")
    summary = runner.run_sweep(config, tmp_path / "run", progress=False, workers=2)
    assert len(summary.failed) == 1 and summary.evaluated == []


def test_evaluator_registered_only_in_this_process_is_a_clear_error(tmp_path):
    runner.register_evaluator("only-in-parent", lambda config: (lambda cell: {"fid": 0.0}))
    config = _toy_config("evaluator='only-in-parent'", "evaluator_module=''")
    summary = runner.run_sweep(config, tmp_path / "run", progress=False, workers=2)
    assert summary.failed and summary.failed[0][0] == "<evaluator setup>"
    assert "only-in-parent" in summary.failed[0][1]


@pytest.mark.parametrize("workers", [0, -1])
def test_workers_below_two_run_in_process(tmp_path, workers):
    summary = runner.run_sweep(_toy_config("models=('mlp-w8-d1',)"), tmp_path / "run", progress=False,
                               workers=workers)
    assert summary.complete


def test_prepare_worker_reruns_the_config_file_and_keeps_the_parent_values(tmp_path):
    marker = tmp_path / "ran.txt"
    config_file = tmp_path / "sweep.py"
    config_file.write_text(
        "import ml_collections\n\n\n"
        "def get_config(arg=None):\n"
        f"    open({str(marker)!r}, 'a').write(str(arg))  # where user code would register its methods\n"
        "    return ml_collections.ConfigDict({'models': ('from-file',)})\n")
    config = parallel.prepare_worker({"models": ["from-parent"], "config_file": f"{config_file}:small",
                                      "imports": ["bitlaws.sweep.toy"]})
    assert marker.read_text() == "small"
    assert list(config.models) == ["from-parent"]
    assert "toy" in runner.evaluator_names()
