"""LlamaGen class-conditional GPTs (ImageNet; FoundationVision/LlamaGen at commit ``ce98ec41``).

``--config configs/models/llamagen_gpt.py:VARIANT[,image_size=256|384]`` (or ``variant=xl,image_size=384``),
VARIANT one of ``b``, ``l``, ``xl``, ``xxl``, ``3b``. Sizes from upstream ``autoregressive/models/gpt.py``
(``GPT_B`` ... ``GPT_3B``: only ``n_layer``, ``n_head``, ``dim`` differ; ``n_kv_head=None``, ``multiple_of=256``),
with ``vocab_size=16384``, ``num_classes=1000``, ``cls_token_num=1``, ``class_dropout_prob=0.1`` and
``block_size = (image_size / 16) ** 2`` (256 tokens at 256px, 576 at 384px) as ``sample_c2i.py`` builds them.

=========== ====== ======= ====== ===================== ============== =====================
variant     dim    n_layer n_head parameters (ours)     README/paper   released checkpoints
=========== ====== ======= ====== ===================== ============== =====================
``b``       768    12      12     110,888,448           111M           c2i_B_256.pt, c2i_B_384.pt
``l``       1024   24      16     342,910,976           343M           c2i_L_256.pt, c2i_L_384.pt
``xl``      1280   36      20     774,699,520           775M           c2i_XL_384.pt
``xxl``     1536   48      24     1,410,972,672         1.4B           c2i_XXL_384.pt
``3b``      3200   24      32     3,096,659,200         3.1B           c2i_3B_384.pt
=========== ====== ======= ====== ===================== ============== =====================

The counts do not depend on the image size (RoPE is recomputed, not a parameter). Checkpoints are
``{"model": sd}`` (DDP; ``--key model``) or, for XXL / 3B (``--from-fsdp`` upstream), the flat state dict.

Sampling protocol (``sampling``): the FID-50K commands of upstream ``GETTING_STARTED.md`` ("Sampling") run
``autoregressive/sample/sample_c2i_ddp.py`` with ``--image-size 384 --image-size-eval 256`` and ``--cfg-scale``
2.0 (B, L), 1.75 (XL, XXL), 1.65 (3B); the script's defaults give ``top_k=0``, ``top_p=1.0``,
``temperature=1.0``, ``cfg_interval=-1``, 50,000 samples with uniformly random classes
(``torch.randint``), ``global_seed=0``, bf16, and a bicubic resize of the decoded 384px images to 256px.
"""

from __future__ import annotations

import math

import ml_collections

from bitlaws.configlib import load_sibling, parse_arg

SIZES: dict[str, dict[str, int]] = {
    "b": dict(dim=768, n_layer=12, n_head=12),
    "l": dict(dim=1024, n_layer=24, n_head=16),
    "xl": dict(dim=1280, n_layer=36, n_head=20),
    "xxl": dict(dim=1536, n_layer=48, n_head=24),
    "3b": dict(dim=3200, n_layer=24, n_head=32),
}
RELEASED_PARAMS = {"b": 111e6, "l": 343e6, "xl": 775e6, "xxl": 1.4e9, "3b": 3.1e9}
"""Parameter counts as the LlamaGen README / paper state them (rounded)."""
EXACT_PARAMS = {"b": 110_888_448, "l": 342_910_976, "xl": 774_699_520, "xxl": 1_410_972_672, "3b": 3_096_659_200}
FID_CFG = {"b": 2.0, "l": 2.0, "xl": 1.75, "xxl": 1.75, "3b": 1.65}
CHECKPOINTS = {("b", 256): "c2i_B_256.pt", ("b", 384): "c2i_B_384.pt", ("l", 256): "c2i_L_256.pt",
               ("l", 384): "c2i_L_384.pt", ("xl", 384): "c2i_XL_384.pt", ("xxl", 384): "c2i_XXL_384.pt",
               ("3b", 384): "c2i_3B_384.pt"}
FLAT_CHECKPOINTS = ("xxl", "3b")  # saved from FSDP: no "model" nesting
IMAGE_SIZES = (256, 384)
DOWNSAMPLE = 16


def _parse(arg) -> tuple[str, int]:
    options = parse_arg(arg if isinstance(arg, str) else None)
    variant = options.pop("variant", None)
    image_size = options.pop("image_size", 256)
    bare = [key for key, value in options.items() if value is True and key.lower() in SIZES]
    if bare and variant is None:
        variant = bare[0]
        options.pop(bare[0])
    if options:
        raise ValueError(f"llamagen_gpt config: unknown argument(s) {sorted(options)}; give a variant "
                         f"({', '.join(SIZES)}) and optionally image_size")
    variant = str(variant or "b").lower().replace("gpt-", "")
    if variant not in SIZES:
        raise ValueError(f"llamagen_gpt config: unknown variant {variant!r}; choose one of {', '.join(SIZES)}")
    if image_size not in IMAGE_SIZES:
        raise ValueError(f"llamagen_gpt config: image_size={image_size!r}; choose one of {IMAGE_SIZES}")
    return variant, int(image_size)


def gpt_config(variant: str, image_size: int) -> ml_collections.ConfigDict:
    """`bitlaws.models.llamagen.LlamaGen` constructor arguments (upstream ``ModelArgs``) of one released model."""
    return ml_collections.ConfigDict(dict(
        **SIZES[variant], n_kv_head=None, multiple_of=256, ffn_dim_multiplier=None, rope_base=10000,
        norm_eps=1e-5, vocab_size=16384, num_classes=1000, class_dropout_prob=0.1, cls_token_num=1,
        model_type="c2i", block_size=(image_size // DOWNSAMPLE) ** 2))


def get_config(arg=None) -> ml_collections.ConfigDict:
    """One released LlamaGen c2i GPT (default ``b`` at 256px; the FID commands sample at ``image_size=384``).

    Returns:
        ConfigDict with ``name``, ``image_size``, ``gpt`` (constructor), ``vq`` (the VQ-16 tokenizer's
        constructor), ``sampling`` (FID protocol), ``checkpoint`` and ``released_params`` / ``exact_params``.
    """
    variant, image_size = _parse(arg)
    config = ml_collections.ConfigDict()
    config.name = f"llamagen_{variant}_{image_size}"
    config.image_size = image_size
    config.gpt = gpt_config(variant, image_size)
    config.vq = load_sibling(__file__, "llamagen_vq16.py").vq_config()
    grid = math.isqrt(config.gpt.block_size)
    config.sampling = ml_collections.ConfigDict(dict(
        cfg_scale=FID_CFG[variant], cfg_interval=-1, temperature=1.0, top_k=0, top_p=1.0, sample_logits=True,
        num_fid_samples=50_000, global_seed=0, per_proc_batch_size=32, image_size_eval=256,
        token_grid=grid, precision="bf16"))
    config.checkpoint = ml_collections.ConfigDict(dict(
        hf_repo="FoundationVision/LlamaGen", file=CHECKPOINTS.get((variant, image_size), ""),
        key="" if variant in FLAT_CHECKPOINTS else "model", vq_file="vq_ds16_c2i.pt"))
    config.released_params = RELEASED_PARAMS[variant]
    config.exact_params = EXACT_PARAMS[variant]
    return config
