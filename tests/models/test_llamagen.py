"""LlamaGen GPT: RoPE table, causality, KV cache vs teacher forcing, GQA head mapping, sizes of the releases."""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bitlaws import configlib
from bitlaws.models.common import random_model
from bitlaws.models.llamagen import LlamaGen, cross_entropy, ffn_hidden_dim, find_multiple, rope_table_2d
from bitlaws.quant.layers import QLinear

jax.config.update("jax_default_matmul_precision", "highest")

CONFIG = pathlib.Path(__file__).resolve().parents[2] / "configs" / "models" / "llamagen_gpt.py"
TINY = dict(dim=32, n_layer=2, n_head=4, vocab_size=24, num_classes=5, block_size=9, multiple_of=16)


def tiny(seed: int = 0, **overrides) -> LlamaGen:
    return random_model(lambda: LlamaGen(**{**TINY, **overrides}, rngs=nnx.Rngs(0)), seed)


def test_rope_table_layout():
    table = rope_table_2d(3, 8, 10000.0, 1)  # [1 + 9, 4, 2]
    assert table.shape == (10, 4, 2) and table.dtype == np.float32
    assert not table[0].any()  # the class token's row is zeros, not (cos 1, sin 0)
    np.testing.assert_allclose(np.square(table[1:]).sum(-1), 1.0, rtol=1e-6)
    angles = np.arctan2(table[1:, :, 1], table[1:, :, 0])  # [9, 4]: [row * f, col * f] with f = (1, 0.01)
    token = 1 * 3 + 2  # row 1, col 2
    np.testing.assert_allclose(angles[token], [1.0, 0.01, 2.0, 0.02], rtol=1e-6)
    with pytest.raises(ValueError, match="head_dim divisible by 4"):
        rope_table_2d(3, 6)


def test_ffn_width_and_find_multiple():
    assert find_multiple(10, 8) == 16 and find_multiple(16, 8) == 16
    assert ffn_hidden_dim(768, 256) == 2048  # GPT-B: int(2 * 3072 / 3) = 2048
    assert ffn_hidden_dim(64, 256) == 256
    assert ffn_hidden_dim(768, 256, 1.3) == find_multiple(int(1.3 * 2048), 256)


def test_every_matmul_is_a_seam_layer():
    model = nnx.eval_shape(lambda: LlamaGen(**TINY, rngs=nnx.Rngs(0)))
    kernels = [path for path, _ in nnx.iter_graph(model) if path and path[-1] == "kernel"]
    owners = {path[:-1] for path in kernels}
    modules = dict(nnx.iter_graph(model))
    assert owners and all(isinstance(modules[p], QLinear) for p in owners)
    assert len(owners) == TINY["n_layer"] * 5 + 1  # wqkv, wo, w1, w2, w3 per block + output


def test_logits_are_causal():
    model = tiny()
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 24, (2, 9)))
    labels = jnp.asarray([1, 5])  # 5 = null class
    forward = nnx.jit(lambda model, tokens, labels: model(tokens, labels))
    logits = forward(model, tokens, labels)
    assert logits.shape == (2, 9, 24) and logits.dtype == jnp.float32
    changed = forward(model, tokens.at[:, 4].set((tokens[:, 4] + 1) % 24), labels)
    # Row i sees tokens < i: changing token 4 leaves rows 0..4 alone and changes row 5 on.
    np.testing.assert_array_equal(np.asarray(changed[:, :5]), np.asarray(logits[:, :5]))
    assert np.abs(np.asarray(changed[:, 5:] - logits[:, 5:])).max() > 1e-4
    other_class = forward(model, tokens, jnp.asarray([2, 5]))
    assert np.abs(np.asarray(other_class[0] - logits[0])).max() > 1e-4
    np.testing.assert_array_equal(np.asarray(other_class[1]), np.asarray(logits[1]))
    loss = cross_entropy(logits, tokens)
    expected = -np.mean(np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), np.asarray(tokens)[..., None], -1))
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)


def test_kv_cache_matches_teacher_forcing_with_gqa():
    """The cache keeps n_kv_head heads (the MHA cache is checked against upstream by the llamagen_gpt fixture)."""
    model = tiny(1, n_kv_head=2)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 24, (3, 9)))
    labels = jnp.asarray([0, 3, 4])

    @nnx.jit
    def both(model, tokens, labels):
        reference = model(tokens, labels)
        logits, cache = model.prefill(labels, model.empty_cache(tokens.shape[0]))

        def step(cache, i):
            logits, cache = model.decode_step(tokens[:, i], cache, i)
            return cache, logits

        _, rest = jax.lax.scan(step, cache, jnp.arange(tokens.shape[1] - 1))
        return reference, jnp.concatenate([logits[:, None], jnp.moveaxis(rest, 0, 1)], axis=1)

    reference, cached = both(model, tokens, labels)
    np.testing.assert_allclose(np.asarray(cached), np.asarray(reference), atol=1e-5, rtol=0)


def test_gqa_head_j_uses_kv_head_j_div_rep():
    """A GQA model equals the MHA model whose k/v heads repeat kv head j // rep (repeat_interleave, not tile)."""
    gqa = tiny(2, n_kv_head=2)
    mha = tiny(2)
    hd, dim = 8, 32
    for g_layer, m_layer in zip(gqa.layers, mha.layers):
        w = np.asarray(g_layer.attention.wqkv.kernel[...])  # [D, D + 2 * 2 * hd]
        q, k, v = w[:, :dim], w[:, dim:dim + 2 * hd], w[:, dim + 2 * hd:]
        rep = lambda x: np.repeat(x.reshape(dim, 2, hd), 2, axis=1).reshape(dim, 4 * hd)  # noqa: E731
        m_layer.attention.wqkv.kernel[...] = jnp.asarray(np.concatenate([q, rep(k), rep(v)], axis=1))
        for name in ("wo",):
            getattr(m_layer.attention, name).kernel[...] = getattr(g_layer.attention, name).kernel[...]
        for name in ("w1", "w2", "w3"):
            getattr(m_layer.feed_forward, name).kernel[...] = getattr(g_layer.feed_forward, name).kernel[...]
        m_layer.attention_norm.weight[...] = g_layer.attention_norm.weight[...]
        m_layer.ffn_norm.weight[...] = g_layer.ffn_norm.weight[...]
    for name in ("cls_embedding", "tok_embeddings", "norm", "output"):
        nnx.update(getattr(mha, name), nnx.state(getattr(gqa, name)))
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 24, (2, 9)))
    labels = jnp.asarray([1, 2])
    forward = jax.jit(lambda tokens, labels: (mha(tokens, labels), gqa(tokens, labels)))
    ours_mha, ours_gqa = forward(tokens, labels)
    np.testing.assert_allclose(np.asarray(ours_mha), np.asarray(ours_gqa), atol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_kv_head=3), "n_kv_head=3 must divide n_head=4"),
    (dict(block_size=10), "block_size=10 must be a square"),
    (dict(model_type="t2i"), "model_type='t2i'"),
    (dict(dim=30), "dim=30 is not divisible by n_head=4"),
    (dict(cls_token_num=2), "cls_token_num=2"),
])
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LlamaGen(**{**TINY, **kwargs}, rngs=nnx.Rngs(0))


def test_bad_token_shape():
    model = tiny()
    with pytest.raises(ValueError, match="tokens must be"):
        model(jnp.zeros((2, 10), jnp.int32), jnp.zeros((2,), jnp.int32))


@functools.lru_cache(maxsize=None)
def param_count(variant: str) -> int:
    config = configlib.load_config(f"{CONFIG}:{variant}")
    model = nnx.eval_shape(lambda: LlamaGen(**config.gpt.to_dict(), rngs=nnx.Rngs(0)))
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))))


# Our counts (eval_shape, same tensors and shapes as upstream): B 110,888,448; L 342,910,976; XL 774,699,520;
# XXL 1,410,972,672; 3B 3,096,659,200. Released (README / paper): 111M, 343M, 775M, 1.4B, 3.1B.
EXACT = {"b": 110_888_448, "l": 342_910_976, "xl": 774_699_520, "xxl": 1_410_972_672, "3b": 3_096_659_200}
RELEASED = {"b": 111e6, "l": 343e6, "xl": 775e6, "xxl": 1.4e9, "3b": 3.1e9}
LAST_DIGIT = {"b": 1e6, "l": 1e6, "xl": 1e6, "xxl": 0.1e9, "3b": 0.1e9}


@pytest.mark.parametrize("variant", ["b", "l", "xl", "xxl", "3b"])
def test_param_counts_match_the_release(variant):
    count = param_count(variant)
    config = configlib.load_config(f"{CONFIG}:{variant}")
    assert count == EXACT[variant] == config.exact_params
    assert config.released_params == RELEASED[variant]
    # Within 0.5%, or within the rounding of the published figure (XXL: 1.411B published as "1.4B", 0.8% off).
    tolerance = max(0.005 * RELEASED[variant], LAST_DIGIT[variant] / 2)
    assert abs(count - RELEASED[variant]) <= tolerance, f"{variant}: {count:,} vs {RELEASED[variant]:,.0f}"


def test_config_fields():
    config = configlib.load_config(f"{CONFIG}:variant=xl,image_size=384")
    gpt = config.gpt
    assert (gpt.dim, gpt.n_layer, gpt.n_head, gpt.block_size, gpt.vocab_size) == (1280, 36, 20, 576, 16384)
    assert (gpt.num_classes, gpt.cls_token_num, gpt.class_dropout_prob, gpt.n_kv_head) == (1000, 1, 0.1, None)
    sampling = config.sampling
    assert (sampling.cfg_scale, sampling.top_k, sampling.top_p, sampling.temperature) == (1.75, 0, 1.0, 1.0)
    assert config.checkpoint.file == "c2i_XL_384.pt" and config.checkpoint.key == "model"
    assert configlib.load_config(f"{CONFIG}:b").gpt.block_size == 256
    assert configlib.load_config(f"{CONFIG}:3b,image_size=384").checkpoint.key == ""  # FSDP export: flat
    with pytest.raises(ValueError, match="unknown variant 'xxxs'"):
        configlib.load_config(f"{CONFIG}:variant=xxxs")
    with pytest.raises(ValueError, match="image_size=512"):
        configlib.load_config(f"{CONFIG}:b,image_size=512")
