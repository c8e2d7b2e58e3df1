"""Gaussian diffusion sampling for DiT (DDPM ancestral and DDIM), matching the official DiT `diffusion/` code.

MAR's diffusion head uses the same code with the ``cosine`` beta schedule and a ``temperature`` on the per-step
noise of `GaussianDiffusion.p_sample`; both are here (defaults keep DiT's results unchanged).

Schedules live in float64 numpy (as upstream keeps them); each step gathers its coefficients and casts them to
float32 (upstream `_extract_into_tensor`) before they touch the float32 sample. Arrays are channel-last:
samples ``[B, ..., C]`` (NHWC latents), model outputs ``[B, ..., 2C]`` with learned sigma.

Respacing follows `space_timesteps` / `SpacedDiffusion`: a subset of the 1000 training steps is kept, betas are
recomputed from the kept cumulative alphas, and the model is always called with the ORIGINAL timestep
(``timestep_map[i]``), never a rescaled one.

The model is any callable ``model_fn(x, t, **model_kwargs)``. Sampling loops are jitted as a whole
(`jax.lax.scan` over steps) and cached. An `nnx.Module` or a bound method of one (``model.forward_with_cfg``)
is split into graph + state and its state is passed as a traced argument, so weights are never baked into the
compiled program and later weight updates are seen. Any other callable is traced as is: arrays it closes over
become constants of the cached program (pass them through ``model_kwargs`` instead, which are traced).
"""

from __future__ import annotations

import enum
import math
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bitlaws.sample import draws
from bitlaws.xla_options import COMPILER_OPTIONS

ModelFn = Callable[..., jax.Array]

_MAX_COMPILED_LOOPS = 8  # jitted loops kept per process (each holds a reference to its model_fn)

SD_VAE_SCALE = 0.18215
"""Latent scaling of the SD VAE used by DiT: samples are divided by it before decoding."""


class MeanType(enum.Enum):
    EPSILON = "epsilon"
    START_X = "start_x"


class VarType(enum.Enum):
    LEARNED_RANGE = "learned_range"
    FIXED_SMALL = "fixed_small"
    FIXED_LARGE = "fixed_large"


# ----------------------------------------------------------------------------- schedules


def linear_beta_schedule(num_timesteps: int = 1000) -> np.ndarray:
    """Linear betas from 1e-4 to 0.02 (scaled by ``1000 / num_timesteps``): ``[T]`` float64."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)


def betas_for_alpha_bar(num_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999
                        ) -> np.ndarray:
    """Betas discretising a cumulative-alpha curve: ``min(1 - abar((i+1)/T) / abar(i/T), max_beta)``.

    Evaluated in Python float64, one beta per step, as upstream (improved-diffusion) does.

    Args:
        num_timesteps: T.
        alpha_bar: ``t in [0, 1] -> `` cumulative product of ``1 - beta`` up to t.
        max_beta: Upper clip of each beta (avoids the singularity at t = 1).

    Returns:
        ``[T]`` float64.
    """
    betas = [min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
             for i in range(num_timesteps)]
    return np.array(betas, dtype=np.float64)


def cosine_beta_schedule(num_timesteps: int = 1000) -> np.ndarray:
    """The cosine schedule (Nichol & Dhariwal 2021) used by MAR: ``abar(t) = cos((t + 0.008) / 1.008 * pi/2)^2``.

    Returns:
        ``[T]`` float64 betas, clipped at 0.999 (the last one is).
    """
    return betas_for_alpha_bar(num_timesteps, lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2)


BETA_SCHEDULES: dict[str, Callable[[int], np.ndarray]] = {
    "linear": linear_beta_schedule,
    "cosine": cosine_beta_schedule,
}
"""Named beta schedules of `create_diffusion` (upstream `get_named_beta_schedule`)."""


def space_timesteps(num_timesteps: int, section_counts: Union[str, Sequence[int]]) -> set[int]:
    """The original timesteps kept by a respaced sampler (upstream `space_timesteps`).

    ``"ddimN"`` picks the smallest integer stride s with ``len(range(0, T, s)) == N``. Otherwise the T steps
    are cut into ``len(section_counts)`` near-equal sections (the first ``T % n`` one step longer) and
    ``count`` steps are taken in each at the fractional stride ``(size - 1) / (count - 1)``, rounded with
    Python's `round` (half to even).

    Args:
        num_timesteps: T of the base process.
        section_counts: ``"250"``, ``"25,25"``, ``"ddim50"`` or a sequence of ints.

    Returns:
        The set of kept timesteps.

    Raises:
        ValueError: if a section cannot hold its count, or no integer stride gives exactly N DDIM steps.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {desired} steps from {num_timesteps} with an integer stride")
        section_counts = [int(part) for part in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, kept = 0, []
    for index, count in enumerate(section_counts):
        size = size_per + (1 if index < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        position = 0.0
        for _ in range(count):
            kept.append(start + round(position))
            position += stride
        start += size
    return set(kept)


def respace_betas(betas: np.ndarray, use_timesteps: Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
    """Betas of the respaced process: ``1 - abar[t_i] / abar[t_(i-1)]`` over the kept steps (float64).

    Returns:
        ``(betas [N] float64, timestep_map [N] int64)`` with ``timestep_map[i]`` the original timestep.
    """
    keep = set(use_timesteps)
    alphas_cumprod = np.cumprod(1.0 - np.asarray(betas, dtype=np.float64))
    last, new_betas, timestep_map = 1.0, [], []
    for step, alpha_cumprod in enumerate(alphas_cumprod):
        if step in keep:
            new_betas.append(1 - alpha_cumprod / last)
            last = alpha_cumprod
            timestep_map.append(step)
    return np.array(new_betas, dtype=np.float64), np.array(timestep_map, dtype=np.int64)


# ----------------------------------------------------------------------------- process


def _functional(model_fn: ModelFn) -> tuple[Callable, Any, Any]:
    """Splits an NNX model (or a bound method of one) into a pure function of its state.

    Returns:
        ``(pure_fn(state, x, t, **kw), state, cache identity)``. For an `nnx.Module` or its bound method the
        state is traced (current weights are always used, nothing is baked in) and the identity is the graph
        structure; any other callable is used as is (its closed-over arrays become compile-time constants)
        and identified by the function object.
    """
    owner = model_fn if isinstance(model_fn, nnx.Module) else getattr(model_fn, "__self__", None)
    if not isinstance(owner, nnx.Module):
        return (lambda _state, x, t, /, **kwargs: model_fn(x, t, **kwargs)), None, model_fn
    method = "__call__" if owner is model_fn else model_fn.__name__
    graphdef, state = nnx.split(owner)

    def pure_fn(model_state, x, t, /, **kwargs):
        return getattr(nnx.merge(graphdef, model_state), method)(x, t, **kwargs)

    return pure_fn, state, (graphdef, method)


def _gather(table: np.ndarray, t: jax.Array, ndim: int) -> jax.Array:
    """``table[t]`` as float32, shaped ``[B, 1, ..., 1]`` (rank `ndim`) for broadcasting."""
    values = jnp.asarray(np.asarray(table, dtype=np.float64).astype(np.float32))[t]  # [B]
    return values.reshape(values.shape + (1,) * (ndim - 1))


class GaussianDiffusion:
    """A (possibly respaced) Gaussian diffusion process with float64 schedules.

    Args:
        betas: ``[N]`` betas of this process (respaced if `timestep_map` is given).
        timestep_map: ``[N]`` original timestep of each step (default ``arange(N)``); the model sees these.
        mean_type: What the model's first C channels predict.
        var_type: How the variance is chosen (``LEARNED_RANGE``: the model's last C channels interpolate
            between ``log beta`` and the clipped posterior log-variance).

    Attributes (all float64 ``[N]`` numpy): ``betas``, ``alphas_cumprod``, ``alphas_cumprod_prev``,
    ``sqrt_recip_alphas_cumprod``, ``sqrt_recipm1_alphas_cumprod``, ``posterior_variance``,
    ``posterior_log_variance_clipped``, ``posterior_mean_coef1``, ``posterior_mean_coef2``.
    """

    def __init__(self, betas: np.ndarray, *, timestep_map: Optional[np.ndarray] = None,
                 mean_type: MeanType = MeanType.EPSILON, var_type: VarType = VarType.LEARNED_RANGE):
        betas = np.array(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1-D array in (0, 1]")
        self.mean_type, self.var_type = mean_type, var_type
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])
        self.timestep_map = (np.arange(self.num_timesteps, dtype=np.int64) if timestep_map is None
                             else np.asarray(timestep_map, dtype=np.int64))
        if self.timestep_map.shape != betas.shape:
            raise ValueError(f"timestep_map {self.timestep_map.shape} does not match betas {betas.shape}")
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_log_variance_clipped = (
            np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
            if self.num_timesteps > 1 else np.array([]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = ((1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas)
                                     / (1.0 - self.alphas_cumprod))
        self._compiled: dict[tuple, Callable] = {}

    # ------------------------------------------------------------------ single steps

    def _fixed_variance(self) -> tuple[np.ndarray, np.ndarray]:
        if self.var_type == VarType.FIXED_LARGE:
            variance = np.append(self.posterior_variance[1], self.betas[1:])
            return variance, np.log(variance)
        return self.posterior_variance, self.posterior_log_variance_clipped

    def predict_xstart_from_eps(self, x_t: jax.Array, t: jax.Array, eps: jax.Array) -> jax.Array:
        ndim = x_t.ndim
        return (_gather(self.sqrt_recip_alphas_cumprod, t, ndim) * x_t
                - _gather(self.sqrt_recipm1_alphas_cumprod, t, ndim) * eps)

    def predict_eps_from_xstart(self, x_t: jax.Array, t: jax.Array, pred_xstart: jax.Array) -> jax.Array:
        ndim = x_t.ndim
        return ((_gather(self.sqrt_recip_alphas_cumprod, t, ndim) * x_t - pred_xstart)
                / _gather(self.sqrt_recipm1_alphas_cumprod, t, ndim))

    def p_mean_variance(self, model_fn: ModelFn, x: jax.Array, t: jax.Array, *, clip_denoised: bool = True,
                        model_kwargs: Optional[Mapping[str, Any]] = None) -> dict[str, jax.Array]:
        """The model's p(x_{t-1} | x_t).

        Args:
            model_fn: ``model_fn(x, original_t, **model_kwargs)`` -> ``[B, ..., 2C]`` (learned sigma) or
                ``[B, ..., C]``.
            x: ``[B, ..., C]`` float32 sample at step `t`.
            t: ``[B]`` int32 indices into THIS process's steps (mapped through ``timestep_map`` for the model).
            clip_denoised: Clamp the predicted x0 to [-1, 1].
            model_kwargs: Extra keyword arguments for the model.

        Returns:
            ``mean``, ``variance``, ``log_variance`` and ``pred_xstart``, each ``[B, ..., C]`` float32.
        """
        ndim = x.ndim
        model_out = model_fn(x, jnp.asarray(self.timestep_map)[t], **(model_kwargs or {}))
        channels = x.shape[-1]
        if self.var_type == VarType.LEARNED_RANGE:
            if model_out.shape != x.shape[:-1] + (2 * channels,):
                raise ValueError(f"learned sigma needs a model output of shape {x.shape[:-1] + (2 * channels,)},"
                                 f" got {model_out.shape}")
            model_out, var_values = model_out[..., :channels], model_out[..., channels:]
            min_log = _gather(self.posterior_log_variance_clipped, t, ndim)
            max_log = _gather(np.log(self.betas), t, ndim)
            frac = (var_values + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = jnp.exp(log_variance)
        else:
            fixed_variance, fixed_log = self._fixed_variance()
            variance = _gather(fixed_variance, t, ndim) + jnp.zeros_like(x)
            log_variance = _gather(fixed_log, t, ndim) + jnp.zeros_like(x)
        pred_xstart = (model_out if self.mean_type == MeanType.START_X
                       else self.predict_xstart_from_eps(x, t, model_out))
        if clip_denoised:
            pred_xstart = jnp.clip(pred_xstart, -1, 1)
        mean = (_gather(self.posterior_mean_coef1, t, ndim) * pred_xstart
                + _gather(self.posterior_mean_coef2, t, ndim) * x)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

    def p_sample(self, model_fn: ModelFn, x: jax.Array, t: jax.Array, noise: jax.Array, *,
                 clip_denoised: bool = True, model_kwargs: Optional[Mapping[str, Any]] = None,
                 temperature: Union[float, jax.Array] = 1.0) -> dict[str, jax.Array]:
        """One DDPM ancestral step; returns ``sample`` and ``pred_xstart`` (``[B, ..., C]`` float32).

        `temperature` scales the step's noise only (MAR's ``p_sample``): ``mean + sigma * noise * temperature``;
        1.0 gives DiT's step bit for bit. The noise is multiplied by 0 at ``t == 0`` (but still drawn upstream).
        """
        out = self.p_mean_variance(model_fn, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        nonzero = (t != 0).astype(jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))
        sample = out["mean"] + nonzero * jnp.exp(0.5 * out["log_variance"]) * noise * temperature
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample(self, model_fn: ModelFn, x: jax.Array, t: jax.Array, noise: jax.Array, *,
                    clip_denoised: bool = True, model_kwargs: Optional[Mapping[str, Any]] = None,
                    eta: Union[float, jax.Array] = 0.0) -> dict[str, jax.Array]:
        """One DDIM step (eps re-derived from the possibly clamped x0); returns ``sample``, ``pred_xstart``."""
        ndim = x.ndim
        out = self.p_mean_variance(model_fn, x, t, clip_denoised=clip_denoised, model_kwargs=model_kwargs)
        eps = self.predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = _gather(self.alphas_cumprod, t, ndim)
        alpha_bar_prev = _gather(self.alphas_cumprod_prev, t, ndim)
        sigma = (eta * jnp.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar))
                 * jnp.sqrt(1 - alpha_bar / alpha_bar_prev))
        mean_pred = (out["pred_xstart"] * jnp.sqrt(alpha_bar_prev)
                     + jnp.sqrt(1 - alpha_bar_prev - sigma**2) * eps)
        nonzero = (t != 0).astype(jnp.float32).reshape((-1,) + (1,) * (ndim - 1))
        return {"sample": mean_pred + nonzero * sigma * noise, "pred_xstart": out["pred_xstart"]}

    # ------------------------------------------------------------------ loops

    def _loop_fn(self, kind: str, model_fn: ModelFn, clip_denoised: bool, return_steps: bool
                 ) -> tuple[Callable, Any]:
        """A jitted ``(x_T, key, eta, model_state, model_kwargs) -> (x_0, steps)`` and the model state to pass.

        Loops are cached per model structure (NNX modules) or per function object (other callables).
        """
        pure_fn, model_state, identity = _functional(model_fn)
        cache_key = (kind, identity, clip_denoised, return_steps)
        if cache_key not in self._compiled:
            def loop(x_init, key, eta, model_state, model_kwargs):
                def call_model(x, t, /, **kwargs):
                    return pure_fn(model_state, x, t, **kwargs)

                def body(x, index):
                    t = jnp.full((x.shape[0],), index, dtype=jnp.int32)
                    noise = draws.normal(jax.random.fold_in(key, index), x.shape, x.dtype)
                    if kind == "ddim":
                        out = self.ddim_sample(call_model, x, t, noise, clip_denoised=clip_denoised,
                                               model_kwargs=model_kwargs, eta=eta)
                    else:
                        out = self.p_sample(call_model, x, t, noise, clip_denoised=clip_denoised,
                                            model_kwargs=model_kwargs)
                    return out["sample"], (out if return_steps else None)

                indices = jnp.arange(self.num_timesteps - 1, -1, -1, dtype=jnp.int32)
                return jax.lax.scan(body, x_init, indices)

            if len(self._compiled) >= _MAX_COMPILED_LOOPS:
                self._compiled.pop(next(iter(self._compiled)))
            self._compiled[cache_key] = jax.jit(loop, compiler_options=COMPILER_OPTIONS)
        return self._compiled[cache_key], model_state

    def _run(self, kind: str, model_fn: ModelFn, shape: Sequence[int], noise: Optional[jax.Array],
             key: Optional[jax.Array], clip_denoised: bool, model_kwargs: Optional[Mapping[str, Any]],
             eta: float, return_steps: bool):
        if key is None:
            if noise is None or kind == "ddpm" or eta != 0:
                raise ValueError("a PRNG key is needed for the initial noise or the per-step noise")
            key = jax.random.key(0)  # only multiplied by sigma = 0 (DDIM, eta = 0)
        init_key, step_key = jax.random.split(key)
        if noise is None:
            noise = draws.normal(init_key, tuple(shape), jnp.float32)
        elif tuple(noise.shape) != tuple(shape):
            raise ValueError(f"initial noise has shape {noise.shape}, expected {tuple(shape)}")
        loop, model_state = self._loop_fn(kind, model_fn, clip_denoised, return_steps)
        final, steps = loop(jnp.asarray(noise, jnp.float32), step_key, jnp.float32(eta), model_state,
                            dict(model_kwargs or {}))
        return (final, steps) if return_steps else final

    def p_sample_loop(self, model_fn: ModelFn, shape: Sequence[int], noise: Optional[jax.Array] = None, *,
                      key: jax.Array, clip_denoised: bool = True,
                      model_kwargs: Optional[Mapping[str, Any]] = None, return_steps: bool = False):
        """DDPM ancestral sampling over all steps of this process, highest timestep first.

        Args:
            model_fn: ``model_fn(x, t, **model_kwargs)``.
            shape: ``[B, ..., C]`` sample shape.
            noise: Optional initial ``x_T`` (else drawn from `key`).
            key: PRNG key; the result is a deterministic function of it (and `noise`).
            clip_denoised: Clamp predicted x0 to [-1, 1] (DiT's `sample.py` uses False).
            model_kwargs: Extra model arguments (traced).
            return_steps: Also return ``{"sample", "pred_xstart"}``, each ``[N, B, ..., C]`` in step order.

        Returns:
            ``x_0 [B, ..., C]`` float32 (and the per-step dict if `return_steps`).
        """
        return self._run("ddpm", model_fn, shape, noise, key, clip_denoised, model_kwargs, 0.0, return_steps)

    def ddim_sample_loop(self, model_fn: ModelFn, shape: Sequence[int], noise: Optional[jax.Array] = None, *,
                         key: Optional[jax.Array] = None, clip_denoised: bool = True,
                         model_kwargs: Optional[Mapping[str, Any]] = None, eta: float = 0.0,
                         return_steps: bool = False):
        """DDIM sampling (`eta` = 0: deterministic; the key is then only needed when `noise` is None).

        Arguments and return value as `p_sample_loop`.
        """
        return self._run("ddim", model_fn, shape, noise, key, clip_denoised, model_kwargs, eta, return_steps)


def create_diffusion(timestep_respacing: Union[str, Sequence[int], None], *, noise_schedule: str = "linear",
                     sigma_small: bool = False, predict_xstart: bool = False, learn_sigma: bool = True,
                     diffusion_steps: int = 1000) -> GaussianDiffusion:
    """The DiT/MAR diffusion (upstream `create_diffusion` defaults: linear betas, learned-range sigma, eps).

    Args:
        timestep_respacing: ``"250"``, ``"ddim50"``, ... ; None or ``""`` keeps all `diffusion_steps`.
        noise_schedule: ``"linear"`` (DiT) or ``"cosine"`` (MAR), see `BETA_SCHEDULES`.
        sigma_small: Fixed small instead of fixed large variance (when not `learn_sigma`).
        predict_xstart: The model predicts x0 instead of eps.
        learn_sigma: Learned-range variance from the model's second C channels.
        diffusion_steps: T of the base process.

    Returns:
        The respaced `GaussianDiffusion`.
    """
    if noise_schedule not in BETA_SCHEDULES:
        raise ValueError(f"noise_schedule: unsupported {noise_schedule!r} (choose one of {sorted(BETA_SCHEDULES)})")
    betas = BETA_SCHEDULES[noise_schedule](diffusion_steps)
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]
    new_betas, timestep_map = respace_betas(betas, space_timesteps(diffusion_steps, timestep_respacing))
    if learn_sigma:
        var_type = VarType.LEARNED_RANGE
    else:
        var_type = VarType.FIXED_SMALL if sigma_small else VarType.FIXED_LARGE
    mean_type = MeanType.START_X if predict_xstart else MeanType.EPSILON
    return GaussianDiffusion(new_betas, timestep_map=timestep_map, mean_type=mean_type, var_type=var_type)


def decode_latents(vae_decode_fn: Callable[[jax.Array], jax.Array], latents: jax.Array) -> jax.Array:
    """Decodes DiT latents: ``vae_decode_fn(latents / 0.18215)`` (the SD VAE's decode does not rescale)."""
    return vae_decode_fn(latents / SD_VAE_SCALE)
