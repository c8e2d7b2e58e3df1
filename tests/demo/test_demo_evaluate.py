"""The demo sweep evaluator on a shipped VAR member: quantize, sample, score, account."""

import math
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from bitlaws import configlib
from bitlaws.demo import evaluate
from bitlaws.sweep.grid import Cell

CONFIG = pathlib.Path(__file__).resolve().parents[2] / "configs" / "sweeps" / "demo.py"


def test_demo_cells_score_and_account_bits():
    config = configlib.load_config(f"{CONFIG}:quick,n_per_class=3")
    assert "var-d1" in config.models
    run = evaluate.make_evaluator(config)
    fp = run(Cell("var-d1", "W16A16", "none", "none", 0))
    w4 = run(Cell("var-d1", "W4A16", "int", "rtn", 0))
    for record in (fp, w4):
        assert math.isfinite(record["fid"]) and record["fid"] > 0
        interval = record["fid_interval"]  # jackknife over the 30 samples (leave-one-out), reference fixed
        assert interval["lo"] < record["fid"] < interval["hi"] and interval["groups"] == 30 and interval["se"] > 0
        assert "features_file" not in record  # no sweep folder to write them to
        assert 0.0 <= record["accuracy"] <= 1.0 and record["n_samples"] == 30
        assert "not FID" in record["metric_name"]
    assert fp["n_params"] == w4["n_params"] and fp["mt_bits"] == 16 * fp["n_params"]
    assert w4["mt_bits"] < fp["mt_bits"] and w4["ct_bits"] < fp["ct_bits"]
    assert w4["fid"] != fp["fid"]  # the quantized transformer really sampled something else


def test_sweep_cells_save_their_sample_grid(tmp_path):
    import json  # pylint: disable=g-import-not-at-top

    from matplotlib import image as mpl_image  # pylint: disable=g-import-not-at-top

    from bitlaws.sweep import runner  # pylint: disable=g-import-not-at-top

    config = configlib.load_config(f"{CONFIG}:quick,n_per_class=3", ["models=('var-d1',)", "settings=('W16A16',)"])
    config.demo.grid_per_class = 2
    summary = runner.run_sweep(config, tmp_path / "run", progress=False)
    assert summary.complete
    record = json.loads((tmp_path / "run" / "results.jsonl").read_text().splitlines()[0])
    assert record["samples_image"] == "samples/var-d1/var-d1_W16A16_none_none_s0.png"
    with np.load(tmp_path / "run" / record["features_file"]) as saved:
        features, replicates = saved["features"], saved["replicates"]
    assert features.shape == (30, 64) and features.dtype == np.float32 and replicates.shape == (30,)
    with np.load(tmp_path / "run" / record["features_reference"]) as reference:
        assert reference["mu"].shape == (64,) and reference["sigma"].shape == (64, 64)
        # the saved features and reference reproduce the recorded DFD
        from bitlaws.eval import frechet_distance  # pylint: disable=g-import-not-at-top
        dfd = frechet_distance(features.astype(np.float64).mean(0), np.cov(features.astype(np.float64), rowvar=False),
                               reference["mu"], reference["sigma"])
    assert dfd == pytest.approx(record["fid"], rel=1e-6)
    grid = mpl_image.imread(tmp_path / "run" / record["samples_image"])
    zoom = evaluate.GRID_ZOOM
    assert grid.shape[:2] == (2 * 16 * zoom, 10 * 16 * zoom)  # 2 rows of samples x 10 digits
    assert grid[..., :3].std() > 0.05  # digits, not a blank image
    assert "out_dir" not in (tmp_path / "run" / "config.json").read_text()  # a runtime field, not in the snapshot


def test_pre_check_uses_abstract_members_and_names_the_layers_a_group_size_cannot_split():
    config = configlib.load_config(f"{CONFIG}:quick", ["quant.weight_group_size=8"])
    cells = [Cell(name, setting, fmt, method, 0) for name in ("var-d1", "dit-d2")
             for setting, fmt, method in (("W16A16", "none", "none"), ("W4A16", "int", "rtn"), ("W8A8", "fp", "rtn"))]
    evaluate.check_cells(config, cells)  # 8 divides every quantized layer's reduction axis
    model, pattern = evaluate.abstract_member("dit-d2")
    assert pattern and all(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(nnx.state(model)))
    config.quant.weight_group_size = 7
    with pytest.raises(ValueError, match=r"cell var-d1\|W4A16\|int\|rtn\|s0: .*blocks\.0\..*group_size=7.*"
                                         r"3 more cell\(s\) fail this check: var-d1\|W8A8\|fp\|rtn\|s0, dit-d2"):
        evaluate.check_cells(config, cells)
    with pytest.raises(ValueError, match="no DiT demo member 'dit-d9'"):
        evaluate.check_cells(config, [Cell("dit-d9", "W16A16", "none", "none", 0)])


def test_demo_config_runs_several_seeds_per_cell_paired_across_precisions():
    from bitlaws.sweep.grid import expand_grid  # pylint: disable=g-import-not-at-top

    config = configlib.load_config(f"{CONFIG}:quick,seeds=3")
    assert config.seeds == (0, 1, 2)
    cells = expand_grid(config)
    assert len(cells) == 3 * len(expand_grid(configlib.load_config(f"{CONFIG}:quick")))
    by_seed = {}
    for cell in cells:  # one sampling seed per (model, seed), whatever the precision: cells pair with the float one
        by_seed.setdefault((cell.model, cell.seed), set()).add(cell.model_seed)
    assert all(len(seeds) == 1 for seeds in by_seed.values()) and len({s for v in by_seed.values() for s in v}) == 12
    with pytest.raises(ValueError, match="seeds must be a positive integer"):
        configlib.load_config(f"{CONFIG}:seeds=0")
