"""MAR transformer and diffusion MLP: token layout, masked encoder, guidance layout, sizes, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bitlaws.configlib import load_config
from bitlaws.models.common import random_model
from bitlaws.models.mar import MAR, param_count

jax.config.update("jax_default_matmul_precision", "highest")

TINY = dict(img_size=16, vae_stride=2, patch_size=2, encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=4,
            decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2, vae_embed_dim=3, class_num=5,
            buffer_size=3, diffloss_d=2, diffloss_w=16, num_sampling_steps="4")


@pytest.fixture(scope="module")
def tiny() -> MAR:
    return random_model(lambda: MAR(**TINY, rngs=nnx.Rngs(0)), seed=3)


def test_patchify_is_channel_major_and_inverts(tiny):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 8, 8, 3)), jnp.float32)  # NHWC latents
    tokens = tiny.patchify(x)
    assert tokens.shape == (2, tiny.seq_len, 3 * 2 * 2)
    # token (row 1, col 2) holds x[1*2:(1+1)*2, 2*2:(2+1)*2] as (channel, p_row, p_col)
    expected = np.transpose(np.asarray(x)[0, 2:4, 4:6, :], (2, 0, 1)).reshape(-1)
    np.testing.assert_array_equal(np.asarray(tokens)[0, 1 * 4 + 2], expected)
    np.testing.assert_array_equal(np.asarray(tiny.unpatchify(tokens)), np.asarray(x))


def _dropped_reference(model: MAR, tokens, mask, cond, kept: int):
    """Upstream's encoder literally: gather the kept rows, then run the blocks on the short sequence."""
    x = model.z_proj(tokens)
    b, _, d = x.shape
    x = jnp.concatenate([jnp.broadcast_to(cond[:, None], (b, model.buffer_size, d)), x], axis=1)
    x = model.z_proj_ln(x + model.encoder_pos_embed_learned[...])
    keep = np.concatenate([np.ones((b, model.buffer_size), bool), np.asarray(mask) < 0.5], axis=1)
    x = jnp.stack([x[i][np.nonzero(keep[i])[0]] for i in range(b)])
    assert x.shape[1] == kept
    for block in model.encoder_blocks:
        x = block(x)
    return model.encoder_norm(x)


def test_masked_attention_equals_dropping_masked_rows(tiny):
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.standard_normal((2, tiny.seq_len, tiny.token_embed_dim)), jnp.float32)
    orders = np.stack([rng.permutation(tiny.seq_len) for _ in range(2)])
    num_masked = 11
    mask = np.zeros((2, tiny.seq_len), np.float32)
    np.put_along_axis(mask, orders[:, :num_masked], 1.0, axis=1)

    @nnx.jit
    def run(model, tokens, labels):
        cond, m = model.class_embedding(labels), jnp.asarray(mask)
        ours = model.forward_mae_encoder(tokens, m, cond, num_masked=num_masked)
        ref = _dropped_reference(model, tokens, mask, cond, model.buffer_size + model.seq_len - num_masked)
        changed = tokens + 100.0 * m[..., None]  # what a masked token holds must not matter
        return ours, ref, model.forward_mae_decoder(ours, m), model(tokens, m, cond), model(changed, m, cond)

    ours, ref, z_scattered, z, z_changed = run(tiny, tokens, jnp.asarray([1, 4]))
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=0, atol=2e-5)
    np.testing.assert_allclose(np.asarray(z_scattered), np.asarray(z), rtol=0, atol=2e-5)
    np.testing.assert_allclose(np.asarray(z_changed), np.asarray(z), rtol=0, atol=2e-5)


def test_uneven_mask_rows_are_refused(tiny):
    mask = np.zeros((2, tiny.seq_len), np.float32)
    mask[0, :3] = 1
    with pytest.raises(ValueError, match="mask"):
        tiny.forward_mae_encoder(jnp.zeros((2, tiny.seq_len, tiny.token_embed_dim)), jnp.asarray(mask),
                                 tiny.uncond_embedding(2))


def test_forward_with_cfg_guides_every_eps_channel(tiny):
    rng = np.random.default_rng(2)
    n, c = 3, tiny.token_embed_dim
    x = jnp.asarray(rng.standard_normal((2 * n, c)), jnp.float32)
    t = jnp.asarray([0, 500, 999] * 2)
    z = jnp.asarray(rng.standard_normal((2 * n, 32)), jnp.float32)
    out = np.asarray(nnx.jit(lambda net, *args: net.forward_with_cfg(*args))(tiny.diffloss, x, t, z, 3.0))
    np.testing.assert_array_equal(out[:n, :c], out[n:, :c])  # all C eps channels guided and shared
    assert np.abs(out[:n, c:] - out[n:, c:]).max() > 1e-3  # variance values stay per half
    plain = np.asarray(nnx.jit(lambda net, *args: net(*args))(tiny.diffloss, jnp.concatenate([x[:n], x[:n]]), t, z))
    guided = plain[n:, :c] + 3.0 * (plain[:n, :c] - plain[n:, :c])
    np.testing.assert_allclose(out[:n, :c], guided, rtol=1e-5, atol=1e-5)


def test_label_drop_uses_fake_latent(tiny):
    cond = tiny.class_embedding(jnp.asarray([0, 1]))
    dropped = np.asarray(tiny.drop_labels(cond, jnp.asarray([0.05, 0.5])))
    np.testing.assert_array_equal(dropped[0], np.asarray(tiny.fake_latent[...])[0])
    np.testing.assert_array_equal(dropped[1], np.asarray(cond)[1])


@pytest.mark.parametrize("variant", ["b", pytest.param("l", marks=pytest.mark.slow),
                                     pytest.param("h", marks=pytest.mark.slow)])
def test_released_sizes_match_the_paper(variant):
    config = load_config(f"configs/models/mar.py:{variant}")
    abstract = nnx.eval_shape(lambda: MAR(**config.model, rngs=nnx.Rngs(0)))
    count = param_count(abstract)
    released = {"b": 208e6, "l": 479e6, "h": 943e6}[variant]
    assert abs(count - released) / released < 0.005
    assert count == config.num_params
    assert abstract.seq_len == 256 and abstract.token_embed_dim == 16


@pytest.mark.parametrize("change, name", [
    (dict(encoder_num_heads=5), "num_heads"),
    (dict(img_size=18), "img_size"),
    (dict(buffer_size=-1), "buffer_size"),
])
def test_bad_constructor_arguments_are_named(change, name):
    with pytest.raises(ValueError, match=name):
        nnx.eval_shape(lambda: MAR(**{**TINY, **change}, rngs=nnx.Rngs(0)))
