"""The compute-dtype option of the seam: bf16 operands with float32 accumulation, whole-model switch, JSON."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bitlaws.models.common import random_model
from bitlaws.models.dit import DiT
from bitlaws.quant import LayerQuant, qconv, qdot, set_compute_dtype
from bitlaws.quant.quantized_checkpoint import layer_quant_from_json, layer_quant_to_json

jax.config.update("jax_default_matmul_precision", "highest")


def _rel(a, b):
    return float(jnp.abs(a - b).max() / jnp.abs(b).max())


def test_bf16_dot_and_conv_round_operands_and_accumulate_in_f32():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((4, 64)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((64, 8)), jnp.float32)
    bf16 = LayerQuant(compute_dtype="bfloat16")
    y = qdot(x, w, bf16)
    assert y.dtype == jnp.float32
    expected = jnp.dot(x.astype(jnp.bfloat16).astype(jnp.float32), w.astype(jnp.bfloat16).astype(jnp.float32))
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    assert 1e-4 < _rel(y, qdot(x, w)) < 2e-2  # bf16 operands: visibly rounded, still close
    img = jnp.asarray(rng.standard_normal((2, 6, 6, 3)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, 3, 5)), jnp.float32)
    out = qconv(img, k, bf16)
    assert out.dtype == jnp.float32 and 1e-4 < _rel(out, qconv(img, k)) < 2e-2
    np.testing.assert_array_equal(qdot(x, w, LayerQuant(compute_dtype="float32")), qdot(x, w))


def test_bad_compute_dtype_is_named():
    with pytest.raises(ValueError, match="compute_dtype must be one of .* got 'int8'"):
        LayerQuant(compute_dtype="int8")
    with pytest.raises(ValueError, match="set_compute_dtype: dtype must be one of"):
        set_compute_dtype(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), "fp8")


def test_whole_model_switch_and_back():
    model = random_model(lambda: DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2,
                                     num_heads=4, num_classes=10, rngs=nnx.Rngs(0)), seed=0)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 8, 8, 4)), jnp.float32)
    t, y = jnp.array([3, 500]), jnp.array([1, 10])
    ref = model(x, t, y)
    count = set_compute_dtype(model, "bfloat16")
    assert count > 10
    low = model(x, t, y)
    assert 1e-4 < _rel(low, ref) < 5e-2
    set_compute_dtype(model, None)
    np.testing.assert_array_equal(model(x, t, y), ref)


def test_json_round_trip_keeps_the_compute_dtype():
    quant = LayerQuant(compute_dtype="bfloat16")
    assert layer_quant_from_json(layer_quant_to_json(quant)) == quant
    assert "compute_dtype" not in layer_quant_to_json(LayerQuant())  # files written before the option: unchanged
