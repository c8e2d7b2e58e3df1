"""MAR sampling (LTH14/mar ``MAR.sample_tokens`` + ``DiffLoss.sample``) as one jitted loop.

Per iteration k of ``num_iter``: the transformer maps the current tokens and mask to a conditioning ``z`` for
every position; the cosine schedule fixes how many tokens stay masked afterwards (`mask_lengths`); the tokens to
predict (``mask XOR mask_next``; the last iteration: every remaining one) are sampled by the diffusion head (DDPM
ancestral sampling over the respaced steps of a cosine-schedule diffusion, ``temperature`` on the per-step noise)
and written into the tokens. Random generation orders decide which tokens stay masked: ``mask_next`` masks
``order[:mask_len]``, so tokens are generated from the end of the order towards its start. With classifier-free
guidance (``cfg != 1``) the batch is doubled with ``fake_latent`` as the unconditional class embedding; the
guidance of iteration k is ``1 + (cfg - 1) * (L - mask_len_k) / L`` (``linear``; it uses the NEXT mask length)
or ``cfg`` (``constant``), all in float32 like upstream.

Static shapes. The number of tokens predicted per row varies with k but is the same for every row and known in
advance (`mask_lengths`), so each iteration gathers the predicted positions with a stable argsort into
``n_max = max_k count_k`` slots per row (row-major by position, as upstream's ``nonzero``); slots past
``count_k`` are padding, sampled but never written back. The transformer always runs on the full sequence
(see `bitlaws.models.mar`). One program therefore serves every iteration: a `jax.lax.scan` over iterations
around a scan over diffusion steps.

Randomness. JAX cannot reproduce torch's RNG, so every draw can be injected: ``orders [B, L]``, the head's
initial noise ``init_noise [K, B, n_max, C]`` (not temperature-scaled; with CFG the cond half's noise is
duplicated for the uncond half) and the per-step noise ``step_noise [K, S, G*B*n_max, C]`` (G = 2 with CFG:
cond rows then uncond rows; upstream draws it at t = 0 too, where it is multiplied by 0). `pad_rows` lays out
recorded ``[G*B*count_k, C]`` draws. Anything not injected comes from ``key`` (orders: argsort of uniforms;
noise: drawn inside the loop, never materialised for all iterations).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bitlaws.models.mar import MAR
from bitlaws.models.mar_diffloss import SimpleMLPAdaLN
from bitlaws.models.mar_vae import LATENT_SCALE
from bitlaws.sample import draws
from bitlaws.sample.diffusion import GaussianDiffusion, create_diffusion
from bitlaws.xla_options import COMPILER_OPTIONS

CFG_SCHEDULES = ("linear", "constant")


# ----------------------------------------------------------------------------- schedules (host side)


def mask_ratios(num_iter: int) -> np.ndarray:
    """``cos(pi/2 * (k+1) / num_iter)`` for k = 0..K-1 (numpy float64, as upstream): ``[K]``."""
    return np.array([np.cos(math.pi / 2.0 * (k + 1) / num_iter) for k in range(num_iter)], dtype=np.float64)


def mask_lengths(seq_len: int, num_iter: int) -> np.ndarray:
    """Tokens still masked after each iteration, as upstream computes them.

    ``floor(L * cos(pi/2 * (k+1) / num_iter))`` (numpy float64) stored in float32, clamped to
    ``max(1, min(remaining - 1, .))`` where ``remaining`` is the previous value (L before the first iteration).

    Returns:
        ``[num_iter]`` float32.
    """
    if seq_len < 1 or num_iter < 1:
        raise ValueError(f"seq_len and num_iter must be >= 1, got seq_len={seq_len}, num_iter={num_iter}")
    remaining, lengths = np.float32(seq_len), []
    for ratio in mask_ratios(num_iter):
        length = np.float32(np.floor(seq_len * ratio))
        length = max(np.float32(1.0), min(remaining - np.float32(1.0), length))
        lengths.append(length)
        remaining = length
    return np.array(lengths, dtype=np.float32)


def predicted_counts(seq_len: int, num_iter: int) -> np.ndarray:
    """Tokens predicted per row in each iteration (the last iteration predicts every remaining one): ``[K]`` int."""
    lengths = mask_lengths(seq_len, num_iter).astype(np.int64)
    remaining = np.concatenate([[seq_len], lengths[:-1]])
    counts = remaining - lengths
    counts[-1] = remaining[-1]
    return counts


def cfg_schedule_values(cfg: float, schedule: str, seq_len: int, num_iter: int) -> np.ndarray:
    """The guidance scale passed to the head in each iteration: ``[K]`` float32.

    Raises:
        ValueError: unknown `schedule`.
    """
    if schedule not in CFG_SCHEDULES:
        raise ValueError(f"cfg_schedule: unknown {schedule!r} (choose one of {CFG_SCHEDULES})")
    if schedule == "constant":
        return np.full((num_iter,), cfg, dtype=np.float32)
    lengths = mask_lengths(seq_len, num_iter)
    length = np.float32(seq_len)
    return (np.float32(1.0) + np.float32(cfg - 1) * (length - lengths) / length).astype(np.float32)


@functools.lru_cache(maxsize=8)
def head_diffusion(num_sampling_steps: str, predict_xstart: bool = False) -> GaussianDiffusion:
    """MAR's sampling diffusion: ``create_diffusion(num_sampling_steps, noise_schedule='cosine')`` (cached).

    `predict_xstart`: the head predicts x0 instead of eps (upstream's ``create_diffusion`` option; the pixel-space
    demo MARs use it); upstream MAR predicts eps.
    """
    return create_diffusion(str(num_sampling_steps), noise_schedule="cosine", predict_xstart=predict_xstart)


def pad_rows(rows: np.ndarray, groups: int, batch: int, n_max: int) -> np.ndarray:
    """Recorded head rows ``[..., G*B*n, C]`` (group, row, position order) -> ``[..., G*B*n_max, C]`` (zero padding)."""
    rows = np.asarray(rows)
    lead, count = rows.shape[:-2], rows.shape[-2] // (groups * batch)
    if count * groups * batch != rows.shape[-2] or count > n_max:
        raise ValueError(f"rows: {rows.shape[-2]} rows do not split into {groups} x {batch} x (<= {n_max})")
    shaped = rows.reshape(*lead, groups, batch, count, rows.shape[-1])
    padding = [(0, 0)] * (len(lead) + 2) + [(0, n_max - count), (0, 0)]
    return np.pad(shaped, padding).reshape(*lead, groups * batch * n_max, rows.shape[-1])


def unpad_rows(rows, groups: int, batch: int, n_max: int, count: int) -> np.ndarray:
    """The inverse of `pad_rows`: ``[..., G*B*n_max, C]`` -> ``[..., G*B*count, C]``."""
    rows = np.asarray(rows)
    lead = rows.shape[:-2]
    shaped = rows.reshape(*lead, groups, batch, n_max, rows.shape[-1])[..., :count, :]
    return shaped.reshape(*lead, groups * batch * count, rows.shape[-1])


# ----------------------------------------------------------------------------- the diffusion head


def sample_head(net: SimpleMLPAdaLN, diffusion: GaussianDiffusion, z: jax.Array, noise: jax.Array, *,
                temperature: Union[float, jax.Array], cfg_scale: Union[None, float, jax.Array] = None,
                step_noise: Optional[jax.Array] = None, key: Optional[jax.Array] = None,
                return_steps: bool = False, clip_denoised: bool = False, clamp_variance: bool = False):
    """``DiffLoss.sample``: DDPM ancestral sampling of token latents, highest step first (traceable).

    Args:
        net: The diffusion MLP.
        diffusion: The (respaced) sampling diffusion.
        z: ``[N, D_z]`` conditioning, or with CFG ``[2N, D_z]`` (cond rows then uncond rows).
        noise: ``[N, C]`` initial noise (with CFG duplicated for the uncond half); not temperature-scaled.
        temperature: Scales the per-step noise.
        cfg_scale: None: no guidance; else the scale (guides all C eps channels).
        step_noise: ``[S, rows, C]`` per-step noise (rows = ``z.shape[0]``), else drawn from `key`.
        key: PRNG key for the per-step noise when `step_noise` is None.
        return_steps: Also return ``{"x_in", "x_out", "pred_xstart"}``, each ``[S, rows, C]``.
        clip_denoised: Clip the predicted x0 to [-1, 1] at every step (pixel-space tokens; upstream: off).
        clamp_variance: Clip the head's variance values to [-1, 1], the range in which they interpolate between
            the posterior variance and beta (upstream: off). Where the two nearly coincide in the 1000-step
            training schedule (small t) training leaves the values unconstrained; a respaced sampler, where
            they differ by ~50x, then extrapolates them, and a small head's values there gave variances ~1e4.

    Returns:
        ``[rows, C]`` float32 samples (with CFG rows N: are the uncond copies), and the steps if asked.
    """
    guided = cfg_scale is not None
    x = jnp.concatenate([noise, noise], axis=0) if guided else noise
    if x.shape[0] != z.shape[0]:
        raise ValueError(f"noise: {noise.shape[0]} rows do not match z's {z.shape[0]} (CFG doubles the noise)")
    if step_noise is None and key is None:
        raise ValueError("step_noise: give the per-step noise or a key to draw it")

    def model_fn(x_t, t, c):
        out = net.forward_with_cfg(x_t, t, c, cfg_scale) if guided else net(x_t, t, c)  # [rows, 2C]
        if clamp_variance:
            channels = x_t.shape[-1]
            out = jnp.concatenate([out[:, :channels], jnp.clip(out[:, channels:], -1.0, 1.0)], axis=-1)
        return out

    def body(x_t, inputs):
        index, injected = inputs
        step = injected if step_noise is not None else draws.normal(jax.random.fold_in(key, index), x_t.shape)
        t = jnp.full((x_t.shape[0],), index, dtype=jnp.int32)
        out = diffusion.p_sample(model_fn, x_t, t, step, clip_denoised=clip_denoised, model_kwargs=dict(c=z),
                                 temperature=temperature)
        record = dict(x_in=x_t, x_out=out["sample"], pred_xstart=out["pred_xstart"]) if return_steps else None
        return out["sample"], record

    indices = jnp.arange(diffusion.num_timesteps - 1, -1, -1, dtype=jnp.int32)
    final, steps = jax.lax.scan(body, x, (indices, step_noise))
    return (final, steps) if return_steps else final


# ----------------------------------------------------------------------------- the token loop


def _gather_rows(x: jax.Array, positions: jax.Array) -> jax.Array:
    """``x [B, L, ...]``, ``positions [B, n]`` -> ``[B, n, ...]``."""
    index = positions.reshape(positions.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, index, axis=1)


@functools.partial(jax.jit, static_argnames=("graphdef", "diffusion", "guided", "counts", "replay",
                                             "return_steps", "clip_denoised", "clamp_variance"),
                   compiler_options=COMPILER_OPTIONS)
def _sample_loop(graphdef, state, labels, orders, schedule, init_noise, step_noise, key, temperature, *,
                 diffusion: GaussianDiffusion, guided: bool, counts: tuple[int, ...], replay: bool,
                 return_steps: bool, clip_denoised: bool = False, clamp_variance: bool = False):
    model: MAR = nnx.merge(graphdef, state)
    batch, seq_len, channels = labels.shape[0], model.seq_len, model.token_embed_dim
    n_max, groups = max(counts), 2 if guided else 1
    cond = model.class_embedding(labels)
    if guided:
        cond = jnp.concatenate([cond, model.uncond_embedding(batch)], axis=0)  # [2B, D]
    rank = jnp.argsort(orders, axis=1)  # rank[b, position]: index of the position in the order

    def iteration(carry, inputs):
        tokens, mask = carry  # [B, L, C], [B, L]
        k, mask_len, cfg_iter, count = inputs["k"], inputs["mask_len"], inputs["cfg"], inputs["count"]
        reps = (groups, 1, 1)
        z = model(jnp.tile(tokens, reps), jnp.tile(mask, reps[:2]), cond)  # [G*B, L, D_dec]
        mask_next = (rank < mask_len.astype(jnp.int32)).astype(jnp.float32)
        masked = mask > 0.5
        to_pred = jnp.where(k == len(counts) - 1, masked, masked ^ (mask_next > 0.5))  # [B, L]
        positions = jnp.argsort(~to_pred, axis=1, stable=True)[:, :n_max]  # [B, n_max]
        z_sel = jnp.take_along_axis(z.reshape(groups, batch, seq_len, -1), positions[None, :, :, None], axis=2)
        z_sel = z_sel.reshape(groups * batch * n_max, -1)  # [G*B*n_max, D_dec]: group, row, position order
        if replay:
            noise, steps_noise, step_key = inputs["init_noise"].reshape(-1, channels), inputs["step_noise"], None
        else:
            noise_key, step_key = jax.random.split(jax.random.fold_in(key, k))
            noise, steps_noise = draws.normal(noise_key, (batch * n_max, channels)), None
        out = sample_head(model.diffloss, diffusion, z_sel, noise, temperature=temperature,
                          cfg_scale=cfg_iter if guided else None, step_noise=steps_noise, key=step_key,
                          return_steps=return_steps, clip_denoised=clip_denoised, clamp_variance=clamp_variance)
        final, head_steps = out if return_steps else (out, None)
        sampled = final[: batch * n_max].reshape(batch, n_max, channels)
        valid = (jnp.arange(n_max) < count)[None, :, None]
        current = _gather_rows(tokens, positions)
        new_tokens = tokens.at[jnp.arange(batch)[:, None], positions].set(jnp.where(valid, sampled, current))
        record = None
        if return_steps:
            record = dict(mask_in=mask, mask_to_pred=to_pred, tokens_after=new_tokens, sampled=sampled,
                          z=z_sel, x_out=head_steps["x_out"])
        return (new_tokens, mask_next), record

    xs = dict(k=jnp.arange(len(counts)), mask_len=schedule[0], cfg=schedule[1], count=jnp.asarray(counts))
    if replay:
        xs.update(init_noise=init_noise, step_noise=step_noise)
    init = (jnp.zeros((batch, seq_len, channels), jnp.float32), jnp.ones((batch, seq_len), jnp.float32))
    (tokens, _), records = jax.lax.scan(iteration, init, xs)
    return model.unpatchify(tokens), records


def sample_tokens(model: MAR, labels: jax.Array, *, num_iter: int = 64, cfg: float = 1.0,
                  cfg_schedule: str = "linear", temperature: float = 1.0, key: Optional[jax.Array] = None,
                  orders: Optional[jax.Array] = None, init_noise: Optional[jax.Array] = None,
                  step_noise: Optional[jax.Array] = None, num_sampling_steps: Optional[str] = None,
                  return_steps: bool = False, diffusion: Optional[GaussianDiffusion] = None,
                  clip_denoised: bool = False, clamp_variance: bool = False):
    """``MAR.sample_tokens``: token latents for `labels`.

    Args:
        model: The MAR (with its diffusion head).
        labels: ``[B]`` int class labels.
        num_iter: Autoregressive iterations K.
        cfg: Guidance scale (1.0: no guidance, the batch is not doubled).
        cfg_schedule: ``"linear"`` or ``"constant"``.
        temperature: Scales the head's per-step noise.
        key: PRNG key for whatever is not injected.
        orders: ``[B, L]`` int generation orders (permutations of ``arange(L)``).
        init_noise: ``[K, B, n_max, C]`` head initial noise (see the module docstring).
        step_noise: ``[K, S, G*B*n_max, C]`` head per-step noise (given together with `init_noise`).
        num_sampling_steps: Respacing of the head's diffusion (default: the model's, e.g. ``"100"``).
        diffusion: The head's sampling diffusion, overriding `num_sampling_steps` (e.g. an x0-predicting one,
            as the pixel-space demo MARs use); default `head_diffusion` (upstream: eps, cosine).
        clip_denoised: Clip the head's predicted x0 to [-1, 1] at every step (pixel-space tokens).
        clamp_variance: Clip the head's variance values to [-1, 1] (see `sample_head`).
        return_steps: Also return per-iteration records (``mask_in``, ``mask_to_pred``, ``tokens_after``,
            ``sampled`` ``[K, B, n_max, C]``, ``z`` and ``x_out`` in padded layout), plus ``mask_len``/``cfg_iter``.

    Returns:
        Token latents ``[B, h*p, w*p, C]`` (NHWC, still scaled by 0.2325), and the records if asked.

    Raises:
        ValueError: naming a bad argument.
    """
    labels = jnp.asarray(labels, jnp.int32)
    if labels.ndim != 1:
        raise ValueError(f"labels: expected [B] class labels, got shape {labels.shape}")
    batch, seq_len = labels.shape[0], model.seq_len
    if (init_noise is None) != (step_noise is None):
        raise ValueError("init_noise: give init_noise and step_noise together (or neither)")
    if key is None and (orders is None or init_noise is None):
        raise ValueError("key: needed for the draws that are not injected (orders, init_noise/step_noise)")
    schedule = (mask_lengths(seq_len, num_iter), cfg_schedule_values(cfg, cfg_schedule, seq_len, num_iter))
    counts = tuple(int(c) for c in predicted_counts(seq_len, num_iter))
    guided = cfg != 1.0
    diffusion = diffusion or head_diffusion(num_sampling_steps or model.num_sampling_steps)
    if key is None:
        key = jax.random.key(0)  # unused: everything is injected
    orders_key, loop_key = jax.random.split(key)
    if orders is None:
        orders = jnp.argsort(jax.random.uniform(orders_key, (batch, seq_len)), axis=1)
    elif tuple(orders.shape) != (batch, seq_len):
        raise ValueError(f"orders: expected shape {(batch, seq_len)}, got {tuple(orders.shape)}")
    replay = init_noise is not None
    if replay:
        rows = (2 if guided else 1) * batch * max(counts)
        expected = ((num_iter, batch, max(counts), model.token_embed_dim),
                    (num_iter, diffusion.num_timesteps, rows, model.token_embed_dim))
        for name, value, shape in (("init_noise", init_noise, expected[0]), ("step_noise", step_noise, expected[1])):
            if tuple(value.shape) != shape:
                raise ValueError(f"{name}: expected shape {shape}, got {tuple(value.shape)}")
    graphdef, state = nnx.split(model)
    tokens, records = _sample_loop(
        graphdef, state, labels, jnp.asarray(orders, jnp.int32), tuple(jnp.asarray(s) for s in schedule),
        None if init_noise is None else jnp.asarray(init_noise, jnp.float32),
        None if step_noise is None else jnp.asarray(step_noise, jnp.float32), loop_key, jnp.float32(temperature),
        diffusion=diffusion, guided=guided, counts=counts, replay=replay, return_steps=return_steps,
        clip_denoised=clip_denoised, clamp_variance=clamp_variance)
    if not return_steps:
        return tokens
    return tokens, dict(records, mask_len=schedule[0], cfg_iter=schedule[1], counts=np.asarray(counts))


def decode_tokens(vae: Any, tokens: jax.Array) -> jax.Array:
    """Images ``[B, H, W, 3]`` from MAR token latents ``[B, h, w, C]``: ``vae.decode(tokens / 0.2325)`` (no clamp)."""
    return vae.decode(tokens / LATENT_SCALE)
