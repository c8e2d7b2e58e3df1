"""`run_sweep`: records, resume, errors, Ctrl-C and the config snapshot, with an instant fake evaluator."""

import json

import ml_collections
import pytest

from bitlaws.sweep import results as results_lib
from bitlaws.sweep import runner

CALLS: list[str] = []
BEHAVIOUR: dict[str, str] = {}  # cell key -> "raise" | "interrupt" | "no-fid"


def _fake_factory(config):
    scale = config.fake.scale

    def evaluate(cell):
        CALLS.append(cell.key)
        action = BEHAVIOUR.get(cell.key)
        if action == "raise":
            raise RuntimeError("boom")
        if action == "interrupt":
            raise KeyboardInterrupt
        if action == "no-fid":
            return {"mt_bits": 1, "ct_bits": 1}
        return {"fid": scale * cell.prng_seed % 97, "mt_bits": 4 * len(cell.key), "ct_bits": 64, "extra": "x"}

    return evaluate


runner.register_evaluator("fake-for-runner-test", _fake_factory)


@pytest.fixture(autouse=True)
def _reset():
    CALLS.clear()
    BEHAVIOUR.clear()


def _config(**fields):
    base = {"evaluator": "fake-for-runner-test", "models": ("a", "b"), "settings": ("W16A16", "W4A16", "W3A16"),
            "formats": ("int", "fp"), "methods": ("rtn",), "seeds": (0,), "fake": {"scale": 1.0},
            "stop_on_error": True}
    return ml_collections.ConfigDict({**base, **fields})


GRID = ["a|W16A16|none|none|s0", "a|W4A16|int|rtn|s0", "a|W4A16|fp|rtn|s0", "a|W3A16|int|rtn|s0",
        "b|W16A16|none|none|s0", "b|W4A16|int|rtn|s0", "b|W4A16|fp|rtn|s0", "b|W3A16|int|rtn|s0"]


def _keys(out):
    return [json.loads(line)["key"] for line in (out / "results.jsonl").read_text().splitlines()]


def test_records_then_resume_evaluates_nothing(tmp_path):
    logs = []
    summary = runner.run_sweep(_config(), tmp_path, progress=False, log=logs.append)
    assert CALLS == GRID and _keys(tmp_path) == GRID
    assert summary.complete and summary.exit_code == 0 and summary.evaluated == GRID
    assert [combo for combo, _ in summary.left_out] == ["a|W3A16|fp", "b|W3A16|fp"]
    assert any("left out a|W3A16|fp" in line for line in logs)
    record = json.loads((tmp_path / "results.jsonl").read_text().splitlines()[1])
    for field in results_lib.REQUIRED_FIELDS + ("prng_seed", "params", "extra"):
        assert field in record, field
    assert (record["model"], record["setting"], record["format"], record["method"]) == ("a", "W4A16", "int", "rtn")
    assert set(record["versions"]) >= {"python", "jax", "flax", "bitlaws"}
    assert record["time"].endswith("+00:00") and record["wall_s"] >= 0
    assert json.loads((tmp_path / "config.json").read_text())["models"] == ["a", "b"]

    CALLS.clear()
    again = runner.run_sweep(_config(stop_on_error=False), tmp_path, progress=False, log=logs.append)
    assert CALLS == [] and again.already_done == 8 and again.evaluated == [] and again.complete
    assert _keys(tmp_path) == GRID


def test_failed_cell_is_not_recorded_and_stops_or_continues(tmp_path):
    BEHAVIOUR["a|W4A16|fp|rtn|s0"] = "raise"
    BEHAVIOUR["b|W4A16|int|rtn|s0"] = "no-fid"
    logs = []
    summary = runner.run_sweep(_config(), tmp_path, progress=False, log=logs.append)
    assert _keys(tmp_path) == GRID[:2] and summary.exit_code == 1
    assert summary.failed == [("a|W4A16|fp|rtn|s0", "RuntimeError: boom")]
    assert any("cell a|W4A16|fp|rtn|s0 failed: RuntimeError: boom" in line for line in logs)

    summary = runner.run_sweep(_config(stop_on_error=False), tmp_path, progress=False, log=logs.append)
    assert [key for key, _ in summary.failed] == ["a|W4A16|fp|rtn|s0", "b|W4A16|int|rtn|s0"]
    assert "no ['fid']" in summary.failed[1][1]
    assert _keys(tmp_path) == [k for k in GRID if k not in ("a|W4A16|fp|rtn|s0", "b|W4A16|int|rtn|s0")]

    BEHAVIOUR.clear()
    CALLS.clear()
    assert runner.run_sweep(_config(), tmp_path, progress=False, log=logs.append).complete
    assert CALLS == ["a|W4A16|fp|rtn|s0", "b|W4A16|int|rtn|s0"]
    assert sorted(_keys(tmp_path)) == sorted(GRID)


def test_keyboard_interrupt_keeps_finished_cells(tmp_path):
    BEHAVIOUR[GRID[3]] = "interrupt"
    logs = []
    summary = runner.run_sweep(_config(), tmp_path, progress=False, log=logs.append)
    assert summary.interrupted and summary.exit_code == 130 and _keys(tmp_path) == GRID[:3]
    assert any("interrupted; 3/8 cells" in line for line in logs)


def test_resume_with_a_different_grid_is_refused_unless_forced(tmp_path):
    runner.run_sweep(_config(models=("a",)), tmp_path, progress=False, log=lambda _: None)
    with pytest.raises(ValueError, match=r"fake\.scale: 1\.0 -> 2\.0.*models") as error:
        runner.run_sweep(_config(models=("a", "b"), fake={"scale": 2.0}), tmp_path, progress=False)
    assert "models: ['a'] -> ['a', 'b']" in str(error.value)
    CALLS.clear()
    summary = runner.run_sweep(_config(models=("a", "b"), fake={"scale": 2.0}), tmp_path, progress=False,
                               log=lambda _: None, force=True)
    assert CALLS == GRID[4:] and summary.complete
    assert json.loads((tmp_path / "config.json").read_text())["fake"]["scale"] == 2.0


def test_runtime_fields_may_change_on_resume():
    old = runner.config_snapshot(_config(stop_on_error=True, toy={"sleep_s": 0.0, "batch": 4}))
    new = runner.config_snapshot(_config(stop_on_error=False, toy={"sleep_s": 1.0, "batch": 4}))
    assert runner.grid_differences(old, new) == []
    new["toy"]["batch"] = 8
    assert runner.grid_differences(old, new) == ["toy.batch"]


def test_unknown_evaluator_and_reserved_fields():
    with pytest.raises(ValueError, match="unknown sweep evaluator 'nope'.*fake-for-runner-test"):
        runner.get_evaluator(_config(evaluator="nope"))
    cell = runner.grid_lib.Cell("a", "W4A16", "int", "rtn", 0)
    with pytest.raises(ValueError, match=r"runner's fields \['key'\]"):
        runner.make_record(cell, {"fid": 1.0, "mt_bits": 1, "ct_bits": 1, "key": "x"}, 0.1)


CHECKED: list[list[str]] = []


def _check(config, cells):
    CHECKED.append([cell.key for cell in cells])
    bad = [cell for cell in cells if cell.format == "fp" and config.fake.scale < 0]
    if bad:
        raise ValueError(f"negative scale cannot do fp ({bad[0].key})")


runner.register_evaluator("fake-with-check", _fake_factory, check=_check)


def test_pre_check_sees_every_unfinished_cell_before_the_first_evaluation(tmp_path):
    CHECKED.clear()
    assert runner.run_sweep(_config(evaluator="fake-with-check", models=("a",)), tmp_path, progress=False,
                            log=lambda _: None).complete
    assert CHECKED == [GRID[:4]] and CALLS == GRID[:4]
    CHECKED.clear()
    CALLS.clear()
    runner.run_sweep(_config(evaluator="fake-with-check"), tmp_path, progress=False, log=lambda _: None, force=True)
    assert CHECKED == [GRID[4:]] and CALLS == GRID[4:]  # finished cells are not checked again


def test_a_failing_pre_check_writes_nothing(tmp_path):
    CHECKED.clear()
    with pytest.raises(ValueError, match=r"negative scale cannot do fp \(a\|W4A16\|fp"):
        runner.run_sweep(_config(evaluator="fake-with-check", fake={"scale": -1.0}), tmp_path / "out",
                         progress=False)
    assert CALLS == [] and not (tmp_path / "out").exists()


def test_check_each_names_the_first_failure_and_counts_the_others():
    cells = [runner.grid_lib.Cell(m, "W4A16", "int", "rtn", 0) for m in ("a", "b", "c", "d", "e", "f")]

    def check_one(cell):
        if cell.model != "a":
            raise ValueError(f"{cell.model} is bad")

    with pytest.raises(ValueError) as error:
        runner.check_each(cells + cells, check_one, key=lambda cell: cell.model)
    assert str(error.value) == ("cell b|W4A16|int|rtn|s0: b is bad (4 more cell(s) fail this check: "
                                "c|W4A16|int|rtn|s0, d|W4A16|int|rtn|s0, e|W4A16|int|rtn|s0, ...)")


@pytest.mark.parametrize("group", [-8, 2.5, True])
def test_quant_group_size_must_be_zero_or_positive(tmp_path, group):
    with pytest.raises(ValueError, match="quant.weight_group_size"):
        runner.run_sweep(_config(quant={"weight_group_size": group}), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_out_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="existing file"):
        runner.run_sweep(_config(), tmp_path / "file", progress=False)
    assert (tmp_path / "file").read_text() == "x"


def test_toy_pre_check_names_the_layers_a_group_size_cannot_split():
    from bitlaws.sweep import toy  # pylint: disable=g-import-not-at-top

    config = _config(quant={"weight_group_size": 8})
    cells = [runner.grid_lib.Cell("mlp-w16-d2", "W4A16", "int", "rtn", 0),
             runner.grid_lib.Cell("mlp-w12-d1", "W16A16", "none", "none", 0)]
    toy.check_cells(config, cells)  # 8 divides 16; the float cell has no rules
    cells.append(runner.grid_lib.Cell("mlp-w12-d1", "W4A16", "int", "rtn", 0))
    with pytest.raises(ValueError, match=r"cell mlp-w12-d1\|W4A16.*layers\.0.*group_size=8"):
        toy.check_cells(config, cells)
    toy.check_cells(config, [runner.grid_lib.Cell("mlp-bad", "W4A16", "int", "rtn", 0)])  # fails when evaluated


def test_compilation_cache_is_per_sweep_folder_and_off_in_process_by_default(tmp_path):
    """Run in a fresh interpreter: the setting is global to a process (and JAX reads it once)."""
    import os  # pylint: disable=g-import-not-at-top
    import subprocess  # pylint: disable=g-import-not-at-top
    import sys  # pylint: disable=g-import-not-at-top

    user = tmp_path / "user_cache"
    script = f"""
import jax, jax.numpy as jnp, ml_collections
from bitlaws.sweep import runner
config = ml_collections.ConfigDict({{"out_dir": {str(tmp_path)!r}}})
assert runner.use_compilation_cache(config, default=False) is None
assert runner.use_compilation_cache(ml_collections.ConfigDict({{"out_dir": "x", "compilation_cache": False}})) is None
print(runner.use_compilation_cache(config))
config.compilation_cache = True
folder = runner.use_compilation_cache(config)
jax.jit(lambda x: jnp.sin(x) * 3)(jnp.ones(5)).block_until_ready()
print(folder, len(list(folder.iterdir())))
"""
    env = dict(os.environ, BITLAWS_COMPILATION_CACHE=str(user))
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env=env).stdout.split()
    assert out[0] == str(user)  # absent: the user's cache folder (BITLAWS_COMPILATION_CACHE)
    assert out[1] == str(tmp_path / runner.COMPILATION_CACHE_DIR) and int(out[2]) >= 1  # True: the sweep's folder
    assert "compilation_cache" in runner.RUNTIME_FIELDS  # turning it on or off does not block a resume
