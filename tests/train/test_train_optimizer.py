"""`bitlaws.train.optimizer` schedules and `TrainConfig` validation."""

from __future__ import annotations

import math

import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from bitlaws.train import TrainConfig, make_optimizer, make_schedule


def values(schedule, steps: int) -> np.ndarray:
    return np.array([float(schedule(i)) for i in range(steps + 2)])


def test_schedule_warms_up_linearly_then_decays_to_the_final_fraction():
    config = TrainConfig(steps=20, learning_rate=0.1, warmup_steps=4, final_lr_fraction=0.1)
    lr = values(make_schedule(config), 20)
    np.testing.assert_allclose(lr[:5], [0.0, 0.025, 0.05, 0.075, 0.1], rtol=1e-6)
    # cosine from the peak at step 4 to 0.01 at step 20: halfway (step 12) is the mean of both
    np.testing.assert_allclose(lr[12], 0.5 * (0.1 + 0.01), rtol=1e-6)
    np.testing.assert_allclose(lr[20:], 0.01, rtol=1e-6)
    assert np.all(np.diff(lr[4:21]) < 0)


def test_zero_warmup_starts_at_the_peak_unless_a_minimum_is_set():
    assert float(make_schedule(TrainConfig(steps=10, learning_rate=0.1))(0)) == pytest.approx(0.1)
    assert float(make_schedule(TrainConfig(steps=10, learning_rate=0.1, min_warmup_steps=1))(0)) == 0.0


# The schedules of the demo trainers this loop replaced, as they were written there.
def _old_var(train):  # bitlaws/demo/var_family.py: _adamw
    return optax.warmup_cosine_decay_schedule(0.0, train["learning_rate"], max(train["warmup_steps"], 1),
                                              max(train["steps"], train["warmup_steps"] + 1),
                                              end_value=0.05 * train["learning_rate"])


def _old_dit(train):  # bitlaws/demo/dit_family.py: _optimizer
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=train["learning_rate"], warmup_steps=train["warmup_steps"],
        decay_steps=max(train["steps"], train["warmup_steps"] + 1),
        end_value=train["learning_rate"] * train["final_lr_fraction"])


def _old_classifier(train):  # bitlaws/demo/classifier.py: train_classifier
    steps = train["steps"]
    return optax.warmup_cosine_decay_schedule(0.0, train["learning_rate"], warmup_steps=max(1, steps // 20),
                                              decay_steps=steps, end_value=train["learning_rate"] * 0.01)


@pytest.mark.parametrize("steps,warmup", [(600, 100), (4, 1), (7, 0)])
def test_reproduces_the_old_var_and_dit_schedules_bitwise(steps, warmup):
    var = {"steps": steps, "learning_rate": 2e-3, "warmup_steps": warmup}
    new_var = TrainConfig(steps=steps, learning_rate=2e-3, warmup_steps=warmup, min_warmup_steps=1,
                          final_lr_fraction=0.05)
    np.testing.assert_array_equal(values(make_schedule(new_var), steps), values(_old_var(var), steps))
    dit = {"steps": steps, "learning_rate": 1e-3, "warmup_steps": warmup, "final_lr_fraction": 0.1}
    new_dit = TrainConfig(steps=steps, learning_rate=1e-3, warmup_steps=warmup, final_lr_fraction=0.1)
    np.testing.assert_array_equal(values(make_schedule(new_dit), steps), values(_old_dit(dit), steps))


@pytest.mark.parametrize("steps", [20, 1200])
def test_reproduces_the_old_classifier_schedule_bitwise(steps):
    new = TrainConfig(steps=steps, learning_rate=2e-3, warmup_steps=max(1, steps // 20), final_lr_fraction=0.01)
    old = _old_classifier({"steps": steps, "learning_rate": 2e-3})
    np.testing.assert_array_equal(values(make_schedule(new), steps), values(old, steps))


def test_optimizer_clips_the_global_norm_and_is_cached():
    params = {"w": jnp.zeros(4)}
    grads = {"w": jnp.full(4, 100.0)}
    plain = make_optimizer(TrainConfig(steps=5, learning_rate=1.0, grad_clip=None))
    clipped = make_optimizer(TrainConfig(steps=5, learning_rate=1.0, grad_clip=1.0))
    assert make_optimizer(TrainConfig(steps=5, learning_rate=1.0, grad_clip=1.0)) is clipped
    # Adam normalises the step size, so compare the first moments: clipping scales the gradient to norm 1.
    mu_plain = plain.update(grads, plain.init(params), params)[1][0].mu["w"]
    mu_clipped = clipped.update(grads, clipped.init(params), params)[1][1][0].mu["w"]
    np.testing.assert_allclose(np.asarray(mu_plain), 0.1 * 100.0, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(mu_clipped), 0.1 * 0.5, rtol=1e-6)  # 100 / |(100,)*4| = 0.5 each


@pytest.mark.parametrize("field,value", [
    ("steps", 0), ("steps", 2.5), ("steps", True), ("learning_rate", -1.0), ("learning_rate", math.nan),
    ("warmup_steps", -1), ("final_lr_fraction", 1.5), ("weight_decay", -0.1), ("b1", 1.0), ("b2", -0.5),
    ("grad_clip", 0.0), ("grad_clip", "1"), ("ema_decay", 1.0), ("checkpoint_every", -2), ("log_every", 0),
    ("seed", 0.5), ("mesh_data", 0), ("mesh_data", -2), ("mesh_params", 0), ("fsdp_min_size", -1),
    ("distributed", "yes"), ("min_warmup_steps", -1)])
def test_invalid_fields_are_named(field, value):
    fields = {"steps": 10, "learning_rate": 1e-3, field: value}
    with pytest.raises(ValueError, match=rf"TrainConfig\.{field}\b"):
        TrainConfig(**fields)


def test_from_config_names_unknown_keys_and_honours_ignore():
    block = ml_collections.ConfigDict(dict(steps=10.0, learning_rate=1, batch_size=8, val_eval=True, ema_decay=0.99))
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['batch_size', 'val_eval'\]"):
        TrainConfig.from_config(block)
    config = TrainConfig.from_config(block, ignore=("batch_size", "val_eval"))
    assert config == TrainConfig(steps=10, learning_rate=1.0, ema_decay=0.99)
    assert isinstance(config.steps, int) and isinstance(config.learning_rate, float)
    with pytest.raises(ValueError, match=r"missing required field\(s\) \['learning_rate'\]"):
        TrainConfig.from_config({"steps": 3})
    assert TrainConfig.from_config({"steps": 3, "learning_rate": 0.1, "grad_clip": None}).grad_clip is None
