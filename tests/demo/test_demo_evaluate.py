"""The demo sweep evaluator on a shipped VAR member: quantize, sample, score, account."""

import math
import pathlib

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
        assert 0.0 <= record["accuracy"] <= 1.0 and record["n_samples"] == 30
        assert "not FID" in record["metric_name"]
    assert fp["n_params"] == w4["n_params"] and fp["mt_bits"] == 16 * fp["n_params"]
    assert w4["mt_bits"] < fp["mt_bits"] and w4["ct_bits"] < fp["ct_bits"]
    assert w4["fid"] != fp["fid"]  # the quantized transformer really sampled something else
