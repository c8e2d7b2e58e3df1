"""`bitlaws.train.state_io`: named trees, atomic steps, leftovers of killed saves."""

from __future__ import annotations

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from bitlaws.train import STATE_DIR, TrainStateStore
from bitlaws.train.state_io import from_named, to_named


def state(step: int) -> dict:
    params = nnx.split(nnx.Linear(3, 2, rngs=nnx.Rngs(step)), nnx.Param)[1]
    return {"params": params, "opt_state": optax.adamw(1e-3).init(params), "ema": None,
            "step": np.asarray(step, np.int64), "wall_s": np.asarray(0.5 * step, np.float64)}


def test_named_tree_round_trips_nnx_and_optax_state():
    tree = state(1)
    named = to_named(tree)
    assert set(named["params"]["kernel"]) == {"value"}
    assert set(named["opt_state"]["0"]) == {"count", "mu", "nu"}
    back = from_named(named, tree)
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(tree)):
        assert a is b


def test_restore_takes_the_newest_complete_step_and_drops_leftovers(tmp_path):
    with TrainStateStore(tmp_path) as store:
        assert store.latest_step() is None
        store.save(2, state(2))
        store.save(4, state(4))
        assert sorted(p.name for p in store.directory.iterdir()) == ["4"]  # older steps go after a save
    directory = tmp_path / STATE_DIR
    # What kills leave behind: a half-written step (orbax's temporary folder), an old step not yet deleted.
    (directory / "6.orbax-checkpoint-tmp-1234").mkdir()
    (directory / "6.orbax-checkpoint-tmp-1234" / "junk").write_text("x")
    shutil.copytree(directory / "4", directory / "3")
    with TrainStateStore(tmp_path) as store:
        assert store.latest_step() == 4
        restored = store.restore(state(0))
        assert int(restored["step"]) == 4 and float(restored["wall_s"]) == 2.0
        for a, b in zip(jax.tree.leaves(restored["params"]), jax.tree.leaves(state(4)["params"])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
            assert isinstance(a, jax.Array) and a.dtype == jnp.float32
        store.save(5, state(5))
        assert sorted(p.name for p in directory.iterdir()) == ["5"]  # the leftovers too (cleaned in the background)
