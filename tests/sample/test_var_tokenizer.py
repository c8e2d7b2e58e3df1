"""Tests of the VAR tokenizer step shared by every scale (`bitlaws.sample.var_tokenizer`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bitlaws.models.vqvae import VectorQuantizer2
from bitlaws.sample import var_tokenizer
from bitlaws.sample.filtering import gumbel_softmax, sample_top_k_top_p

PATCH_NUMS = (1, 2, 3, 4, 6)  # 3 -> 4 and 6 -> 4 windows overlap; 4 Phi convs shared by 5 scales
SIDE, ROWS, CVAE, VOCAB, BATCH = 6, 36, 4, 16, 2


@pytest.fixture(scope="module")
def quantizer() -> VectorQuantizer2:
    """The VQVAE's quantizer: it has the sampler's tokenizer interface (embed, phi_index, phi_at, v_patch_nums)."""
    return VectorQuantizer2(VOCAB, CVAE, using_znorm=False, v_patch_nums=PATCH_NUMS, quant_resi=0.5,
                            share_quant_resi=4, default_qresi_counts=0, rngs=nnx.Rngs(3))


def _normal(seed, shape, scale=1.0):
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def test_update_equals_the_per_scale_step_with_one_program(quantizer):
    """Every scale through one compiled program equals upstream's step (`get_next_autoregressive_input`);
    code rows past the scale's ``pn**2`` are never read."""
    step = jax.jit(lambda tables, codes, f_hat: var_tokenizer.update_f_hat(quantizer, tables, codes, f_hat))
    f_hat = _normal(0, (BATCH, SIDE, SIDE, CVAE))
    for si, pn in enumerate(PATCH_NUMS):
        h = _normal(10 + si, (BATCH, pn, pn, CVAE))
        garbage = _normal(20 + si, (BATCH, ROWS - pn * pn, CVAE), 1e3)
        codes = jnp.concatenate([h.reshape(BATCH, pn * pn, CVAE), garbage], axis=1)
        got_f_hat, got_rows = step(var_tokenizer.scale_tables(quantizer, si), codes, f_hat)
        want_f_hat, want_next = quantizer.get_next_autoregressive_input(si, len(PATCH_NUMS), f_hat, h)
        np.testing.assert_allclose(np.asarray(got_f_hat), np.asarray(want_f_hat), rtol=1e-5, atol=1e-5)
        if si < len(PATCH_NUMS) - 1:
            rows = np.asarray(want_next).reshape(BATCH, -1, CVAE)
            padded = np.concatenate([rows, np.repeat(rows[:, -1:], ROWS - rows.shape[1], axis=1)], axis=1)
            np.testing.assert_allclose(np.asarray(got_rows), padded, rtol=1e-5, atol=1e-5)
        f_hat = want_f_hat
    assert step._cache_size() == 1


def test_phi_at_picks_each_scales_conv(quantizer):
    h = _normal(1, (BATCH, SIDE, SIDE, CVAE))
    chosen = jax.jit(quantizer.phi_at)
    indices = [quantizer.phi_index(si) for si in range(len(PATCH_NUMS))]
    assert len(set(indices)) == 4  # every conv is used
    for si, index in enumerate(indices):
        np.testing.assert_allclose(np.asarray(chosen(np.int32(index), h)), np.asarray(quantizer.phi(si, h)),
                                   rtol=1e-6, atol=1e-6)


def test_draw_is_chunked_over_real_rows_only(quantizer):
    """Chunk ``c`` draws from ``fold_in(key, c)``; rows past ``pn**2`` change no real token; rows past the last
    chunk stay zero; codes are the drawn tokens' codes."""
    si, chunk = 3, 6  # pn = 4: 16 real rows -> chunks 0..2 (rows 0-17)
    tables = var_tokenizer.scale_tables(quantizer, si)
    key = jax.random.key(7)
    draw = jax.jit(lambda g: var_tokenizer.draw_tokens(quantizer, tables, g, key, top_k=5, top_p=0.8,
                                                       more_smooth=False, chunk=chunk))
    guided = _normal(2, (BATCH, ROWS, VOCAB), 3.0)
    tokens, codes = draw(guided)
    for c in range(3):
        sample_key, _ = jax.random.split(jax.random.fold_in(key, c))
        want, _ = sample_top_k_top_p(sample_key, guided[:, c * chunk:(c + 1) * chunk], 5, 0.8)
        np.testing.assert_array_equal(np.asarray(tokens[:, c * chunk:(c + 1) * chunk]), np.asarray(want))
    assert not np.asarray(tokens[:, 18:]).any() and not np.asarray(codes[:, 18:]).any()
    np.testing.assert_array_equal(np.asarray(codes[:, :16]), np.asarray(quantizer.embed(tokens[:, :16])))
    other, _ = draw(guided.at[:, 16:].set(_normal(3, (BATCH, ROWS - 16, VOCAB), 1e4)))
    np.testing.assert_array_equal(np.asarray(other[:, :16]), np.asarray(tokens[:, :16]))


def test_more_smooth_codes_are_gumbel_mixtures(quantizer):
    si = 2
    tables = var_tokenizer.scale_tables(quantizer, si)
    key = jax.random.key(8)
    guided = _normal(4, (BATCH, ROWS, VOCAB), 2.0)
    _, codes = var_tokenizer.draw_tokens(quantizer, tables, guided, key, top_k=0, top_p=0.0, more_smooth=True,
                                         chunk=ROWS)
    _, gumbel_key = jax.random.split(jax.random.fold_in(key, 0))
    ratio = si / (len(PATCH_NUMS) - 1)
    weights = gumbel_softmax(gumbel_key, guided * (1 + ratio), max(0.27 * (1 - ratio * 0.95), 0.005))
    want = weights @ quantizer.embedding.embedding[...]
    np.testing.assert_allclose(np.asarray(codes[:, :9]), np.asarray(want[:, :9]), rtol=1e-5, atol=1e-6)


def test_scale_tables_layout(quantizer):
    first = var_tokenizer.scale_tables(quantizer, 1)  # pn 2 -> next 3
    assert int(first.valid) == 4
    assert first.map_rows.reshape(SIDE, SIDE)[:2, :2].tolist() == [[0, 1], [2, 3]]
    assert (first.map_rows.reshape(SIDE, SIDE)[2:] == ROWS).all()
    assert first.next_rows[:9].tolist() == [0, 1, 2, 6, 7, 8, 12, 13, 14]
    assert (first.next_rows[9:] == 14).all()  # padding repeats the last real row
    assert not first.upsample[:, 2:].any() and not first.downsample[3:].any()
    last = var_tokenizer.scale_tables(quantizer, len(PATCH_NUMS) - 1)
    np.testing.assert_array_equal(last.upsample, np.eye(SIDE))
    assert not last.downsample.any()
    with pytest.raises(ValueError, match="scale index 5"):
        var_tokenizer.scale_tables(quantizer, 5)


def test_chunk_rows():
    assert var_tokenizer.chunk_rows(256, 8) == 32
    assert var_tokenizer.chunk_rows(64, 64) == 4
    assert var_tokenizer.chunk_rows(36, 1000) == 1
    assert var_tokenizer.chunk_rows(7, 2) == 7
    for length in range(1, 70):
        for batch in (1, 3, 8, 64):
            rows = var_tokenizer.chunk_rows(length, batch)
            assert length % rows == 0 and (rows == 1 or batch * rows <= var_tokenizer.CHUNK_TARGET)
