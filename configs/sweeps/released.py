"""The study on the released models: VAR-d16/d20/d24/d30 and DiT-XL/2 (``bitlaws port`` output), FID-50K and IS;
LlamaGen-B/L/XL/XXL/3B and MAR-B/L/H on request (``model=llamagen_b`` ... ``model=mar_h``).

Usage (see docs/released_study.md for the downloads and the port commands)::

    bitlaws sweep --config configs/sweeps/released.py --out runs/released                 # all five models
    bitlaws sweep --config configs/sweeps/released.py:model=var_d16 --out runs/var_d16   # one model
    bitlaws sweep --config configs/sweeps/released.py:root=/data/ported --out runs/released \\
        --set released.reference=/data/VIRTUAL_imagenet256_labeled.npz
    bitlaws sweep --config configs/sweeps/released.py:model=mar_b --out runs/mar_b       # a LlamaGen / MAR model
    bitlaws sweep --config configs/sweeps/released.py:smoke --out /tmp/released_smoke    # tiny models, CPU, minutes
    bitlaws sweep --config configs/sweeps/released.py:smoke,ar --out /tmp/released_ar    # tiny LlamaGen and MAR

Arguments: ``model=NAME`` (one of `MODELS` (the default list) or `AR_MODELS`; with ``smoke`` one of
`SMOKE_MODELS`, with ``smoke,ar`` one of `SMOKE_AR_MODELS`, with ``smoke,four`` one of both), ``root=DIR`` (folder
holding the ported folders named as in `_checkpoints`, default ``~/.cache/bitlaws/ported``), ``n=N`` (samples per
cell), ``smoke`` (the fixtures' tiny random-weight VAR and DiT, ported into ``cache=DIR``, default
``~/.cache/bitlaws/released_smoke``, when missing; ``ar``: the LlamaGen and MAR fixtures instead, 4 MAR iterations
and 4 head steps; ``four``: all four). The ``released.llamagen_sampling`` / ``mar_sampling`` blocks and the
LlamaGen / MAR checkpoint entries are there only when such a model is chosen (the VAR / DiT config is unchanged).

Every field can be changed with ``--set``: ``released.checkpoints.<model>.<kind>`` (ported folders),
``released.reference`` (FID statistics npz: ``mu``, ``sigma``), ``released.inception`` (FID Inception weight
file; empty: ``$BITLAWS_FID_INCEPTION`` or ``~/.cache/bitlaws/pt_inception-2015-12-05-6726825d.pth``),
``released.n_samples``, ``released.shard_size``, ``released.per_device_batch``, ``released.is_splits``,
``released.labels`` (``cyclic`` or ``blocks``), ``released.var_sampling.cfg`` / ``top_k`` / ``top_p`` /
``more_smooth`` and ``released.dit_sampling.sampler`` / ``timestep_respacing`` / ``cfg_scale`` /
``clip_denoised``, ``released.llamagen_sampling.cfg_scale`` / ``cfg_interval`` / ``temperature`` / ``top_k`` /
``top_p`` / ``image_size_eval`` (0: no resize), ``released.mar_sampling.num_iter`` / ``num_sampling_steps`` /
``cfg`` / ``cfg_schedule`` / ``temperature`` (None: the protocol stored with the port, i.e. the paper's), ``released.frechet`` (``sqrtm``:
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
AR_MODELS = ("llamagen_b", "llamagen_l", "llamagen_xl", "llamagen_xxl", "llamagen_3b", "mar_b", "mar_l", "mar_h")
LLAMAGEN_VQ_FOLDER = "llamagen_vq16"
MAR_VAE_FOLDER = "mar_vae_kl16"
SMOKE_AR_MODELS = ("llamagen_fixture", "mar_fixture")
_SAMPLING = {
    "llamagen": {"cfg_scale": None, "cfg_interval": None, "temperature": None, "top_k": None, "top_p": None,
                 "image_size_eval": None},
    "mar": {"num_iter": None, "num_sampling_steps": None, "cfg": None, "cfg_schedule": None, "temperature": None},
}


def _checkpoints(root: str, models: tuple) -> dict:
    entries = {name: {"var": f"{root}/{name}", "vqvae": f"{root}/{VQVAE_FOLDER}"} for name in MODELS[:4]}
    entries["dit_xl2"] = {"dit": f"{root}/dit_xl2", "vae": f"{root}/{SD_VAE_FOLDER}"}
    for name in models:
        if name.startswith("llamagen_"):
            entries[name] = {"llamagen": f"{root}/{name}", "llamagen_vq": f"{root}/{LLAMAGEN_VQ_FOLDER}"}
        elif name.startswith("mar_"):
            entries[name] = {"mar": f"{root}/{name}", "mar_vae": f"{root}/{MAR_VAE_FOLDER}"}
    return entries


def _add_ar_sampling(block: ml_collections.ConfigDict, models: tuple) -> None:
    """The ``llamagen_sampling`` / ``mar_sampling`` blocks of the families among `models` (all knobs None)."""
    for family, knobs in _SAMPLING.items():
        if any(name.startswith(f"{family}_") for name in models):
            block[f"{family}_sampling"] = ml_collections.ConfigDict(dict(knobs))


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
    args = parse_arg(arg, allowed=("smoke", "ar", "four", "model", "root", "n", "cache"))
    if (args.get("ar") or args.get("four")) and not args.get("smoke"):
        raise ValueError("released config: 'ar' and 'four' select smoke models; use them with 'smoke'")
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

        four = bool(args.get("four"))
        ar = four or bool(args.get("ar"))
        paths = smoke_inputs(args.get("cache"), classic=four or not ar, ar=ar)
        models = SMOKE_MODELS + SMOKE_AR_MODELS if four else SMOKE_AR_MODELS if ar else SMOKE_MODELS
        config.models = _chosen(args.get("model"), models)
        config.settings = ("W16A16", "W4A16")
        config.formats = ("int",)
        checkpoints = {}
        if four or not ar:
            checkpoints.update({"var_fixture": {"var": paths["var"], "vqvae": paths["vqvae"]},
                                "dit_fixture": {"dit": paths["dit"], "vae": paths["vae"]}})
        if ar:
            checkpoints.update({"llamagen_fixture": {"llamagen": paths["llamagen"],
                                                     "llamagen_vq": paths["llamagen_vq"]},
                                "mar_fixture": {"mar": paths["mar"], "mar_vae": paths["mar_vae"]}})
        config.released = _released_block(checkpoints, paths["reference"], int(args.get("n", 24)))
        config.released.update({"shard_size": 8, "per_device_batch": 4, "inception_batch": 8, "is_splits": 2,
                                "frechet": "features", "inception": RANDOM_INCEPTION})
        config.released.dit_sampling.timestep_respacing = "4"
        if ar:
            _add_ar_sampling(config.released, SMOKE_AR_MODELS)
            config.released.mar_sampling.update({"num_iter": 4, "num_sampling_steps": "4"})
    else:
        model = args.get("model")
        config.models = MODELS if model is None else _chosen(model, MODELS + AR_MODELS)
        config.settings = STANDARD_SETTINGS
        config.released = _released_block(_checkpoints(str(args.get("root", DEFAULT_ROOT)), config.models),
                                          DEFAULT_REFERENCE, int(args.get("n", 50_000)))
        _add_ar_sampling(config.released, config.models)
    # Batch sizes, progress bars and whether images are kept change no record: a resume may change them.
    config.runtime_fields = ("released.per_device_batch", "released.inception_batch", "released.progress",
                             "released.keep_samples")
    config.stop_on_error = True
    return config
