"""Gaussian diffusion: upstream respacing, schedules, learned-range variance and the jitted sampling loops."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bitlaws.models.common import random_model
from bitlaws.models.dit import DiT
from bitlaws.sample.diffusion import (GaussianDiffusion, create_diffusion, decode_latents, linear_beta_schedule,
                                      respace_betas, space_timesteps)

jax.config.update("jax_default_matmul_precision", "highest")


# ----------------------------------------------------------------------------- respacing (values derived by hand)


def test_space_timesteps_250():
    # One section of 1000 steps, fractional stride 999/249 = 4.01205; round(k * stride).
    steps = space_timesteps(1000, "250")
    assert len(steps) == 250 and min(steps) == 0 and max(steps) == 999
    assert {0, 4, 8, 12, 16, 20} <= steps  # k = 0..5
    assert 164 in steps and 169 in steps  # k=41: 164.494 -> 164; k=42: 168.506 -> 169
    assert not steps & {165, 166, 167, 168}


def test_space_timesteps_10_is_stride_111():
    assert space_timesteps(1000, "10") == {0, 111, 222, 333, 444, 555, 666, 777, 888, 999}


def test_space_timesteps_ddim50_uses_smallest_integer_stride():
    # ceil(1000 / s) == 50 first holds at s = 20.
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert space_timesteps(1000, "ddim25") == set(range(0, 1000, 40))


def test_space_timesteps_two_sections():
    # Two sections of 500 steps, 25 each, stride 499/24 = 20.79: k=1 -> 21, k=2 -> 42 (41.58), last -> 499.
    steps = space_timesteps(1000, "25,25")
    assert len(steps) == 50
    assert {0, 21, 42, 499, 500, 521, 542, 999} <= steps
    assert max(s for s in steps if s < 500) == 499


def test_space_timesteps_rounds_half_to_even():
    assert space_timesteps(10, "3") == {0, 4, 9}  # stride 4.5: round(4.5) = 4
    assert space_timesteps(12, "3") == {0, 6, 11}  # stride 5.5: round(5.5) = 6
    # Sections of 6 and 5 steps: stride 5/3 -> 0, 1.67, 3.33, 5 -> {0, 2, 3, 5}; stride 2 from 6 -> {6, 8, 10}.
    assert space_timesteps(11, "4,3") == {0, 2, 3, 5, 6, 8, 10}


def test_space_timesteps_errors():
    with pytest.raises(ValueError):
        space_timesteps(1000, "ddim999")
    with pytest.raises(ValueError):
        space_timesteps(10, "11")


# ----------------------------------------------------------------------------- schedules


def test_unrespaced_diffusion_keeps_linear_betas():
    diffusion = create_diffusion("")
    assert diffusion.num_timesteps == 1000
    np.testing.assert_array_equal(diffusion.timestep_map, np.arange(1000))
    np.testing.assert_allclose(diffusion.betas, np.linspace(1e-4, 0.02, 1000), rtol=1e-10)
    assert diffusion.betas.dtype == np.float64


def test_respaced_betas_compose_to_the_same_alphas_cumprod():
    betas = linear_beta_schedule(1000)
    new_betas, timestep_map = respace_betas(betas, space_timesteps(1000, "ddim50"))
    np.testing.assert_array_equal(timestep_map, np.arange(0, 1000, 20))
    np.testing.assert_allclose(np.cumprod(1 - new_betas), np.cumprod(1 - betas)[timestep_map], rtol=1e-12)
    np.testing.assert_allclose(new_betas[0], betas[0], rtol=1e-10)  # 1 - (1 - beta_0) / 1.0


def test_learned_range_variance_endpoints_and_original_timesteps():
    diffusion = create_diffusion("10")
    seen = []

    def model_fn(x, t, v):
        seen.append(np.asarray(t))
        return jnp.concatenate([jnp.zeros_like(x), jnp.full_like(x, v)], axis=-1)

    x, t = jnp.ones((2, 2, 2, 3)), jnp.array([3, 9])
    high = diffusion.p_mean_variance(model_fn, x, t, model_kwargs=dict(v=1.0))
    low = diffusion.p_mean_variance(model_fn, x, t, model_kwargs=dict(v=-1.0))
    np.testing.assert_array_equal(seen[0], [333, 999])  # the model sees the ORIGINAL timesteps
    np.testing.assert_allclose(high["log_variance"][:, 0, 0, 0], np.log(diffusion.betas[[3, 9]]), rtol=1e-6)
    np.testing.assert_allclose(low["log_variance"][:, 0, 0, 0],
                               diffusion.posterior_log_variance_clipped[[3, 9]], rtol=1e-6)
    # eps = 0: x0 = sqrt(1/abar) * x, clipped to 1.
    np.testing.assert_array_equal(high["pred_xstart"], np.ones(x.shape))


def test_decode_latents_divides_by_sd_scale():
    out = decode_latents(lambda z: z * 2.0, jnp.full((1, 2, 2, 4), 0.18215))
    np.testing.assert_allclose(out, 2.0, rtol=1e-6)


# ----------------------------------------------------------------------------- loops on a tiny DiT


def _tiny_dit() -> DiT:
    return random_model(lambda: DiT(input_size=4, patch_size=2, in_channels=4, hidden_size=16, depth=1, num_heads=2,
                                    num_classes=5, rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def tiny_setup():
    model = _tiny_dit()
    graphdef, state = nnx.split(model)

    def model_fn(x, t, state, y):
        return nnx.merge(graphdef, state)(x, t, y)

    return create_diffusion("5"), model_fn, dict(state=state, y=jnp.array([1, 3]))


def test_ddpm_loop_is_deterministic_given_the_key(tiny_setup):
    diffusion, model_fn, kwargs = tiny_setup
    shape = (2, 4, 4, 4)
    first, steps = diffusion.p_sample_loop(model_fn, shape, key=jax.random.key(1), model_kwargs=kwargs,
                                           clip_denoised=False, return_steps=True)
    again = diffusion.p_sample_loop(model_fn, shape, key=jax.random.key(1), model_kwargs=kwargs,
                                    clip_denoised=False)
    other = diffusion.p_sample_loop(model_fn, shape, key=jax.random.key(2), model_kwargs=kwargs,
                                    clip_denoised=False)
    assert first.shape == shape and np.isfinite(np.asarray(first)).all()
    assert steps["sample"].shape == (5,) + shape
    np.testing.assert_array_equal(steps["sample"][-1], first)
    np.testing.assert_array_equal(again, first)
    assert np.abs(np.asarray(other - first)).max() > 1e-3


def test_ddpm_loop_with_fixed_noise_still_uses_the_key_and_clips(tiny_setup):
    diffusion, model_fn, kwargs = tiny_setup
    noise = jax.random.normal(jax.random.key(7), (2, 4, 4, 4))
    a = diffusion.p_sample_loop(model_fn, noise.shape, noise, key=jax.random.key(1), model_kwargs=kwargs)
    b = diffusion.p_sample_loop(model_fn, noise.shape, noise, key=jax.random.key(3), model_kwargs=kwargs)
    assert np.abs(np.asarray(a - b)).max() > 1e-3
    # The last step (t = 0) returns the posterior mean with coef1 = 1, coef2 = 0: the clipped x0.
    assert np.abs(np.asarray(a)).max() <= 1.0


def test_ddim_eta0_is_deterministic_and_eta1_is_not(tiny_setup):
    diffusion, model_fn, kwargs = tiny_setup
    noise = jax.random.normal(jax.random.key(7), (2, 4, 4, 4))
    a = diffusion.ddim_sample_loop(model_fn, noise.shape, noise, model_kwargs=kwargs)
    b = diffusion.ddim_sample_loop(model_fn, noise.shape, noise, key=jax.random.key(5), model_kwargs=kwargs)
    np.testing.assert_array_equal(a, b)
    c = diffusion.ddim_sample_loop(model_fn, noise.shape, noise, key=jax.random.key(5), model_kwargs=kwargs,
                                   eta=1.0)
    d = diffusion.ddim_sample_loop(model_fn, noise.shape, noise, key=jax.random.key(6), model_kwargs=kwargs,
                                   eta=1.0)
    assert np.abs(np.asarray(c - d)).max() > 1e-3


def test_loops_need_a_key_for_random_noise(tiny_setup):
    diffusion, model_fn, kwargs = tiny_setup
    with pytest.raises(ValueError):
        diffusion.p_sample_loop(model_fn, (2, 4, 4, 4), key=None, model_kwargs=kwargs)
    with pytest.raises(ValueError):
        diffusion.ddim_sample_loop(model_fn, (2, 4, 4, 4), model_kwargs=kwargs)


def test_gaussian_diffusion_rejects_bad_betas():
    with pytest.raises(ValueError):
        GaussianDiffusion(np.array([0.0, 0.5]))


def test_module_model_fn_uses_current_weights(tiny_setup):
    diffusion, model_fn, kwargs = tiny_setup
    model = _tiny_dit()
    noise = jax.random.normal(jax.random.key(7), (2, 4, 4, 4))
    y = dict(y=kwargs["y"])
    via_module = diffusion.ddim_sample_loop(model, noise.shape, noise, model_kwargs=y)
    via_function = diffusion.ddim_sample_loop(model_fn, noise.shape, noise, model_kwargs=kwargs)
    np.testing.assert_allclose(via_module, via_function, rtol=1e-6, atol=1e-6)
    bias = model.final_layer.linear.bias
    bias.set_value(bias[...] + 0.5)  # in-place update: the cached loop must not keep the old weights
    updated = diffusion.ddim_sample_loop(model, noise.shape, noise, model_kwargs=y)
    assert np.abs(np.asarray(updated - via_module)).max() > 1e-3
