"""A small NNX transformer block built on the seam, shared by the quant tests."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from bitlaws.quant import QConv, QLinear


class TinyBlock(nnx.Module):
    """Pre-LN transformer block + a conv stem: every matmul/conv goes through QLinear/QConv."""

    def __init__(self, dim: int, rngs: nnx.Rngs):
        self.stem = QConv(3, dim, 3, padding=1, rngs=rngs)
        self.norm = nnx.LayerNorm(dim, rngs=rngs)
        self.qkv = QLinear(dim, 3 * dim, rngs=rngs)
        self.proj = QLinear(dim, dim, rngs=rngs)
        self.mlp = nnx.List([QLinear(dim, 4 * dim, rngs=rngs), QLinear(4 * dim, dim, rngs=rngs)])

    def __call__(self, img):  # [B, H, W, 3] -> [B, H*W, dim]
        x = self.stem(img)
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        q, k, v = jnp.split(self.qkv(self.norm(x)), 3, axis=-1)
        attn = jax.nn.softmax(q @ jnp.swapaxes(k, -1, -2) / jnp.sqrt(q.shape[-1]), axis=-1)
        x = x + self.proj(attn @ v)
        return x + self.mlp[1](jax.nn.gelu(self.mlp[0](self.norm(x))))

    def reference(self, img):
        """The same computation written without the seam (plain jnp/lax ops)."""
        x = jax.lax.conv_general_dilated(img, self.stem.kernel[...], (1, 1), ((1, 1), (1, 1)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC")) + self.stem.bias[...]
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        dense = lambda layer, h: jnp.dot(h, layer.kernel[...]) + layer.bias[...]  # noqa: E731
        q, k, v = jnp.split(dense(self.qkv, self.norm(x)), 3, axis=-1)
        attn = jax.nn.softmax(q @ jnp.swapaxes(k, -1, -2) / jnp.sqrt(q.shape[-1]), axis=-1)
        x = x + dense(self.proj, attn @ v)
        return x + dense(self.mlp[1], jax.nn.gelu(dense(self.mlp[0], self.norm(x))))


@pytest.fixture
def block():
    return TinyBlock(32, nnx.Rngs(0))


@pytest.fixture
def images():
    return jax.random.normal(jax.random.key(7), (2, 4, 4, 3))
