"""MAR sampling: mask schedule, guidance schedule, padded head rows, and the jitted loop end to end."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bitlaws.models.common import random_model
from bitlaws.models.mar import MAR
from bitlaws.models.mar_vae import MarAutoencoderKL
from bitlaws.sample import mar_sampler

jax.config.update("jax_default_matmul_precision", "highest")

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures"
TINY = dict(img_size=16, vae_stride=4, patch_size=1, encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2,
            decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, vae_embed_dim=4, class_num=5,
            buffer_size=2, diffloss_d=1, diffloss_w=16, num_sampling_steps="3")
NUM_ITER = 5


@pytest.fixture(scope="module")
def tiny() -> MAR:
    return random_model(lambda: MAR(**TINY, rngs=nnx.Rngs(0)), seed=5)


def test_mask_schedule_matches_the_fixture_run():
    diagnostics = json.loads((FIXTURES / "manifest.json").read_text())["fixtures"]["mar"]["diagnostics"]
    seq_len = 16
    num_iter = len(diagnostics["gen_mask_len_per_step"])
    np.testing.assert_array_equal(mar_sampler.mask_lengths(seq_len, num_iter), diagnostics["gen_mask_len_per_step"])
    np.testing.assert_array_equal(mar_sampler.predicted_counts(seq_len, num_iter),
                                  diagnostics["gen_n_predicted_per_step"])


@pytest.mark.parametrize("seq_len, num_iter", [(16, 4), (256, 64), (256, 256), (16, 40), (1, 3), (64, 1)])
def test_every_token_is_predicted_exactly_once(seq_len, num_iter):
    counts = mar_sampler.predicted_counts(seq_len, num_iter)
    lengths = mar_sampler.mask_lengths(seq_len, num_iter)
    assert counts.sum() == seq_len and (counts >= 0).all() and counts[-1] >= 1
    assert (lengths >= 1).all() and (np.diff(lengths) <= 0).all()
    remaining = np.concatenate([[seq_len], lengths[:-1]])
    assert (lengths[:-1] <= np.maximum(remaining[:-1] - 1, 1)).all()  # at least one token masked out per step


def test_cfg_schedules():
    linear = mar_sampler.cfg_schedule_values(3.0, "linear", 16, 4)
    lengths = mar_sampler.mask_lengths(16, 4)
    np.testing.assert_allclose(linear, 1 + 2.0 * (16 - lengths) / 16, rtol=1e-6)
    assert linear.dtype == np.float32 and np.all(np.diff(linear) > 0) and linear[-1] < 3.0
    np.testing.assert_array_equal(mar_sampler.cfg_schedule_values(2.5, "constant", 16, 4), np.float32([2.5] * 4))
    with pytest.raises(ValueError, match="cfg_schedule"):
        mar_sampler.cfg_schedule_values(2.0, "cosine", 16, 4)


def test_pad_rows_roundtrip():
    rows = np.arange(2 * 3 * 2 * 4, dtype=np.float32).reshape(12, 4)  # G=2, B=3, n=2
    padded = mar_sampler.pad_rows(rows, 2, 3, 5)
    assert padded.shape == (30, 4)
    np.testing.assert_array_equal(padded.reshape(2, 3, 5, 4)[:, :, 2:], 0)
    np.testing.assert_array_equal(mar_sampler.unpad_rows(padded, 2, 3, 5, 2), rows)
    with pytest.raises(ValueError, match="rows"):
        mar_sampler.pad_rows(rows, 2, 3, 1)


@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_sampling_end_to_end_with_a_key(tiny, cfg):
    labels = jnp.asarray([0, 3, 4])

    def sample(seed):  # return_steps=True throughout: one compiled program per cfg
        return mar_sampler.sample_tokens(tiny, labels, num_iter=NUM_ITER, cfg=cfg, temperature=0.9,
                                         key=jax.random.key(seed), return_steps=True)

    tokens, records = sample(7)
    assert tokens.shape == (3, 4, 4, 4) and bool(jnp.isfinite(tokens).all())
    predicted = np.asarray(records["mask_to_pred"]).sum(axis=0)  # [B, L]: how often each position was predicted
    np.testing.assert_array_equal(predicted, 1)
    np.testing.assert_array_equal(np.asarray(records["mask_to_pred"]).sum(axis=2),
                                  np.repeat(records["counts"][:, None], 3, axis=1))
    np.testing.assert_array_equal(np.asarray(records["mask_in"])[0], 1)  # everything unknown at the start
    np.testing.assert_array_equal(np.asarray(sample(7)[0]), np.asarray(tokens))
    assert np.abs(np.asarray(sample(8)[0]) - np.asarray(tokens)).max() > 1e-3


def test_decoded_images_are_finite(tiny):
    vae = random_model(lambda: MarAutoencoderKL(embed_dim=4, ch_mult=(1, 1, 1), ch=32, num_res_blocks=1,
                                                attn_resolutions=(4,), resolution=16, rngs=nnx.Rngs(0)), seed=1)
    tokens, _ = mar_sampler.sample_tokens(tiny, jnp.asarray([1, 2, 3]), num_iter=NUM_ITER, cfg=1.0,
                                          key=jax.random.key(0), return_steps=True)
    image = nnx.jit(mar_sampler.decode_tokens)(vae, tokens)
    assert image.shape == (3, 16, 16, 3) and bool(jnp.isfinite(image).all())


def test_injected_draws_are_checked(tiny):
    labels = jnp.asarray([0, 1])
    counts = mar_sampler.predicted_counts(tiny.seq_len, NUM_ITER)
    init = np.zeros((NUM_ITER, 2, int(counts.max()), 4), np.float32)
    with pytest.raises(ValueError, match="init_noise"):
        mar_sampler.sample_tokens(tiny, labels, num_iter=NUM_ITER, key=jax.random.key(0), init_noise=init)
    steps = np.zeros((NUM_ITER, 3, 2 * int(counts.max()) + 1, 4), np.float32)
    with pytest.raises(ValueError, match="step_noise"):
        mar_sampler.sample_tokens(tiny, labels, num_iter=NUM_ITER, key=jax.random.key(0), init_noise=init,
                                  step_noise=steps)
    with pytest.raises(ValueError, match="orders"):
        mar_sampler.sample_tokens(tiny, labels, num_iter=NUM_ITER, key=jax.random.key(0),
                                  orders=jnp.zeros((2, 3), jnp.int32))
    with pytest.raises(ValueError, match="key"):
        mar_sampler.sample_tokens(tiny, labels, num_iter=NUM_ITER)
