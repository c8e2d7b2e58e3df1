"""Demo MAR family config: pixel-space MARs on the 16x16 digits, ``get_config("depth=2")``.

Use as ``bitlaws train --config configs/demo/mar.py:depth=2``. Arguments (comma separated):

* ``depth=N``: encoder and decoder blocks each; width ``WIDTH[N]`` (heads of 16 channels), diffusion MLP of
  ``HEAD_DEPTH[N]`` residual blocks of width ``HEAD_WIDTH[N]``. Tokens are 4x4 patches of the ``[16, 16, 3]``
  digit (``vae_stride=1``, no VAE): 16 tokens of 48 values; the head width stays >= 48 so that its eps
  prediction can carry the noise of a whole token.
* ``steps=N``: override the number of training steps (default per depth, `TRAIN_STEPS`).
* ``quick``: a 2-step run with checkpoints every step (tests, smoke runs).
"""

from __future__ import annotations

import ml_collections

from bitlaws.configlib import parse_arg

SHIPPED_DEPTHS = (1, 2, 3)
WIDTH = {1: 32, 2: 48, 3: 64, 4: 80}
HEAD_WIDTH = {1: 64, 2: 96, 3: 128, 4: 160}
HEAD_DEPTH = {1: 1, 2: 2, 3: 2, 4: 3}
TRAIN_STEPS = {1: 4000, 2: 2500, 3: 2500, 4: 2500}  # what the shipped checkpoints were trained with


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The config of one demo MAR.

    Args:
        arg: ``"depth=2"``, ``"depth=1,quick"``, ``"depth=3,steps=500"``.

    Returns:
        ConfigDict with ``family``, ``name``, ``model`` (`bitlaws.models.mar.MAR` constructor arguments),
        ``train`` and ``sampling`` (`bitlaws.demo.mar_family.sample_digits` arguments).
    """
    args = parse_arg(arg, allowed=("depth", "steps", "quick"))
    depth = int(args.get("depth", 2))
    if depth not in WIDTH:
        raise ValueError(f"depth must be one of {sorted(WIDTH)}, got {depth}")
    quick = bool(args.get("quick", False))
    steps = int(args.get("steps", 2 if quick else TRAIN_STEPS[depth]))
    width = WIDTH[depth]

    config = ml_collections.ConfigDict()
    config.family = "mar"
    config.name = f"mar-d{depth}"
    config.model = ml_collections.ConfigDict(dict(
        img_size=16,
        vae_stride=1,  # pixel space: the "latent" is the image itself
        patch_size=4,
        vae_embed_dim=3,
        encoder_embed_dim=width,
        encoder_depth=depth,
        encoder_num_heads=width // 16,
        decoder_embed_dim=width,
        decoder_depth=depth,
        decoder_num_heads=width // 16,
        mlp_ratio=4.0,
        mask_ratio_min=0.7,
        label_drop_prob=0.1,
        class_num=10,
        buffer_size=4,
        diffloss_d=HEAD_DEPTH[depth],
        diffloss_w=HEAD_WIDTH[depth],
        num_sampling_steps="50",
        diffusion_batch_mul=1,  # upstream 4; the transformer is cheap here, the head rows are the cost
    ))
    # The head predicts eps as upstream (predict_xstart=True would train and sample an x0-predicting head).
    config.diffusion = ml_collections.ConfigDict(dict(predict_xstart=False))
    config.train = ml_collections.ConfigDict(dict(
        steps=steps,
        batch_size=8 if quick else 64,
        learning_rate=1e-3,
        warmup_steps=0 if quick else 100,
        final_lr_fraction=0.1,  # cosine decay to this fraction of the peak
        weight_decay=0.0,
        grad_clip=1.0,
        ema_decay=0.995,
        checkpoint_every=1 if quick else 500,
        log_every=1 if quick else 25,
        seed=0,
        val_eval=not quick,  # EMA loss on the val split (fixed draws), for the summary
    ))
    config.sampling = ml_collections.ConfigDict(dict(
        num_iter=8,
        num_sampling_steps="25",
        cfg=2.0,
        cfg_schedule="linear",
        temperature=1.0,
        clip_denoised=True,  # x0 clipped to [-1, 1] at every head step (pixel space)
        clamp_variance=True,  # the head's variance values clipped to [-1, 1] (see mar_sampler.sample_head)
    ))
    return config
