"""PTQ calibration on the demo members: statistics and Hessians come out of the seam for a registered method."""

import pathlib

import numpy as np
import pytest

from bitlaws import configlib
from bitlaws.demo import evaluate, family
from bitlaws.quant import QuantRule, QuantSpec, match_rules, methods, register_weight_method, run_calibration
from bitlaws.sweep.grid import Cell

CONFIG = pathlib.Path(__file__).resolve().parents[2] / "configs" / "sweeps" / "demo.py"
SEEN: list[dict] = []


def _needs_stats(kernel, spec, stats=None, reduce_axes=None):
    """A test PTQ method: RTN that records the statistics the sweep handed it (and fails without them)."""
    assert stats is not None and stats.hessian is not None, "the sweep gave no calibration statistics"
    SEEN.append({"hessian": np.asarray(stats.hessian), "count": float(stats.count), "k": kernel.shape[0]})
    return methods.rtn(kernel, spec, None, reduce_axes)


register_weight_method("test-needs-stats", needs_hessian=True)(_needs_stats)  # re-registering is allowed


@pytest.mark.parametrize("name", ["var-d1", "dit-d2"])
def test_calibration_batches_feed_every_quantized_layer(name):
    member = family.load_member(name)
    batches = member.calibration_batches(2, 8, seed=0)
    assert len(batches) == 2
    again = member.calibration_batches(2, 8, seed=0)
    for a, b in zip(batches, again):  # deterministic: every precision of a member sees the same data
        for x, y in zip(a, b):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    rules = [QuantRule(module_path=member.quant_pattern, weight=QuantSpec(format="int8"),
                       act=QuantSpec(format="int8", granularity="token"))]
    stats = run_calibration(member.model, rules, member.calibration_forward, batches, record_hessian=True)
    assert set(stats) == set(match_rules(member.model, rules).assignments)
    for path, layer_stats in stats.items():
        hessian = np.asarray(layer_stats.hessian)
        assert hessian.shape[0] == hessian.shape[1] == layer_stats.absmax.shape[0], path
        np.testing.assert_allclose(hessian, hessian.T, rtol=1e-5, atol=1e-5)
        assert np.linalg.eigvalsh(hessian.astype(np.float64)).min() > -1e-3 * np.abs(hessian).max(), path
        assert int(layer_stats.batches) == 2 and float(layer_stats.count) > 0, path


def test_a_method_that_needs_statistics_runs_in_the_demo_sweep():
    config = configlib.load_config(f"{CONFIG}:quick,n_per_class=1")
    config.demo.calibration = {"num_batches": 1, "batch_size": 8}
    SEEN.clear()
    record = evaluate.make_evaluator(config)(Cell("dit-d2", "W8A16", "int", "test-needs-stats", 0))
    assert record["fid"] > 0 and record["n_samples"] == 10 and record["materialize"] == "baked"
    member = family.load_member("dit-d2")
    assert len(SEEN) == len(match_rules(member.model, [QuantRule(module_path=member.quant_pattern)]).assignments)
    assert all(seen["hessian"].shape == (seen["k"], seen["k"]) and seen["count"] > 0 for seen in SEEN)


def test_unknown_calibration_field_is_named():
    config = configlib.load_config(f"{CONFIG}:quick,n_per_class=1")
    config.demo.calibration = {"num_batchez": 2}
    with pytest.raises(ValueError, match="num_batchez"):
        evaluate.make_evaluator(config)


def test_packed_cells_run_qarrays_and_match_baked_ones():
    config = configlib.load_config(f"{CONFIG}:quick,n_per_class=2")
    assert "W4A16" in config.quant.packed_settings
    cell = Cell("dit-d2", "W4A16", "int", "rtn", 0)
    packed = evaluate.make_evaluator(config)(cell)
    config.quant.packed_settings = ()
    baked = evaluate.make_evaluator(config)(cell)
    assert (packed["materialize"], baked["materialize"]) == ("packed", "baked")
    assert packed["storage_bytes"] == baked["storage_bytes"]  # measured from the QArrays == analytic
    assert packed["fid"] == pytest.approx(baked["fid"], rel=1e-4)
