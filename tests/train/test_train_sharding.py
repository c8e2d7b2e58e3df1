"""`bitlaws.train.sharding`: the FSDP rule, the mesh, and sharded training on 4 forced host devices."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from bitlaws.train import TrainConfig, make_mesh
from bitlaws.train.sharding import PARAMS, param_spec


@pytest.mark.parametrize("shape,axis_size,min_size,spec", [
    ((512, 1024), 4, 1000, P(None, PARAMS)),  # the largest axis
    ((1024, 512), 4, 1000, P(PARAMS)),
    ((6, 1024, 3), 4, 1000, P(None, PARAMS)),
    ((256, 256), 2, 1000, P(PARAMS)),  # ties: the first
    ((1024, 6), 4, 1000, P(PARAMS)),  # the largest divisible one
    ((6, 1023), 4, 1000, P()),  # none divisible: replicated
    ((16, 16), 4, 1000, P()),  # small: replicated
    ((512, 1024), 1, 0, P()),  # no params axis
    ((), 4, 0, P()),
])
def test_param_spec_shards_large_arrays_on_their_largest_divisible_axis(shape, axis_size, min_size, spec):
    assert param_spec(shape, axis_size, min_size) == spec


def test_mesh_has_auto_data_and_params_axes_and_checks_the_device_count():
    mesh = make_mesh(TrainConfig(steps=1, learning_rate=0.1))
    assert mesh.axis_names == ("data", "params") and mesh.shape["data"] == jax.device_count()
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    with pytest.raises(ValueError, match="mesh_data"):
        make_mesh(TrainConfig(steps=1, learning_rate=0.1, mesh_data=jax.device_count() + 1))
    with pytest.raises(ValueError, match="mesh_params"):
        make_mesh(TrainConfig(steps=1, learning_rate=0.1, mesh_params=jax.device_count() + 1))


def test_data_parallel_and_fsdp_runs_match_one_device(tiny, worker, tmp_path):
    start, finish = worker
    finish(start("shard", str(tmp_path), devices=4))
    report = json.loads((tmp_path / "shard.json").read_text())
    assert report["devices"] == 4
    single = np.load(tmp_path / "single.npz")
    assert report["single"]["devices"] == [0]
    for name in ("data4", "fsdp"):
        assert report[name]["devices"] == [0, 1, 2, 3]
        other = np.load(tmp_path / f"{name}.npz")
        assert sorted(other.files) == sorted(single.files)
        for key in single.files:
            np.testing.assert_allclose(other[key], single[key], rtol=1e-5, atol=1e-6, err_msg=f"{name} {key}")
    replicated = {"['b1']": "P()", "['w1']": "P()", "['w2']": "P()"}
    assert report["data4"]["params"] == report["data4"]["in_step"] == report["data4"]["ema"] == replicated
    # fsdp_min_size=64: w1 [4, 32] and w2 [32, 2] are split over the params axis, b1 [32] is not.
    fsdp = {"['b1']": "P()", "['w1']": "P(None, 'params')", "['w2']": "P('params',)"}
    assert report["fsdp"]["params"] == report["fsdp"]["in_step"] == report["fsdp"]["ema"] == fsdp
    error = report["batch_error"]
    assert "batch size 6" in error and "'data'" in error and "4 devices" in error, error
