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


@pytest.mark.parametrize("source", [pytest.param("samples", marks=pytest.mark.slow), "data"])
@pytest.mark.parametrize("name", ["var-d1", "dit-d2"])
def test_calibration_batches_feed_every_quantized_layer(name, source):
    member = family.load_member(name)
    batches = member.calibration_batches(2, 8, seed=0, source=source)
    assert len(batches) == 2
    again = member.calibration_batches(2, 8, seed=0, source=source)
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


@pytest.mark.slow  # samples the float VAR (about 40 s on 2 cores)
def test_var_calibrates_on_its_own_samples_with_spread_labels():
    member = family.load_member("var-d1")
    data = family.calibration_data(member, {"num_batches": 2, "batch_size": 10, "seed": 3})
    assert data.description["source"] == "samples" and "own samples" in data.description["protocol"]
    labels = np.concatenate([np.asarray(b[0]) for b in data.batches])
    real = labels[labels != member.model.num_classes]
    assert 0 < real.size < labels.size  # some rows relabelled as the null class, not all
    spread = family.spread_labels(20, member.model.num_classes, 3)
    assert np.bincount(spread, minlength=10).tolist() == [2] * 10
    np.testing.assert_array_equal(real, spread[labels != member.model.num_classes])
    # The teacher-forced inputs are the tokenizer's embedding of token maps the float model sampled itself.
    drawn = own_var_inputs(member, spread, 3)
    np.testing.assert_allclose(np.asarray(data.batches[0][1]), np.asarray(drawn[:10]), rtol=1e-6, atol=1e-6)


def own_var_inputs(member, labels, seed):
    from bitlaws.sample.var_sampler import autoregressive_infer_cfg  # pylint: disable=g-import-not-at-top
    import jax  # pylint: disable=g-import-not-at-top

    out = autoregressive_infer_cfg(member.model, member.tokenizer, B=len(labels), label_B=labels,
                                   key=jax.random.key(seed), cfg=member.cfg, top_k=member.top_k, top_p=member.top_p,
                                   return_logits=True)
    return member.tokenizer.idx_bl_to_var_input(out.tokens)


def test_dit_calibrates_along_its_sampling_trajectory():
    import jax  # pylint: disable=g-import-not-at-top
    from bitlaws.demo import dit_family  # pylint: disable=g-import-not-at-top

    member = family.load_member("dit-d2")
    labels = family.spread_labels(4, 10, 0)
    x_t, t, doubled = dit_family.sampling_trajectory(member.model, labels, jax.random.key(0),
                                                     cfg_scale=member.cfg_scale, respacing=member.respacing)
    diffusion = dit_family.sampling_diffusion(member.respacing)
    assert x_t.shape[:2] == (diffusion.num_timesteps, 8) and t[0] == t.max() and t[-1] == 0
    assert set(t.tolist()) == set(diffusion.timestep_map.tolist())  # the respaced steps, not all 1000
    np.testing.assert_array_equal(doubled, np.r_[labels, [10] * 4])
    data = family.calibration_data(member, {"num_batches": 2, "batch_size": 8})
    ts = np.concatenate([np.asarray(b[1]) for b in data.batches])
    assert set(ts.tolist()) <= set(diffusion.timestep_map.tolist()) and len(set(ts.tolist())) > 4
    assert "trajectories" in data.description["protocol"]


def test_a_method_that_needs_statistics_runs_in_the_demo_sweep():
    config = configlib.load_config(f"{CONFIG}:quick,n_per_class=1")
    config.demo.calibration = {"num_batches": 1, "batch_size": 8}
    SEEN.clear()
    record = evaluate.make_evaluator(config)(Cell("dit-d2", "W8A16", "int", "test-needs-stats", 0))
    assert record["fid"] > 0 and record["n_samples"] == 10 and record["materialize"] == "baked"
    assert record["calibration"]["source"] == "samples" and record["calibration"]["batch_size"] == 8
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
