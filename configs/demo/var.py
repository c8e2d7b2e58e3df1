"""The demo VAR transformers on the digits (``bitlaws train --config configs/demo/var.py:depth=4``).

`bitlaws.models.var.VAR` over the tokens of the shipped demo tokenizer (``configs/demo/vqvae.py``): width
``16 * depth``, ``depth`` heads of 16 channels, 10 classes, trained by teacher forcing with cross-entropy
and label dropout (for classifier-free guidance). Args: ``depth=N`` (1, 2, 3, 4 are shipped: 9k to 321k
parameters), ``quick`` (a few steps, for tests), ``steps=N``.
"""

from __future__ import annotations

import ml_collections

from bitlaws.configlib import parse_arg

PATCH_NUMS = (1, 2, 3, 4, 6, 8)
WIDTH_PER_DEPTH = 16
SHIPPED_DEPTHS = (1, 2, 3, 4)


def model_config(depth: int) -> ml_collections.ConfigDict:
    """``VAR`` constructor arguments (vocabulary size and ``Cvae`` come from the tokenizer)."""
    return ml_collections.ConfigDict(dict(
        num_classes=10, depth=depth, embed_dim=WIDTH_PER_DEPTH * depth, num_heads=depth, mlp_ratio=4.0,
        drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0, norm_eps=1e-6, shared_aln=False,
        cond_drop_rate=0.1, attn_l2_norm=True, patch_nums=PATCH_NUMS))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arg(arg, allowed=("depth", "steps", "quick"))
    depth = int(args.get("depth", 4))
    quick = bool(args.get("quick", False))
    config = ml_collections.ConfigDict()
    config.family = "var"
    config.name = f"var-d{depth}"
    config.out_dir = f"bitlaws/demo/checkpoints/var-d{depth}"
    config.command = f"bitlaws train --config configs/demo/var.py:depth={depth}"
    config.tokenizer_dir = ""  # empty: the shipped tokenizer bitlaws/demo/checkpoints/vqvae
    config.model = model_config(depth)
    config.train = ml_collections.ConfigDict(dict(
        steps=4 if quick else int(args.get("steps", 600)),
        batch_size=16 if quick else 48,
        learning_rate=2e-3,
        weight_decay=0.05,
        warmup_steps=1 if quick else 100,
        min_warmup_steps=1,  # the warm-up lasts at least one step (the first update has lr 0)
        final_lr_fraction=0.05,  # cosine decay to 5 % of the peak
        b2=0.95,  # AdamW (b1 0.9)
        grad_clip=1.0,  # global-norm clipping
        checkpoint_every=2 if quick else 200,
        seed=0,
    ))
    config.sample = ml_collections.ConfigDict(dict(cfg=0.0, top_k=0, top_p=0.0))  # plain sampling: lowest DFD at d3-d4
    return config
