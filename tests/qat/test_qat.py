"""The qat:* methods on a toy logit model: registration, training lowers the distillation error below RTN's,
materializations agree, LSQ, trainable subsets, the teacher is never touched, and bad input is named."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bitlaws.qat import losses, qat
from bitlaws.quant import CalibrationData, QLinear, QuantRule, QuantSpec, apply_method, get_method, run_method

V = 24  # vocabulary of the toy model


class ToyLogits(nnx.Module):
    """``[B, T, 16] -> [B, T, V]`` logits through two seam layers."""

    def __init__(self, rngs: nnx.Rngs):
        self.fc1 = QLinear(16, 64, rngs=rngs)
        self.fc2 = QLinear(64, V, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x))) * 3.0


@nnx.jit
def _forward(model, batch):
    return model(batch[0])


def _data(n_batches=4, batch=16, seed=0):
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((16, 16)).astype(np.float32)  # correlated inputs
    batches = [(jnp.asarray(rng.standard_normal((batch, 5, 16)).astype(np.float32) @ mix),)
               for _ in range(n_batches)]
    return CalibrationData(_forward, batches, {"source": "toy"})


RULES = [QuantRule(module_path=r"fc[12]", weight=QuantSpec(format="int3"))]
FAST = {"steps": 60, "batch_size": 16, "lr": 3e-3, "warmup_steps": 5, "log_every": 5}


@functools.lru_cache(maxsize=None)
def _model():
    return ToyLogits(nnx.Rngs(0))


def _eval_fkl(model, data):
    teacher = _model()
    values = [losses.forward_kl(_forward(model, b), _forward(teacher, b)) for b in data.batches]
    return float(np.mean(values))


def test_every_loss_is_registered_as_a_qat_method_that_needs_data():
    for name in qat.LOSS_NAMES:
        method = get_method(f"qat:{name}")
        assert method.kind == "qat" and method.needs_data and not method.needs_stats
        assert ("k" in method.defaults) == ("form" in method.defaults) == (name == "topkld")


@pytest.mark.parametrize("loss", ["fkl", "topkld", "mse"])
def test_qat_lowers_the_distillation_error_below_rtn(loss):
    model, data = _model(), _data()
    rtn = apply_method(model, RULES, "rtn", materialize="baked")
    params = dict(FAST, **({"k": 6} if loss == "topkld" else {}))
    run = run_method(model, RULES, f"qat:{loss}", materialize="baked", params=params, data=data)
    info = run.result.info["qat"]
    assert info["steps"] == FAST["steps"] and info["loss_last"] < info["loss_first"]
    trained = apply_method(model, RULES, f"qat:{loss}", materialize="baked", params=params, data=data)
    before, after = _eval_fkl(rtn, data), _eval_fkl(trained, data)
    assert after < 0.8 * before, (loss, before, after)


def test_packed_baked_and_fake_compute_the_trained_model():
    model, data = _model(), _data()
    outs = {how: np.asarray(_forward(apply_method(model, RULES, "qat:fkl", materialize=how, params=FAST, data=data),
                                     data.batches[0]))
            for how in ("packed", "baked", "fake")}
    np.testing.assert_array_equal(outs["packed"], outs["baked"])
    # fake re-quantizes the trained float kernels with RTN at every call: the same weights as baked.
    np.testing.assert_allclose(outs["fake"], outs["baked"], rtol=1e-5, atol=1e-5)


def test_the_teacher_keeps_its_weights_and_training_is_deterministic():
    model, data = _model(), _data()
    before = jax.tree.map(np.array, nnx.state(model, nnx.Param))
    first = run_method(model, RULES, "qat:js", materialize="packed", params=FAST, data=data, seed=3)
    second = run_method(model, RULES, "qat:js", materialize="packed", params=FAST, data=data, seed=3)
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.array, nnx.state(model, nnx.Param)))
    for path in first.result.kernels:
        np.testing.assert_array_equal(first.result.kernels[path], second.result.kernels[path])
    assert set(first.result.params) == {"fc1.bias", "fc2.bias"}  # train="all": biases are rewrites


def test_train_quantized_touches_only_the_quantized_kernels():
    model, data = _model(), _data()
    run = run_method(model, RULES, "qat:rkl", materialize="packed", params=dict(FAST, train="quantized"), data=data)
    assert run.result.params == {} and set(run.result.kernels) == {"fc1", "fc2"}
    assert not np.array_equal(run.result.kernels["fc1"], model.fc1.kernel[...])


@pytest.mark.slow  # 12-42 s; moved out of the default suite to keep it under ~15 min
def test_lsq_learns_the_step_sizes_and_packs_what_it_trained():
    from bitlaws.quant import materialize_result  # pylint: disable=g-import-not-at-top

    model, data = _model(), _data()
    run = run_method(model, RULES, "qat:fkl", materialize="packed", params=dict(FAST, lsq=True, lr_lsq=3e-2),
                     data=data)
    plain = run_method(model, RULES, "qat:fkl", materialize="packed", params=FAST, data=data)
    lsq_scale = np.asarray(run.result.weights["fc2"].scale, np.float32)
    rtn_scale = np.asarray(get_method("rtn").fn.weight_fn(run.result.kernels["fc2"], RULES[0].weight).scale,
                           np.float32)
    assert not np.allclose(lsq_scale, rtn_scale)  # learned ranges, not min-max
    packed, plain_packed = (materialize_result(model, r.assignments, r.result, "packed", r.stats) for r in (run, plain))
    assert _eval_fkl(packed, data) < 1.05 * _eval_fkl(plain_packed, data)
    assert plain.result.info["qat"]["lsq"] is False and run.result.info["qat"]["lsq"] is True


@pytest.mark.parametrize("params, match", [
    ({"k": V + 1}, "k=25 exceeds the vocabulary V=24"),
    ({"batch_size": 1000}, "batch_size=1000 exceeds the 64 rows"),
    ({"train": "some"}, "train='some'"),
    ({"form": "kl"}, "form='kl'"),
    ({"lr": -1.0}, "lr=-1.0"),
    ({"steps": 0}, "steps=0"),
    ({"beta": 1.0}, r"no hyper-parameter\(s\) \['beta'\]"),
])
def test_bad_hyper_parameters_are_named(params, match):
    with pytest.raises(ValueError, match=match):
        run_method(_model(), RULES, "qat:topkld", materialize="packed", params=dict(FAST, **params), data=_data())


def test_without_data_the_error_says_what_is_missing():
    with pytest.raises(ValueError, match="qat:mse needs training data"):
        run_method(_model(), RULES, "qat:mse", materialize="packed", params=FAST)


def test_topkld_default_k_is_the_papers_share_of_the_vocabulary():
    cfg = qat.QatConfig.from_params("topkld", dict(qat.DEFAULTS, k=None))
    fn = qat.distillation_loss(cfg, 4096)
    s, t = jax.random.normal(jax.random.key(0), (2, 2, 3, 4096))
    np.testing.assert_allclose(fn(s, t), losses.topkld(s, t, k=600), rtol=1e-6)


def test_batch_rows_cycle_through_seeded_epochs():
    rows = [qat.batch_indices(10, 4, step, seed=1) for step in range(4)]
    assert len(set(np.concatenate(rows[:2]).tolist())) == 8  # one epoch (2 steps of 4 of 10 rows): no repeats
    assert not np.array_equal(rows[0], rows[2])  # the next epoch is another permutation
    np.testing.assert_array_equal(rows[3], qat.batch_indices(10, 4, 3, seed=1))  # a pure function of the step


def test_lsq_learns_static_activation_scales_and_the_model_uses_them():
    from bitlaws.quant import materialize_result  # pylint: disable=g-import-not-at-top

    static = [QuantRule(module_path=r"fc[12]", weight=QuantSpec(format="int4"),
                        act=QuantSpec(format="int8", granularity="tensor", static=True))]
    model, data = _model(), _data()
    run = run_method(model, static, "qat:fkl", materialize="packed", params=dict(FAST, lsq=True, lr_lsq=3e-2),
                     data=data)
    assert set(run.result.act_params) == {"fc1", "fc2"}
    calibrated = apply_method(model, static, "rtn", materialize="packed", data=data)
    packed = materialize_result(model, run.assignments, run.result, "packed", run.stats)
    for path in ("fc1", "fc2"):
        learned = float(run.result.act_params[path].scale)
        used = float(getattr(packed, path).act_qparams.get_value().scale)
        assert used == learned and learned > 0
        assert learned != float(getattr(calibrated, path).act_qparams.get_value().scale)
    assert _eval_fkl(packed, data) < _eval_fkl(calibrated, data)


@pytest.mark.parametrize("loss", ["topkld", "js"])
def test_cached_teacher_trains_the_same_model_as_a_teacher_in_every_step(loss):
    model, data = _model(), _data()
    params = dict(FAST, steps=20, **({"k": 6} if loss == "topkld" else {}))
    runs = {cache: run_method(model, RULES, f"qat:{loss}", materialize="packed", data=data,
                              params=dict(params, teacher_cache=cache)) for cache in (True, False)}
    assert runs[True].result.info["qat"]["teacher_cache"] and not runs[False].result.info["qat"]["teacher_cache"]
    for path in runs[True].result.kernels:
        np.testing.assert_allclose(runs[True].result.kernels[path], runs[False].result.kernels[path],
                                   rtol=1e-4, atol=1e-6)
    first = [runs[c].result.info["qat"]["loss_first"] for c in (True, False)]
    np.testing.assert_allclose(first[0], first[1], rtol=1e-5)


def test_cached_teacher_branches_are_the_named_losses():
    cfg = qat.QatConfig.from_params("fkl", dict(qat.DEFAULTS, temperature=2.0))
    s, t = jax.random.normal(jax.random.key(1), (2, 2, 3, V))
    in_top = losses.teacher_top_k(t, 9)
    branches = dict(zip(qat.LOSS_NAMES, qat.loss_branches(cfg, V)))
    np.testing.assert_allclose(branches["fkl"](s, t, in_top), losses.forward_kl(s, t, temperature=2.0), rtol=1e-6)
    np.testing.assert_allclose(branches["mse"](s, t, in_top), losses.mse(s, t), rtol=1e-6)
    np.testing.assert_allclose(branches["topkld"](s, t, in_top), losses.topkld(s, t, k=9, temperature=2.0),
                               rtol=1e-6)
    assert qat.use_teacher_cache(cfg, jax.ShapeDtypeStruct((1, 5, V), jnp.float32), 64)  # auto: small pool
    big = jax.ShapeDtypeStruct((1, 680, 4096), jnp.float32)
    assert not qat.use_teacher_cache(cfg, big, 256)  # 256 x 680 x 4096 x 5 bytes > 1 GiB


def test_teacher_cache_must_be_auto_or_a_bool():
    with pytest.raises(ValueError, match="teacher_cache='yes' must be 'auto', True or False"):
        run_method(_model(), RULES, "qat:mse", materialize="packed", params=dict(FAST, teacher_cache="yes"),
                   data=_data())
