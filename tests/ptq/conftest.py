"""Shared by the PTQ integration tests: a two-layer MLP on the seam and correlated calibration inputs."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from bitlaws.quant import QLinear


class Mlp(nnx.Module):
    """``fc2(gelu(fc1(x)))``, 64 -> 128 -> 32."""

    def __init__(self):
        self.fc1 = QLinear(64, 128, rngs=nnx.Rngs(0))
        self.fc2 = QLinear(128, 32, rngs=nnx.Rngs(1))

    def __call__(self, x):  # [B, 64] -> [B, 32]
        return self.fc2(jax.nn.gelu(self.fc1(x)))


def correlated_inputs(key, n: int, outliers: bool = False) -> jax.Array:
    """``[n, 64]`` correlated inputs (a fixed random mixing), optionally with three outlier channels (x40)."""
    mixing = jax.random.normal(jax.random.key(42), (64, 64)) / 8.0
    x = jax.random.normal(key, (n, 64)) @ mixing + 0.1 * jax.random.normal(jax.random.key(43), (64,))
    return x.at[:, jnp.asarray([3, 17, 40])].multiply(40.0) if outliers else x


@pytest.fixture(name="mlp")
def mlp_fixture() -> Mlp:
    return Mlp()


@pytest.fixture(name="inputs")
def inputs_fixture():
    """`correlated_inputs` for tests (conftest helpers are shared as fixtures, not imports)."""
    return correlated_inputs
