"""The learned-sigma diffusion training losses (moved from the DiT demo; shared with MAR's head)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bitlaws.demo import dit_family
from bitlaws.sample import diffusion_losses
from bitlaws.sample.diffusion import create_diffusion

jax.config.update("jax_default_matmul_precision", "highest")


def test_dit_family_keeps_the_old_names():
    for name in ("q_sample", "diffusion_loss_terms", "normal_kl", "discretized_gaussian_log_likelihood"):
        assert getattr(dit_family, name) is getattr(diffusion_losses, name)


def test_q_sample_mixes_data_and_noise_by_the_schedule():
    diffusion = create_diffusion("", noise_schedule="cosine")
    x, noise = jnp.ones((3, 5)), jnp.full((3, 5), 2.0)
    t = jnp.array([0, 500, 999], jnp.int32)
    abar = diffusion.alphas_cumprod[np.asarray(t)]
    expected = np.sqrt(abar)[:, None] * 1.0 + np.sqrt(1 - abar)[:, None] * 2.0
    np.testing.assert_allclose(np.asarray(diffusion_losses.q_sample(diffusion, x, t, noise)),
                               np.broadcast_to(expected, (3, 5)), rtol=1e-5)


def test_token_rows_loss_vanishes_for_the_true_eps_and_posterior_variance():
    diffusion = create_diffusion("", noise_schedule="cosine")  # MAR's head: eps prediction
    x_start = jax.random.uniform(jax.random.key(0), (4, 48), minval=-1.0, maxval=1.0)
    noise = jax.random.normal(jax.random.key(1), x_start.shape)
    t = jnp.array([3, 100, 600, 900], jnp.int32)
    x_t = diffusion_losses.q_sample(diffusion, x_start, t, noise)
    perfect = jnp.concatenate([noise, -jnp.ones_like(noise)], axis=-1)  # v = -1: the true posterior variance
    terms = diffusion_losses.diffusion_loss_terms(diffusion, perfect, x_start, x_t, t, noise)
    assert {name: value.shape for name, value in terms.items()} == {"mse": (4,), "vb": (4,), "loss": (4,)}
    np.testing.assert_allclose(np.asarray(terms["mse"]), 0.0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(terms["vb"]), 0.0, atol=1e-3)
    wrong = jnp.concatenate([jnp.zeros_like(noise), -jnp.ones_like(noise)], axis=-1)
    assert float(diffusion_losses.diffusion_loss_terms(diffusion, wrong, x_start, x_t, t, noise)["mse"].min()) \
        == pytest.approx(float(jnp.square(noise).mean(axis=1).min()), rel=1e-5)
