"""`bitlaws.sample.draws` equals `jax.random` bit for bit (the flat-draw layout it relies on)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitlaws.sample import draws


@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 16), (4, 6, 6, 3), (7,)])
@pytest.mark.parametrize("seed", [0, 11])
def test_normal_and_gumbel_equal_jax_random(shape, seed):
    key = jax.random.fold_in(jax.random.key(seed), 3)
    np.testing.assert_array_equal(np.asarray(draws.normal(key, shape)), np.asarray(jax.random.normal(key, shape)))
    np.testing.assert_array_equal(np.asarray(draws.gumbel(key, shape)), np.asarray(jax.random.gumbel(key, shape)))
    assert draws.normal(key, shape).shape == shape


@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 16), (1, 1, 4096)])
def test_categorical_equals_jax_random_categorical(shape):
    logits = jax.random.normal(jax.random.key(0), shape) * 3.0
    logits = logits.at[..., 0].set(-jnp.inf)  # masked entries are never drawn
    for seed in range(4):
        key = jax.random.key(seed)
        ours = draws.categorical(key, logits)
        assert ours.dtype == jnp.int32
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(jax.random.categorical(key, logits, axis=-1)))
        assert not (np.asarray(ours) == 0).any()
