"""The demo LlamaGen GPTs on the digits (``bitlaws train --config configs/demo/llamagen.py:depth=4``).

`bitlaws.models.llamagen.LlamaGen` (class-conditional ``c2i``) over the 64 raster-order tokens of the shipped
demo tokenizer (``configs/demo/llamagen_vq.py``): width ``16 * depth``, ``depth`` layers of ``depth`` heads of 16
channels, SwiGLU (``multiple_of=16``), 10 classes + the null class (class dropout 0.1, for classifier-free
guidance), trained by teacher forcing with cross-entropy. Args: ``depth=N`` (1, 2, 3, 4 are shipped), ``quick``
(a few steps, for tests), ``steps=N``.
"""

from __future__ import annotations

import ml_collections

from bitlaws.configlib import load_sibling, parse_arg

WIDTH_PER_DEPTH = 16
SHIPPED_DEPTHS = (1, 2, 3, 4)


def model_config(depth: int) -> ml_collections.ConfigDict:
    """``LlamaGen`` constructor arguments (``vocab_size`` and ``block_size`` come from the tokenizer)."""
    return ml_collections.ConfigDict(dict(
        dim=WIDTH_PER_DEPTH * depth, n_layer=depth, n_head=depth, n_kv_head=depth, multiple_of=16,
        rope_base=10000.0, norm_eps=1e-5, num_classes=10, class_dropout_prob=0.1, model_type="c2i",
        cls_token_num=1))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arg(arg, allowed=("depth", "steps", "quick"))
    depth = int(args.get("depth", 4))
    quick = bool(args.get("quick", False))
    config = ml_collections.ConfigDict()
    config.family = "llamagen"
    config.name = f"llamagen-d{depth}"
    config.out_dir = f"bitlaws/demo/checkpoints/llamagen-d{depth}"
    config.command = f"bitlaws train --config configs/demo/llamagen.py:depth={depth}"
    config.tokenizer_dir = ""  # empty: the shipped tokenizer bitlaws/demo/checkpoints/llamagen-vq
    config.model = model_config(depth)
    # The demo VAR transformers' recipe (AdamW lr 2e-3, weight decay 0.05, b2 0.95, 100 warm-up steps, cosine to
    # 5 %, clipping at 1, batch 48), with more steps.
    config.train = load_sibling(__file__, "var.py").get_config(arg).train
    if not quick:
        config.train.steps = int(args.get("steps", 1000))
    # Sampling settings stored in the checkpoint: a little guidance, no truncation (the lowest DFD of d3 and d4
    # in a grid over cfg 1 / 1.5 / 2 / 3 and top-k 16; see docs/demo_models.md, "LlamaGen family").
    config.sample = ml_collections.ConfigDict(dict(cfg_scale=1.5, temperature=1.0, top_k=0, top_p=1.0))
    return config
