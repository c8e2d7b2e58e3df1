"""Demo DiT family config: pixel-space DiTs on the 16x16 digits, ``get_config("depth=4")``.

Use as ``bitlaws train --config configs/demo/dit.py:depth=4``. Arguments (comma separated):

* ``depth=N``: number of DiT blocks; the hidden size is ``16 * (N + 1)`` and the head count ``N + 1`` (head
  dim 16). Patches are 4x4 (16 tokens); the hidden size must stay >= 4*4*3 = 48, the values per patch, or
  the eps prediction cannot carry the noise through the token bottleneck (hidden 32 fails to sample).
* ``steps=N``: override the number of training steps (default per depth, `TRAIN_STEPS`).
* ``quick``: a 2-step run with checkpoints every step (tests, smoke runs).
"""

from __future__ import annotations

import ml_collections

from bitlaws.configlib import parse_arg

SHIPPED_DEPTHS = (2, 3, 4, 5)
TRAIN_STEPS = {2: 5000, 3: 5000, 4: 5000, 5: 8000}  # what the shipped checkpoints were trained with
HIDDEN_PER_DEPTH = 16


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """The config of one demo DiT.

    Args:
        arg: ``"depth=4"``, ``"depth=2,quick"``, ``"depth=3,steps=500"``.

    Returns:
        ConfigDict with ``family``, ``name``, ``model`` (`bitlaws.models.dit.DiT` constructor arguments),
        ``train`` and ``sampling``.
    """
    args = parse_arg(arg, allowed=("depth", "steps", "quick"))
    depth = int(args.get("depth", 4))
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    quick = bool(args.get("quick", False))
    steps = int(args.get("steps", 2 if quick else TRAIN_STEPS.get(depth, 2500)))

    config = ml_collections.ConfigDict()
    config.family = "dit"
    config.name = f"dit-d{depth}"
    config.model = ml_collections.ConfigDict(dict(
        input_size=16,
        patch_size=4,
        in_channels=3,
        hidden_size=HIDDEN_PER_DEPTH * (depth + 1),
        depth=depth,
        num_heads=depth + 1,
        mlp_ratio=4.0,
        class_dropout_prob=0.1,
        num_classes=10,
        learn_sigma=True,
    ))
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
        val_eval=not quick,  # EMA loss on the val split at fixed timesteps, for the summary
    ))
    config.sampling = ml_collections.ConfigDict(dict(
        respacing="ddim25",
        cfg_scale=1.5,
    ))
    return config
