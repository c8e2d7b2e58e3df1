"""Training losses of the learned-sigma Gaussian diffusion (upstream ADM/DiT ``GaussianDiffusion.training_losses``).

Pure functions of a `bitlaws.sample.diffusion.GaussianDiffusion` (its float64 schedules) and jnp arrays, shared by
every model trained with the plain-MSE loss type and learned-range sigma: the demo DiTs (``[B, H, W, C]``
images) and MAR's diffusion head (``[N, C]`` token rows). Arrays are channel-last; "per example" means per
leading row.

``loss = mse + vb``: ``mse`` is the mean squared error of the mean target (eps, or x0 for a ``START_X``
diffusion); ``vb`` is the variational bound term of step ``t`` in bits per dimension, computed with the model's
mean prediction frozen (stop-gradient) so that it trains only the variance interpolation channels:
``KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))`` for ``t > 0`` and the discretized-Gaussian decoder NLL for
``t = 0``. With all training steps used (no respacing) no rescaling of ``vb`` applies.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from bitlaws.sample.diffusion import GaussianDiffusion, MeanType


def _extract(table: np.ndarray, t: jax.Array, ndim: int) -> jax.Array:
    """``table[t]`` (float64 schedule, cast to float32) shaped ``[B, 1, ..., 1]`` of rank `ndim`."""
    values = jnp.asarray(np.asarray(table, np.float64).astype(np.float32))[t]  # [B]
    return values.reshape(values.shape + (1,) * (ndim - 1))


def q_sample(diffusion: GaussianDiffusion, x_start: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``: shape of `x_start` ``[B, ...]`` float32 (`t` ``[B]`` int)."""
    ndim = x_start.ndim
    return (_extract(np.sqrt(diffusion.alphas_cumprod), t, ndim) * x_start
            + _extract(np.sqrt(1.0 - diffusion.alphas_cumprod), t, ndim) * noise)


def normal_kl(mean1: jax.Array, logvar1: jax.Array, mean2: jax.Array, logvar2: jax.Array) -> jax.Array:
    """Elementwise ``KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2)))`` in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2)
                  + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def _approx_standard_normal_cdf(x: jax.Array) -> jax.Array:
    """The tanh approximation of the standard normal CDF used by upstream's decoder likelihood."""
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: jax.Array, means: jax.Array, log_scales: jax.Array) -> jax.Array:
    """Log-likelihood (nats) of 8-bit data `x` in [-1, 1] under a Gaussian discretized into 255 bins.

    Each value owns the bin ``x +- 1/255``; the edge bins extend to -inf / +inf. All arrays share a shape;
    the result has it too.
    """
    centered = x - means
    inv_std = jnp.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def _mean_flat(x: jax.Array) -> jax.Array:
    """Mean over all but the batch axis: ``[B, ...] -> [B]``."""
    return x.reshape(x.shape[0], -1).mean(axis=1)


def diffusion_loss_terms(diffusion: GaussianDiffusion, model_output: jax.Array, x_start: jax.Array,
                         x_t: jax.Array, t: jax.Array, noise: jax.Array) -> dict[str, jax.Array]:
    """The learned-sigma training loss terms per example (upstream ``training_losses``, loss type MSE).

    Args:
        diffusion: The (unrespaced) training diffusion.
        model_output: ``[B, ..., 2C]`` float32: predicted eps (or x0 for a ``START_X`` diffusion) then the
            variance interpolation values.
        x_start: ``[B, ..., C]`` clean data (images in [-1, 1], or token latents).
        x_t: ``[B, ..., C]`` noised data (`q_sample` of `x_start` with `noise` at `t`).
        t: ``[B]`` int32 timesteps.
        noise: ``[B, ..., C]`` the eps that made `x_t`.

    Returns:
        ``mse``, ``vb`` (bits/dim) and ``loss = mse + vb``, each ``[B]`` float32.
    """
    channels = x_start.shape[-1]
    mean_pred, var_values = model_output[..., :channels], model_output[..., channels:]
    frozen = jnp.concatenate([jax.lax.stop_gradient(mean_pred), var_values], axis=-1)  # vb trains sigma only
    ndim = x_start.ndim
    true_mean = (_extract(diffusion.posterior_mean_coef1, t, ndim) * x_start
                 + _extract(diffusion.posterior_mean_coef2, t, ndim) * x_t)
    true_log_variance = _extract(diffusion.posterior_log_variance_clipped, t, ndim)
    model = diffusion.p_mean_variance(lambda _x, _t: frozen, x_t, t, clip_denoised=False)
    kl = _mean_flat(normal_kl(true_mean, true_log_variance, model["mean"], model["log_variance"])) / math.log(2.0)
    decoder_nll = -_mean_flat(discretized_gaussian_log_likelihood(
        x_start, model["mean"], 0.5 * model["log_variance"])) / math.log(2.0)
    vb = jnp.where(t == 0, decoder_nll, kl)  # [B]
    target = x_start if diffusion.mean_type == MeanType.START_X else noise
    mse = _mean_flat(jnp.square(target - mean_pred))
    return {"mse": mse, "vb": vb, "loss": mse + vb}
