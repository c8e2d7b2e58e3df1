"""`bitlaws.train.train` / `train_module` in this process: exact resume, EMA, metrics.jsonl, errors."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from bitlaws.train import METRICS_FILE, STATE_DIR, TrainConfig, make_optimizer, metrics_lines, train, train_module
from bitlaws.train import loop, sharding


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "steps_per_s"} for r in records]


def assert_trees_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def run(tiny, out_dir=None, **kwargs):
    config = kwargs.pop("config", tiny.config())
    return train(tiny.loss_fn, tiny.make_params(), tiny.batch_getter(), config, frozen=tiny.frozen_values(),
                 out_dir=out_dir, progress=False, **kwargs)


def test_stopped_and_resumed_run_is_bitwise_the_uninterrupted_one(tiny, tmp_path):
    config = tiny.config(checkpoint_every=5)
    straight = run(tiny, tmp_path / "straight", config=config)
    assert straight.step == 20 and straight.start_step == 0 and len(straight.history) == 20
    first = run(tiny, tmp_path / "resumed", config=config, stop_after=8)
    assert first.step == 8 and [r["step"] for r in first.history] == list(range(1, 9))
    assert first.wall_s == tiny.saved_state(tmp_path / "resumed", with_wall=True)["['wall_s']"]  # what resumes
    second = run(tiny, tmp_path / "resumed", config=config)
    assert second.start_step == 8 and second.step == 20
    assert [r["step"] for r in second.history] == list(range(9, 21))
    assert second.wall_s > first.wall_s
    assert_trees_equal(tiny.flat(second.params, "p") | tiny.flat(second.ema, "e"),
                       tiny.flat(straight.params, "p") | tiny.flat(straight.ema, "e"))
    assert_trees_equal(tiny.saved_state(tmp_path / "resumed"), tiny.saved_state(tmp_path / "straight"))
    lines = metrics_lines(tmp_path / "resumed")
    assert without_timing(lines) == without_timing(metrics_lines(tmp_path / "straight"))
    assert [r["step"] for r in lines] == list(range(1, 21))
    assert set(lines[0]) == {"step", "loss", "mae", "steps_per_s", "lr"}
    assert lines[0]["lr"] == 0.0 and lines[3]["lr"] == pytest.approx(2e-2)  # warm-up over 3 steps
    assert without_timing(lines[8:]) == without_timing(second.history)
    # The fit improves, the result averages the recent history.
    assert lines[-1]["loss"] < 0.5 * lines[0]["loss"]
    assert second.metrics["loss"] == pytest.approx(np.mean([r["loss"] for r in second.history]))
    # A finished run resumes to a no-op.
    again = run(tiny, tmp_path / "resumed", config=config)
    assert again.start_step == 20 and again.step == 20 and again.history == []
    assert_trees_equal(tiny.flat(again.params, "p"), tiny.flat(straight.params, "p"))


def test_metrics_file_is_cut_back_to_the_restored_step(tiny, tmp_path):
    config = tiny.config(steps=6, checkpoint_every=2, log_every=2)
    run(tiny, tmp_path, config=config, stop_after=4)
    path = tmp_path / METRICS_FILE
    # As if the process died after logging steps 5 and 6 (the last line half written) before checkpointing 6.
    with path.open("a") as f:
        f.write(json.dumps({"step": 6, "loss": 1.0}) + "\n" + '{"step": 7, "lo')
    resumed = run(tiny, tmp_path, config=config)
    assert resumed.start_step == 4
    assert [r["step"] for r in metrics_lines(tmp_path)] == [2, 4, 6]
    assert metrics_lines(tmp_path)[-1]["loss"] != 1.0
    # Without a train state the whole file goes.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / METRICS_FILE).write_text('{"step": 1, "loss": 3.0}\n')
    run(tiny, fresh, config=config, stop_after=1)
    assert metrics_lines(fresh) == []  # step 1 is not a multiple of log_every=2


def test_ema_follows_the_numpy_recursion_with_warmup_decay(tiny):
    seen = []

    def record(params, step):
        seen.append(jax.tree.map(lambda a: np.asarray(a, np.float64), params))
        return params

    result = run(tiny, config=tiny.config(steps=6, ema_decay=0.8), between_steps=record)
    seen.append(jax.tree.map(lambda a: np.asarray(a, np.float64), result.params))
    ema = seen[0]
    for step in range(6):
        decay = min(0.8, (1.0 + step) / (10.0 + step))
        ema = jax.tree.map(lambda e, p, d=decay: d * e + (1.0 - d) * p, ema, seen[step + 1])
    for name in ema:
        np.testing.assert_allclose(np.asarray(result.ema[name]), ema[name], rtol=1e-6, atol=1e-7, err_msg=name)
    assert not np.allclose(np.asarray(result.ema["w1"]), np.asarray(result.params["w1"]))
    assert run(tiny, config=tiny.config(steps=2, ema_decay=None)).ema is None


def test_inputs_are_not_consumed_and_frozen_is_an_argument(tiny):
    params = jax.tree.map(jnp.asarray, tiny.make_params())
    config = tiny.config(steps=3)
    results = [train(tiny.loss_fn, params, tiny.batch_getter(), config, progress=False,
                     frozen={"target_scale": np.asarray(scale, np.float32)}) for scale in (1.5, 0.5)]
    assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(params))  # donation works on copies
    assert not np.array_equal(np.asarray(results[0].params["w1"]), np.asarray(params["w1"]))
    assert not np.array_equal(np.asarray(results[0].params["w1"]), np.asarray(results[1].params["w1"]))
    # One compiled step served both values of `frozen`: an argument, not a constant of the step.
    tx = make_optimizer(config)
    (step_fn,) = [fn for key, fn in loop._STEP_CACHE.items()  # pylint: disable=protected-access
                  if key[0] is tiny.loss_fn and key[1] is tx]
    assert step_fn._cache_size() == 1  # pylint: disable=protected-access


class Regressor(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(4, 8, rngs=rngs)
        self.out = nnx.Linear(8, 2, rngs=rngs)
        self.calls = nnx.Variable(jnp.zeros((), jnp.int32))  # not trained: travels as frozen

    def __call__(self, x):
        return self.out(jnp.tanh(self.hidden(x)))


def module_loss(model, batch, key):
    x, y = batch
    pred = model(x + 0.01 * jax.random.normal(key, x.shape))
    return jnp.mean(jnp.square(pred - y)), {}


def test_train_module_updates_the_model_like_train_on_its_params(tiny):
    model = Regressor(nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    before = jax.tree.map(np.asarray, params)
    hook_types = []
    config = tiny.config(steps=5)
    result = train_module(model, module_loss, tiny.batch_getter(), config, progress=False,
                          between_steps=lambda p, s: (hook_types.append(type(p)), p)[1])
    assert hook_types == [nnx.State] * 5 and result.step == 5
    reference = train(lambda p, r, b, k: module_loss(nnx.merge(graphdef, p, r), b, k), before, tiny.batch_getter(),
                      config, frozen=rest, progress=False)
    got = nnx.state(model, nnx.Param)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(reference.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(model.hidden.kernel[...]), before["hidden"]["kernel"])


def test_custom_optimizer_replaces_the_default_and_logs_no_lr(tiny, tmp_path):
    result = run(tiny, tmp_path, config=tiny.config(steps=2), optimizer=optax.sgd(0.0))
    assert_trees_equal(tiny.flat(result.params, ""), tiny.flat(tiny.make_params(), ""))
    assert "lr" not in metrics_lines(tmp_path)[0]


def test_resume_into_another_structure_names_the_keys(tiny, tmp_path):
    run(tiny, tmp_path, config=tiny.config(steps=2))
    with pytest.raises(ValueError, match=r"does not match this run \(shape, dtype\): missing \[\].*unexpected \['ema/b1'"):
        run(tiny, tmp_path, config=tiny.config(steps=4, ema_decay=None))
    old = tmp_path / "old"
    (old / STATE_DIR).mkdir(parents=True)
    (old / STATE_DIR / "_CHECKPOINT_METADATA").write_text("{}")  # what the demo trainers wrote before
    with pytest.raises(ValueError, match="holds no bitlaws.train state"):
        run(tiny, old)


def test_batch_leaves_need_a_batch_axis(tiny):
    mesh = sharding.make_mesh(TrainConfig(steps=1, learning_rate=0.1, mesh_data=1))
    with pytest.raises(ValueError, match=r"batch leaf \['labels'\] has a scalar"):
        sharding.check_batch({"images": np.zeros((4, 2)), "labels": np.int32(3)}, mesh)
    with pytest.raises(ValueError, match="stop_after"):
        run(tiny, stop_after=-1)
