"""MAR's training loss (LTH14/mar ``MAR.forward`` + ``DiffLoss.forward``) as pure functions of a `MAR`.

One training step of upstream MAR: patchify the latents into tokens; draw a random generation order per row
and mask the first ``ceil(L * r)`` positions of it, with one masking rate ``r`` per batch from the truncated
normal ``N(1, 0.25^2)`` restricted to ``[mask_ratio_min, 1]``; replace the class embedding by ``fake_latent``
with probability ``label_drop_prob`` (CFG); run the encoder/decoder to get ``z`` for every position; tile
tokens, ``z`` and mask ``diffusion_batch_mul`` times (upstream ``.repeat(mul, 1)``) and train the diffusion head
on every row with t uniform over the training steps of the cosine schedule; the loss is the mean over the masked
rows of upstream's ``training_losses`` (``mse + vb``, learned-range sigma, eps prediction:
`bitlaws.sample.diffusion_losses.diffusion_loss_terms`).

Randomness: JAX cannot replay torch's draws, so `masked_loss_terms` takes every draw as an argument (the parity
check replays the recorded ones); `training_loss_terms` draws them from one key. Upstream draws the orders with
``np.random.shuffle`` and the rate with scipy; here both come from the key (`random_mask`): the same
distributions, other numbers. Dropout (attention / projection, 0.1 upstream) is not applied: the port is
eval-only (`bitlaws.models.mar`), and the demo models train without it.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from bitlaws.models.mar import MAR
from bitlaws.models.mar_diffloss import SimpleMLPAdaLN
from bitlaws.sample.diffusion import GaussianDiffusion, create_diffusion
from bitlaws.sample.diffusion_losses import diffusion_loss_terms, q_sample

TRAIN_DIFFUSION_STEPS = 1000  # upstream DiffLoss: create_diffusion(timestep_respacing="", noise_schedule="cosine")
MASK_RATE_STD = 0.25  # upstream: stats.truncnorm((mask_ratio_min - 1.0) / 0.25, 0, loc=1.0, scale=0.25)


@functools.lru_cache(maxsize=4)
def training_diffusion(predict_xstart: bool = False, noise_schedule: str = "cosine",
                       diffusion_steps: int = TRAIN_DIFFUSION_STEPS) -> GaussianDiffusion:
    """MAR's (unrespaced) training diffusion of the head: cosine betas, learned-range sigma, eps (cached).

    `predict_xstart`: train the head to predict x0 instead of eps (the MSE target becomes the clean token).
    """
    return create_diffusion("", noise_schedule=noise_schedule, diffusion_steps=diffusion_steps,
                            predict_xstart=predict_xstart)


def head_loss_terms(head: SimpleMLPAdaLN, diffusion: GaussianDiffusion, x_start: jax.Array, t: jax.Array,
                    z: jax.Array, noise: jax.Array) -> dict[str, jax.Array]:
    """``DiffLoss`` training terms per row (upstream ``training_losses`` with ``model_kwargs=dict(c=z)``).

    Args:
        head: The diffusion MLP.
        diffusion: The training diffusion (`training_diffusion`).
        x_start: ``[N, C]`` clean token rows.
        t: ``[N]`` int32 timesteps.
        z: ``[N, D_z]`` conditioning.
        noise: ``[N, C]`` standard normal.

    Returns:
        ``mse``, ``vb``, ``loss`` (each ``[N]`` float32) and ``x_t`` ``[N, C]``.
    """
    x_t = q_sample(diffusion, x_start, t, noise)
    terms = diffusion_loss_terms(diffusion, head(x_t, t, z), x_start, x_t, t, noise)
    return dict(terms, x_t=x_t)


def masked_loss_terms(model: MAR, diffusion: GaussianDiffusion, tokens: jax.Array, mask: jax.Array,
                      class_embedding: jax.Array, t: jax.Array, noise: jax.Array) -> dict[str, jax.Array]:
    """``MAR.forward`` from given draws: the transformer, then the head's loss on the tiled rows.

    Args:
        model: The MAR.
        diffusion: The training diffusion.
        tokens: ``[B, L, C]`` float32 (`MAR.patchify` of the latents).
        mask: ``[B, L]`` float, 1 = masked (the positions the loss counts).
        class_embedding: ``[B, D_enc]`` (after label dropout, `MAR.drop_labels`).
        t: ``[R*B*L]`` int32 timesteps, R = ``diffusion_batch_mul`` (rows: repeat, batch, position).
        noise: ``[R*B*L, C]`` standard normal.

    Returns:
        ``target`` / ``z`` (``[R*B*L, C]`` / ``[R*B*L, D_dec]``, the tiled rows), ``mse``, ``vb``, ``loss``
        (``[R*B*L]`` per row) and ``masked_loss`` (scalar: mean of ``loss`` over the masked rows).
    """
    batch, seq_len, channels = tokens.shape
    repeats = t.shape[0] // (batch * seq_len)
    if repeats * batch * seq_len != t.shape[0]:
        raise ValueError(f"t: {t.shape[0]} rows are not a multiple of B*L = {batch * seq_len}")
    z = model(tokens, mask, class_embedding)  # [B, L, D]
    target = jnp.tile(tokens.reshape(-1, channels), (repeats, 1))  # [R*B*L, C]
    z_rows = jnp.tile(z.reshape(batch * seq_len, -1), (repeats, 1))  # [R*B*L, D]
    mask_rows = jnp.tile(mask.reshape(-1), repeats).astype(jnp.float32)  # [R*B*L]
    terms = head_loss_terms(model.diffloss, diffusion, target, t, z_rows, noise)
    masked = jnp.sum(terms["loss"] * mask_rows) / jnp.maximum(jnp.sum(mask_rows), 1.0)
    return {"target": target, "z": z_rows, "mse": terms["mse"], "vb": terms["vb"], "loss": terms["loss"],
            "masked_loss": masked, "mask_rows": mask_rows}


def random_mask(key: jax.Array, batch: int, seq_len: int, mask_ratio_min: float) -> jax.Array:
    """Upstream ``sample_orders`` + ``random_masking``: ``[B, L]`` float32, 1 = masked.

    Each row masks the first ``ceil(L * r)`` positions of its own random order; ``r`` (one per batch) is drawn
    from the standard normal truncated to ``[(mask_ratio_min - 1) / 0.25, 0]``, scaled by 0.25, plus 1.
    """
    order_key, rate_key = jax.random.split(key)
    orders = jnp.argsort(jax.random.uniform(order_key, (batch, seq_len)), axis=1)  # random permutations
    rate = 1.0 + MASK_RATE_STD * jax.random.truncated_normal(rate_key, (mask_ratio_min - 1.0) / MASK_RATE_STD, 0.0)
    num_masked = jnp.ceil(seq_len * rate)
    rank = jnp.argsort(orders, axis=1)  # rank[b, position]: the position's index in the row's order
    return (rank < num_masked).astype(jnp.float32)


def training_loss_terms(model: MAR, images: jax.Array, labels: jax.Array, key: jax.Array, *,
                        diffusion: Optional[GaussianDiffusion] = None,
                        diffusion_batch_mul: Optional[int] = None, drop_labels: bool = True
                        ) -> dict[str, jax.Array]:
    """One training loss of `model` on a batch, every draw from `key` (traceable; `bitlaws.train` loss body).

    Args:
        model: The MAR (its ``mask_ratio_min``, ``label_drop_prob`` and ``diffusion_batch_mul`` apply).
        images: ``[B, H, W, C]`` latents (NHWC; pixels in [-1, 1] for a pixel-space MAR).
        labels: ``[B]`` int class labels.
        key: PRNG key of the step.
        diffusion: The training diffusion (default `training_diffusion()`).
        diffusion_batch_mul: Overrides the model's tiling factor R.
        drop_labels: Apply label dropout (training); False for validation.

    Returns:
        Scalars: ``loss`` (masked mean, what is minimised), ``mse`` and ``vb`` (masked means) and ``mask_rate``.
    """
    diffusion = diffusion or training_diffusion()
    repeats = int(diffusion_batch_mul or model.diffusion_batch_mul)
    tokens = model.patchify(images)  # [B, L, C]
    batch, seq_len, channels = tokens.shape
    mask_key, drop_key, t_key, noise_key = jax.random.split(key, 4)
    mask = random_mask(mask_key, batch, seq_len, model.mask_ratio_min)
    cond = model.class_embedding(labels)
    if drop_labels:
        cond = model.drop_labels(cond, jax.random.uniform(drop_key, (batch,)))
    rows = repeats * batch * seq_len
    t = jax.random.randint(t_key, (rows,), 0, diffusion.num_timesteps)
    noise = jax.random.normal(noise_key, (rows, channels), jnp.float32)
    terms = masked_loss_terms(model, diffusion, tokens, mask, cond, t, noise)
    weights = terms["mask_rows"] / jnp.sum(terms["mask_rows"])
    return {"loss": terms["masked_loss"], "mse": jnp.sum(terms["mse"] * weights),
            "vb": jnp.sum(terms["vb"] * weights), "mask_rate": jnp.mean(mask)}
