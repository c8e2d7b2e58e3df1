"""The study on the released models: VAR-d16/d20/d24/d30 and DiT-XL/2 (``bitlaws port`` output), FID-50K and IS.

Usage (see docs/released_study.md for the downloads and the port commands)::

    bitlaws sweep --config configs/sweeps/released.py --out runs/released                 # all five models
    bitlaws sweep --config configs/sweeps/released.py:model=var_d16 --out runs/var_d16   # one model
    bitlaws sweep --config configs/sweeps/released.py:root=/data/ported --out runs/released \\
        --set released.reference=/data/VIRTUAL_imagenet256_labeled.npz
    bitlaws sweep --config configs/sweeps/released.py:smoke --out /tmp/released_smoke    # tiny models, CPU, minutes

Arguments: ``model=NAME`` (one of `MODELS`; with ``smoke`` one of `SMOKE_MODELS`), ``root=DIR`` (folder holding
the ported folders named as in `_checkpoints`, default ``~/.cache/bitlaws/ported``), ``n=N`` (samples per cell),
``smoke`` (the fixtures' tiny random-weight models, ported into ``cache=DIR``, default
``~/.cache/bitlaws/released_smoke``, when missing).

Every field can be changed with ``--set``: ``released.checkpoints.<model>.<kind>`` (ported folders),
``released.reference`` (FID statistics npz: ``mu``, ``sigma``), ``released.inception`` (FID Inception weight
file; empty: ``$BITLAWS_FID_INCEPTION`` or ``~/.cache/bitlaws/pt_inception-2015-12-05-6726825d.pth``),
``released.n_samples``, ``released.shard_size``, ``released.per_device_batch``, ``released.is_splits``,
``released.labels`` (``cyclic`` or ``blocks``), ``released.var_sampling.cfg`` / ``top_k`` / ``top_p`` /
``more_smooth`` and ``released.dit_sampling.sampler`` / ``timestep_respacing`` / ``cfg_scale`` /
``clip_denoised`` (None: the protocol stored with the port, i.e. the paper's), ``released.frechet`` (``sqrtm``:
pytorch-fid's procedure; ``features``: the same distance from the samples' features, for ``n_samples <= 2048``),
``released.keep_samples`` (False: shards hold features and logits only), ``released.progress``,
``released.attention`` (``xla``; ``dot_product_attention`` or ``cudnn`` for JAX's fused attention on GPUs) and
``released.compute_dtype`` (``float32``; ``bfloat16`` matmul operands with float32 accumulation on GPUs/TPUs).
"""

import ml_collections

from bitlaws.configlib import parse_arg
from bitlaws.sweep.settings import STANDARD_SETTINGS

MODELS = ("var_d16", "var_d20", "var_d24", "var_d30", "dit_xl2")
DEFAULT_ROOT = "~/.cache/bitlaws/ported"
DEFAULT_REFERENCE = "~/.cache/bitlaws/VIRTUAL_imagenet256_labeled.npz"
VQVAE_FOLDER = "vqvae_ch160v4096z32"
SD_VAE_FOLDER = "sd_vae_ft_ema"
SMOKE_MODELS = ("var_fixture", "dit_fixture")


def _checkpoints(root: str) -> dict:
    entries = {name: {"var": f"{root}/{name}", "vqvae": f"{root}/{VQVAE_FOLDER}"} for name in MODELS[:4]}
    entries["dit_xl2"] = {"dit": f"{root}/dit_xl2", "vae": f"{root}/{SD_VAE_FOLDER}"}
    return entries


def _released_block(checkpoints: dict, reference: str, n_samples: int) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        "checkpoints": checkpoints,
        "reference": reference,
        "inception": "",
        "n_samples": n_samples,
        "shard_size": 1000,
        "per_device_batch": 8,
        "inception_batch": 25,
        "labels": "cyclic",
        "per_class": 50,
        "is_splits": 10,
        "frechet": "sqrtm",
        "keep_samples": True,
        "progress": True,
        "attention": "xla",
        "compute_dtype": "float32",
        "var_sampling": {"cfg": None, "top_k": None, "top_p": None, "more_smooth": None},
        "dit_sampling": {"sampler": None, "timestep_respacing": None, "cfg_scale": None, "clip_denoised": None},
    })


def _chosen(model, models: tuple) -> tuple:
    if model is None:
        return models
    if model not in models:
        raise ValueError(f"released config: model must be one of {models}, got {model!r}")
    return (model,)


def get_config(arg=None):
    args = parse_arg(arg, allowed=("smoke", "model", "root", "n", "cache"))
    config = ml_collections.ConfigDict()
    config.evaluator = "released"
    config.evaluator_module = "bitlaws.sweep.released"
    config.formats = ("int", "fp")
    config.methods = ("rtn",)
    config.seeds = (0,)
    config.method_params = ml_collections.ConfigDict()
    config.quant = ml_collections.ConfigDict({"weight_group_size": 0, "weight_calibrator": "minmax",
                                              "materialize": "baked", "packed_settings": ()})
    if args.get("smoke"):
        from bitlaws.sweep.released_smoke import RANDOM_INCEPTION, smoke_inputs  # pylint: disable=g-import-not-at-top

        paths = smoke_inputs(args.get("cache"))
        config.models = _chosen(args.get("model"), SMOKE_MODELS)
        config.settings = ("W16A16", "W4A16")
        config.formats = ("int",)
        config.released = _released_block(
            {"var_fixture": {"var": paths["var"], "vqvae": paths["vqvae"]},
             "dit_fixture": {"dit": paths["dit"], "vae": paths["vae"]}}, paths["reference"], int(args.get("n", 24)))
        config.released.update({"shard_size": 8, "per_device_batch": 4, "inception_batch": 8, "is_splits": 2,
                                "frechet": "features", "inception": RANDOM_INCEPTION})
        config.released.dit_sampling.timestep_respacing = "4"
    else:
        config.models = _chosen(args.get("model"), MODELS)
        config.settings = STANDARD_SETTINGS
        config.released = _released_block(_checkpoints(str(args.get("root", DEFAULT_ROOT))), DEFAULT_REFERENCE,
                                          int(args.get("n", 50_000)))
    # Batch sizes, progress bars and whether images are kept change no record: a resume may change them.
    config.runtime_fields = ("released.per_device_batch", "released.inception_batch", "released.progress",
                             "released.keep_samples")
    config.stop_on_error = True
    return config
