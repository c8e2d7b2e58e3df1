"""MAR model family (LTH14/mar at commit ``fe470ac2``): ``--config configs/models/mar.py:b`` (``b``, ``l``, ``h``).

Sizes from upstream ``models/mar.py`` (``mar_base`` / ``mar_large`` / ``mar_huge``: encoder = decoder width, depth,
heads; ``mlp_ratio=4``, LayerNorm eps 1e-6) with ``main_mar.py``'s ImageNet-256 arguments (``img_size=256``,
``vae_stride=16``, ``patch_size=1``, ``vae_embed_dim=16``, ``buffer_size=64``, ``class_num=1000``,
``num_sampling_steps="100"``) and the diffusion-MLP sizes of the upstream README's evaluation commands.

========= ===== ===== ===== ========== ========== ===================== ============== ==================
variant   width depth heads diffloss_d diffloss_w parameters (ours)     README/paper   checkpoint
========= ===== ===== ===== ========== ========== ===================== ============== ==================
``b``     768   12    12    6          1024       207,924,768           208M           mar_base/checkpoint-last.pth
``l``     1024  16    16    8          1280       478,326,304           479M           mar_large/checkpoint-last.pth
``h``     1280  20    16    12         1536       942,403,104           943M           mar_huge/checkpoint-last.pth
========= ===== ===== ===== ========== ========== ===================== ============== ==================

Counts include the diffusion head (35.7M / 72.2M / 151.2M) and exclude the KL-16 VAE
(``configs/models/mar_vae_kl16.py``). Checkpoints nest ``{"model": sd, "model_ema": sd, ...}``; sampling uses
``model_ema`` (the ``mar`` port kind's default key).

Sampling protocol (``sampling``), from the upstream README "Evaluation (ImageNet 256x256)" commands
(``main_mar.py --evaluate``): 50,000 images, ``--num_iter 256 --num_sampling_steps 100 --cfg_schedule linear
--temperature 1.0`` with ``--cfg`` 2.9 (B), 3.0 (L), 3.2 (H), ``--eval_bsz`` 256 / 256 / 128; without guidance the
README says ``--cfg 1.0 --temperature 0.95`` (``sampling.no_cfg``). Images decode ``tokens / 0.2325``.
"""

from __future__ import annotations

import ml_collections

SIZES: dict[str, dict[str, int]] = {
    "b": dict(encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12, decoder_embed_dim=768,
              decoder_depth=12, decoder_num_heads=12, diffloss_d=6, diffloss_w=1024),
    "l": dict(encoder_embed_dim=1024, encoder_depth=16, encoder_num_heads=16, decoder_embed_dim=1024,
              decoder_depth=16, decoder_num_heads=16, diffloss_d=8, diffloss_w=1280),
    "h": dict(encoder_embed_dim=1280, encoder_depth=20, encoder_num_heads=16, decoder_embed_dim=1280,
              decoder_depth=20, decoder_num_heads=16, diffloss_d=12, diffloss_w=1536),
}
NAMES = {"b": "mar_base", "l": "mar_large", "h": "mar_huge"}
RELEASED_PARAMS = {"b": 208e6, "l": 479e6, "h": 943e6}
"""Parameter counts as the MAR README / paper state them (rounded)."""
EXACT_PARAMS = {"b": 207_924_768, "l": 478_326_304, "h": 942_403_104}
FID_CFG = {"b": 2.9, "l": 3.0, "h": 3.2}
EVAL_BATCH = {"b": 256, "l": 256, "h": 128}


def _variant(arg) -> str:
    name = str(arg or "b").lower().removeprefix("variant=").replace("-", "_")
    aliases = {**{v: k for k, v in NAMES.items()}, **{f"mar_{k}": k for k in SIZES}}
    name = aliases.get(name, name)
    if name not in SIZES:
        raise ValueError(f"unknown MAR variant {arg!r}; choose one of {', '.join(SIZES)} "
                         f"(or {', '.join(NAMES.values())})")
    return name


def get_config(arg: str = "b") -> ml_collections.ConfigDict:
    """The config of one released MAR at 256x256.

    Args:
        arg: ``"b"``, ``"l"``, ``"h"`` (``"mar_base"`` ... and ``"variant=l"`` are accepted too).

    Returns:
        ConfigDict with ``model`` (constructor of `bitlaws.models.mar.MAR`), ``sampling``, ``vae``,
        ``checkpoint`` and ``num_params``.
    """
    variant = _variant(arg)
    config = ml_collections.ConfigDict()
    config.name = NAMES[variant]
    config.image_size = 256
    config.model = ml_collections.ConfigDict(dict(
        img_size=256, vae_stride=16, patch_size=1, mlp_ratio=4.0, vae_embed_dim=16, mask_ratio_min=0.7,
        label_drop_prob=0.1, class_num=1000, attn_dropout=0.1, proj_dropout=0.1, buffer_size=64,
        num_sampling_steps="100", diffusion_batch_mul=4, norm_eps=1e-6, **SIZES[variant]))
    config.sampling = ml_collections.ConfigDict(dict(
        num_iter=256, num_sampling_steps="100", cfg=FID_CFG[variant], cfg_schedule="linear", temperature=1.0,
        num_fid_samples=50_000, eval_batch_size=EVAL_BATCH[variant],
        no_cfg=ml_collections.ConfigDict(dict(cfg=1.0, temperature=0.95))))
    config.vae = ml_collections.ConfigDict(dict(config="configs/models/mar_vae_kl16.py", scaling_factor=0.2325))
    config.checkpoint = ml_collections.ConfigDict(dict(
        official_name=f"pretrained_models/mar/{NAMES[variant]}/checkpoint-last.pth", key="model_ema",
        path="", port_table="bitlaws.port.tables.mar"))
    config.num_params = EXACT_PARAMS[variant]
    return config
