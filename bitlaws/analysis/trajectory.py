"""Generation as a sequence of steps, each split into *feature extraction* and *representation reconstruction*.

The paper's section 3.2 (Figure 2a) cuts both families' sampling the same way:

===========  =====================================================  ==========================================
family       feature (what the network outputs at a step)           representation (what the step rebuilds)
===========  =====================================================  ==========================================
VAR          the scale's CFG-guided logits ``[B, pn*pn, V]``         f_hat after the scale's codes ``[B, h, w, C]``
DiT          the guided model output (epsilon / x0 channels)         the next sample x_{t-1} ``[B, H, W, C]``
             ``[B, H, W, C]``
===========  =====================================================  ==========================================

`var_trajectory` and `dit_trajectory` run one sampling pass and keep both per step, and accept a *perturbation*
``perturb(step, feature) -> feature`` applied to the network's output before the step uses it (noise injection).
Without a perturbation they draw exactly the samples of the library's samplers (VAR: the same function;
DiT: a step-by-step loop that reproduces `GaussianDiffusion.ddim_sample_loop` / `p_sample_loop`, the same noise,
within float reassociation of the scanned program).

Where noise goes (`logits_noise`, `output_noise`): VAR's transformer outputs logits over codebook indices and the
codebook is looked up by the sampled index, so there is no continuous embedding before the lookup to perturb: the
logits are the only place the network's (quantization) error enters, and noise there reaches the image only by
changing which codes are drawn. DiT's network outputs the epsilon (or x0) prediction; noise goes into those
channels only (the learned-variance channels set DDPM's noise level and DDIM ignores them).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bitlaws.analysis import noise_core
from bitlaws.sample import draws
from bitlaws.sample.diffusion import SD_VAE_SCALE, GaussianDiffusion
from bitlaws.sample.perturbation import Perturbation, apply_perturbation
from bitlaws.sample.var_sampler import autoregressive_infer_cfg

StepHook = Callable[[int], None]
"""Called after a step's network call has been dispatched (before its output is used), with the step index."""


@dataclasses.dataclass(frozen=True)
class Trajectory:
    """One sampling pass, step by step.

    Attributes:
        features: Per step, the network's output the step uses (numpy float32, shapes in the module table).
        representations: Per step, what the step reconstructs (numpy float32).
        images: ``[B, H, W, 3]`` float32 in [-1, 1].
    """

    features: list[np.ndarray]
    representations: list[np.ndarray]
    images: np.ndarray

    @property
    def num_steps(self) -> int:
        return len(self.features)


# ------------------------------------------------------------------------------------------------ noise


def _noisy_steps(snr_db: float, steps: Optional[Sequence[int]], key: jax.Array, axes: tuple[int, ...],
                 centred: bool, channels: Optional[int]) -> Perturbation:
    chosen = None if steps is None else frozenset(int(s) for s in steps)

    def perturb(step: int, feature: jax.Array) -> jax.Array:
        if chosen is not None and step not in chosen:
            return feature
        target = feature if channels is None else feature[..., :channels]
        noise = draws.normal(jax.random.fold_in(key, step), target.shape, target.dtype)
        noisy = noise_core.add_noise(target, noise, snr_db, axes, centred=centred)
        return noisy if channels is None else jnp.concatenate([noisy, feature[..., channels:]], axis=-1)

    return perturb


def logits_noise(snr_db: float, steps: Optional[Sequence[int]], key: jax.Array) -> Perturbation:
    """Gaussian noise at `snr_db` on VAR's guided logits of `steps` (None: all), per token over the vocabulary,
    against the centred logits (softmax ignores a constant shift). The draws depend on `key` and the step only,
    so sweeps over the SNR scale one fixed noise pattern."""
    return _noisy_steps(snr_db, steps, key, axes=(-1,), centred=True, channels=None)


def output_noise(snr_db: float, steps: Optional[Sequence[int]], key: jax.Array, channels: int) -> Perturbation:
    """Gaussian noise at `snr_db` on the first `channels` channels (the mean prediction) of DiT's output at
    `steps` (None: all), per sample over ``[H, W, channels]``."""
    return _noisy_steps(snr_db, steps, key, axes=(1, 2, 3), centred=False, channels=channels)


# ------------------------------------------------------------------------------------------------ VAR


def var_trajectory(var: nnx.Module, vae: Any, labels: np.ndarray, key: jax.Array, *, cfg: float, top_k: int,
                   top_p: float, more_smooth: bool = False, perturb: Optional[Perturbation] = None,
                   on_step: Optional[StepHook] = None) -> Trajectory:
    """One VAR sampling pass (`autoregressive_infer_cfg`) with per-scale logits and f_hat.

    Args:
        var, vae: Transformer (maybe quantized) and tokenizer.
        labels: ``[B]`` int classes.
        key: PRNG key (the same key gives the same draws to every variant).
        cfg, top_k, top_p, more_smooth: The sampling protocol.
        perturb: Optional `Perturbation` of each scale's guided logits.
        on_step: Optional hook called at every scale once its logits are computed.

    Returns:
        The `Trajectory`: features ``[B, pn*pn, V]``, representations ``[B, h, w, Cvae]``, images in [-1, 1].
    """
    def hook(si: int, guided: jax.Array) -> jax.Array:
        if on_step is not None:
            on_step(si)
        return guided if perturb is None else perturb(si, guided)

    labels = np.asarray(labels, np.int32).reshape(-1)
    out = autoregressive_infer_cfg(var, vae, B=labels.shape[0], label_B=labels, key=key, cfg=cfg, top_k=top_k,
                                   top_p=top_p, more_smooth=more_smooth, return_logits=True,
                                   perturb_logits=None if perturb is None and on_step is None else hook)
    return Trajectory(features=[np.asarray(g, np.float32) for g in out.guided_logits],
                      representations=[np.asarray(f, np.float32) for f in out.f_hats],
                      images=np.asarray(out.images, np.float32) * 2.0 - 1.0)


# ------------------------------------------------------------------------------------------------ DiT


@dataclasses.dataclass(frozen=True)
class DiffusionProtocol:
    """How a DiT samples.

    Attributes:
        diffusion: The (respaced) process.
        sampler: ``"ddim"`` (eta 0) or ``"ddpm"``.
        cfg_scale: Guidance scale (`DiT.forward_with_cfg`).
        clip_denoised: Clamp predicted x0 to [-1, 1] at every step.
        decode: Latents ``[B, h, w, C]`` (already divided by `SD_VAE_SCALE`) -> images ``[B, H, W, 3]`` in
            [-1, 1]; None for a pixel-space model (the sample is the image).
    """

    diffusion: GaussianDiffusion
    sampler: str
    cfg_scale: float
    clip_denoised: bool
    decode: Optional[Callable[[jax.Array], jax.Array]] = None

    def __post_init__(self):
        if self.sampler not in ("ddim", "ddpm"):
            raise ValueError(f"DiffusionProtocol.sampler must be 'ddim' or 'ddpm', got {self.sampler!r}")


def _cfg_output(model: nnx.Module, x: jax.Array, t: jax.Array, y: jax.Array, cfg_scale: jax.Array) -> jax.Array:
    return model.forward_with_cfg(x, t, y, cfg_scale)


_cfg_output_jit = nnx.jit(_cfg_output)

_UPDATES: dict[tuple, tuple[GaussianDiffusion, Callable]] = {}


def _step_update(diffusion: GaussianDiffusion, sampler: str, clip_denoised: bool) -> Callable:
    """A jitted ``(x, model_output, index, noise) -> x_{t-1}`` for one step of `diffusion` (cached)."""
    cache_key = (id(diffusion), sampler, clip_denoised)
    if cache_key not in _UPDATES or _UPDATES[cache_key][0] is not diffusion:
        def update(x, model_output, index, noise):
            t = jnp.full((x.shape[0],), index, jnp.int32)
            given = lambda *_args, **_kwargs: model_output  # noqa: E731  (the output is already computed)
            if sampler == "ddim":
                out = diffusion.ddim_sample(given, x, t, noise, clip_denoised=clip_denoised, eta=0.0)
            else:
                out = diffusion.p_sample(given, x, t, noise, clip_denoised=clip_denoised)
            return out["sample"]

        _UPDATES[cache_key] = (diffusion, jax.jit(update))
    return _UPDATES[cache_key][1]


@functools.partial(jax.jit, static_argnames=("shape",))
def _initial_noise(key: jax.Array, shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    noise_key, loop_key = jax.random.split(key)
    noise = draws.normal(noise_key, shape, jnp.float32)
    _, step_key = jax.random.split(loop_key)
    return jnp.concatenate([noise, noise], axis=0), step_key


def dit_trajectory(model: nnx.Module, labels: np.ndarray, key: jax.Array, protocol: DiffusionProtocol, *,
                   perturb: Optional[Perturbation] = None, on_step: Optional[StepHook] = None) -> Trajectory:
    """One CFG sampling pass of a DiT, step by step.

    The batch is doubled (labels, then the null class; the same initial noise), as the demo's `sample_digits`
    and upstream's ``sample.py`` do; keys are split as `GaussianDiffusion` splits them, so without `perturb`
    the samples equal the scanned sampler's up to float reassociation.

    Args:
        model: A DiT (maybe quantized) with ``forward_with_cfg``.
        labels: ``[B]`` int classes.
        key: PRNG key.
        protocol: Sampler, guidance, clipping and decoder.
        perturb: Optional `Perturbation` of the network's output at each step.
        on_step: Optional hook called at every step once the network's output is computed.

    Returns:
        The `Trajectory`: features = the guided mean prediction ``[B, H, W, C]``, representations = x_{t-1}
        ``[B, H, W, C]``, images in [-1, 1].
    """
    labels = jnp.asarray(np.asarray(labels, np.int32).reshape(-1))
    batch = labels.shape[0]
    channels = int(model.in_channels)
    shape = (batch, int(model.input_size), int(model.input_size), channels)
    x, step_key = _initial_noise(key, shape)  # [2B, H, W, C]
    y = jnp.concatenate([labels, jnp.full((batch,), model.num_classes, jnp.int32)])  # [2B]
    diffusion = protocol.diffusion
    update = _step_update(diffusion, protocol.sampler, protocol.clip_denoised)
    timestep_map = jnp.asarray(diffusion.timestep_map)
    cfg_scale = jnp.float32(protocol.cfg_scale)
    features, representations = [], []
    for step, index in enumerate(range(diffusion.num_timesteps - 1, -1, -1)):
        t = jnp.full((2 * batch,), timestep_map[index], jnp.int32)
        output = _cfg_output_jit(model, x, t, y, cfg_scale)  # [2B, H, W, C_out]
        if on_step is not None:
            on_step(step)
        if perturb is not None:
            output = apply_perturbation(perturb, step, output, "perturbation")
        noise = draws.normal(jax.random.fold_in(step_key, index), x.shape, x.dtype)
        x = update(x, output, np.int32(index), noise)
        features.append(np.asarray(output[:batch, ..., :channels], np.float32))
        representations.append(np.asarray(x[:batch], np.float32))
    final = x[:batch]
    if protocol.decode is None:
        images = jnp.clip(final, -1.0, 1.0)
    else:
        images = jnp.clip(protocol.decode(final / SD_VAE_SCALE), -1.0, 1.0)
    return Trajectory(features=features, representations=representations, images=np.asarray(images, np.float32))
