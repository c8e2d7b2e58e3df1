"""The attention implementations agree with the written-out one, and `set_attention` reaches every layer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitlaws.models import attention
from test_dit import random_dit  # pylint: disable=g-bad-import-order  (tests/models is on sys.path)
from test_var import TINY, _teacher_and_incremental, tiny_var

jax.config.update("jax_default_matmul_precision", "highest")


def _qkv(seed=0, b=2, l=5, m=7, h=3, d=8):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in
            ((b, l, h, d), (b, m, h, d), (b, m, h, d))]


@pytest.mark.parametrize("with_mask", [False, True])
def test_fused_path_matches_xla(with_mask):
    q, k, v = _qkv()
    mask = jnp.asarray(np.tril(np.ones((5, 7), bool), k=1)) if with_mask else None
    ref = attention.attend(q, k, v, scale=0.3, mask=mask, impl="xla")
    ours = attention.attend(q, k, v, scale=0.3, mask=mask, impl="dot_product_attention")
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
    if with_mask:  # the mask is honoured: changing a hidden key leaves the output alone
        k2 = k.at[:, 6].add(100.0)
        np.testing.assert_allclose(attention.attend(q, k2, v, scale=0.3, mask=mask), ref, atol=1e-6)
        assert not np.allclose(attention.attend(q, k2, v, scale=0.3, mask=None), ref, atol=1e-3)


def test_unknown_implementation_is_one_line():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="'flash' is not one of xla, dot_product_attention, cudnn"):
        attention.attend(q, k, v, scale=1.0, impl="flash")


def test_var_with_the_fused_path_keeps_its_logits():
    model = tiny_var()
    x_1LCv = jnp.asarray(np.random.default_rng(3).standard_normal((1, sum(p * p for p in TINY["patch_nums"]) - 1,
                                                                     TINY["Cvae"])), jnp.float32)
    labels = jnp.array([2, TINY["num_classes"]])
    teacher, incremental, _ = _teacher_and_incremental(model, labels, x_1LCv)
    assert attention.set_attention(model, "dot_product_attention") == TINY["depth"]
    teacher2, incremental2, _ = _teacher_and_incremental(model, labels, x_1LCv)
    scale = float(jnp.abs(teacher).max())
    np.testing.assert_allclose(teacher2, teacher, atol=1e-5 * scale)
    np.testing.assert_allclose(incremental2, incremental, atol=1e-5 * scale)


def test_dit_with_the_fused_path_keeps_its_output():
    model = random_dit(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4,
                       num_classes=10)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 8, 8, 4)), jnp.float32)
    t, y = jnp.array([3, 500]), jnp.array([1, 10])
    ref = model(x, t, y)
    attention.set_attention(model, "dot_product_attention")
    np.testing.assert_allclose(model(x, t, y), ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()))
    with pytest.raises(ValueError, match="has no attention layer"):
        attention.set_attention(model.x_embedder, "xla")


def test_grouped_query_heads_match_repeated_kv_heads():
    q, _, _ = _qkv(h=4)
    _, k, v = _qkv(seed=1, h=2)
    mask = jnp.asarray(np.tril(np.ones((5, 7), bool), k=2))
    repeated = attention.attend(q, jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2), scale=0.25, mask=mask)
    for impl in ("xla", "dot_product_attention"):
        np.testing.assert_allclose(attention.attend(q, k, v, scale=0.25, mask=mask, impl=impl), repeated,
                                   rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="3 key/value heads do not divide 4 query heads"):
        attention.attend(q, *_qkv(seed=2, h=3)[1:], scale=1.0)
