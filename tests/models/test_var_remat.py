"""Block rematerialization of VAR (`VAR.remat_blocks`): the same loss and gradients, and QAT's ``remat`` option."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bitlaws.qat import qat
from bitlaws.quant import CalibrationData, QuantRule, QuantSpec, run_method
from tests.models.test_var import tiny_var


def _inputs(model, batch=3, seed=0):
    rng = np.random.default_rng(seed)
    labels = jnp.asarray(rng.integers(0, 5, batch), jnp.int32)
    x = jnp.asarray(rng.standard_normal((batch, model.seq_len - model.first_l, model.Cvae)), jnp.float32)
    return labels, x


def _loss_and_grads(model, labels, x):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
        return jnp.mean(jnp.square(nnx.merge(graphdef, params, rest)(labels, x)))

    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.slow  # the same check (with dropout on) and the memory saving run by default in tests/qat/test_qat_memory.py
def test_remat_blocks_gives_the_same_loss_and_gradients():
    model = tiny_var()
    labels, x = _inputs(model)
    plain_loss, plain_grads = _loss_and_grads(model, labels, x)
    model.remat_blocks = True
    remat_loss, remat_grads = _loss_and_grads(model, labels, x)
    np.testing.assert_allclose(remat_loss, plain_loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), remat_grads, plain_grads)


@pytest.mark.slow  # ~2 min: two QAT runs; the remat step's values and memory are also checked in tests/qat/test_qat_memory.py
def test_qat_remat_option_trains_the_same_kernels_and_needs_a_model_that_offers_it():
    model = tiny_var()
    labels, x = _inputs(model, batch=8)
    data = CalibrationData(nnx.jit(lambda m, b: m(b[0], b[1])), [(labels, x)], {"source": "test"},
                           apply=lambda m, b: m(b[0], b[1]))
    rules = [QuantRule(module_path=r"blocks\.\d+\..*", weight=QuantSpec(format="int4"))]
    params = {"steps": 4, "batch_size": 4, "lr": 1e-3, "warmup_steps": 1, "log_every": 1}
    runs = [run_method(model, rules, "qat:fkl", materialize="packed", data=data, params=dict(params, remat=r))
            for r in (False, True)]
    for path, kernel in runs[0].result.kernels.items():
        np.testing.assert_allclose(runs[1].result.kernels[path], kernel, rtol=1e-5, atol=1e-6)
    assert model.remat_blocks is False  # the option changes the student only
    with pytest.raises(ValueError, match="remat=True, but no module of the model offers block rematerialization"):
        qat.use_remat(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), "fkl")
