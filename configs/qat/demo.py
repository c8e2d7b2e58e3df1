"""QAT with distillation of one demo member: ``bitlaws ptq --config configs/qat/demo.py:VARIANT --out DIR``.

The float model teaches its fake-quantized self (`bitlaws.qat.qat`, methods ``qat:<loss>`` of the one registry);
the trained weights are written as a packed quantized checkpoint like any PTQ method's. VARIANT is a
comma-separated list; the first item is the model, the others are told apart by their form (in any order)::

    MODEL[,W3A16|W4A16|W8A16|W4A8|W8A8][,int|fp][,g<N>][,LOSS][,NAME=VALUE ...][,runlocal]

* ``MODEL``: a demo member (``var-d1`` ... ``var-d4``, ``dit-d2`` ... ``dit-d5``) or a ``bitlaws port`` folder
  (then ``--set calibration.data_fn=module:function`` provides the training data; see ``configs/qat/var.py``).
* ``W<w>A<a>``: the precision setting (default ``W4A16``); ``int`` / ``fp``: the format family (default ``int``).
  ``fp`` has 8-, 6- and 4-bit formats only, so ``W3A16,fp`` is refused here, naming the combination.
* ``g<N>``: weight groups of N input rows (default: one scale per output channel).
* ``LOSS``: ``mse``, ``js``, ``fkl``, ``rkl`` or ``topkld`` (default ``topkld``); the method is ``qat:LOSS``.
* ``NAME=VALUE``: a QAT hyper-parameter (``steps=200``, ``lr=3e-4``, ``k=8``, ``lsq=True``; the list is the
  module docstring of `bitlaws.qat.qat`); unknown names are refused when the config is built.
* ``runlocal``: 5 steps of batch 8 on one calibration batch of 8 (a quick end-to-end run).

Demo defaults (those of `tests/qat/test_qat_demo.py`; ``configs/sweeps/demo_qat.py`` uses lr 1e-4 for every
loss and family, see there): 100 AdamW steps of batch 16, lr 1e-3, warmup 10, cosine to 10 % of the peak, log every
10 steps; every hyper-parameter of the method lands in ``method_params`` so each
can be changed with ``--set method_params.NAME=VALUE``.

TopKLD's K is 16 of the demo vocabulary's V = 64. The paper's rule is "K = the top-k used at sampling" (its
ablation over K = 400 ... 800 found 600 best at W3A16 with the release sampling at top-k 900 of V = 4096); the demo
VAR samples without top-k (cfg 0, top-k 0: the lowest DFD at d3-d4), so the rule gives no value, and 16/64 = 0.25
is the share the paper's K = 600 ... 900 takes of 4096 (0.15 ... 0.22) at its upper end.

Training data (``calibration``): 8 batches of 32. VAR: teacher-forced token maps of the float model's own samples
(the paper's protocol: labels spread over the classes, half of each batch relabelled as the null class). DiT:
``source=data``: real digits noised by ``q_sample`` at timesteps uniform over the 1000 training steps, the full
network output distilled (the paper gives no DiT recipe; this is ours). ``runlocal``: one batch of 8.

Examples: ``var-d2,W3A16`` · ``var-d4,W4A8,fkl,steps=200`` · ``dit-d3,W4A16,mse`` · ``var-d1,W8A8,fp,js,runlocal``.
Other fields with ``--set``: ``calibration.num_batches=16``, ``calibration.source=data``, ``seed=1``,
``method_params.out_dir=runs/qat_state`` (train-state checkpoints; a rerun resumes).
"""

import pathlib

import ml_collections

from bitlaws import configlib

PTQ = configlib.load_module(pathlib.Path(__file__).resolve().parent.parent / "ptq" / "demo.py")

LOSSES = ("mse", "js", "fkl", "rkl", "topkld")
DEFAULT_LOSS = "topkld"
METHOD_PREFIX = "qat:"
DEMO_PARAMS = {"steps": 100, "batch_size": 16, "lr": 1e-3, "warmup_steps": 10, "final_lr_fraction": 0.1,
               "log_every": 10}
DEMO_K = 16  # TopKLD's K of the demo vocabulary V = 64 (see the module docstring)
DEMO_CALIBRATION = {"num_batches": 8, "batch_size": 32}
RUNLOCAL_PARAMS = {"steps": 5, "batch_size": 8, "warmup_steps": 1, "log_every": 1}
RUNLOCAL_CALIBRATION = {"num_batches": 1, "batch_size": 8}
DATA_FAMILIES = ("dit",)  # demo families trained on real digits (q_sample inputs) instead of own samples


def parse_variant(arg, usage):
    """The `configs/ptq/demo.py` grammar with the method read as a QAT loss.

    Returns:
        The fields of ``PTQ.parse_variant`` with ``loss`` (one of `LOSSES`) in place of ``method``.

    Raises:
        ValueError: an empty variant, an item `configs/ptq/demo.py` refuses, or an unknown loss (named).
    """
    if not (arg or "").strip(","):
        raise ValueError(f"this config needs a variant: {usage}")
    variant = PTQ.parse_variant(arg)
    loss = variant.pop("method", DEFAULT_LOSS)
    if loss.startswith(METHOD_PREFIX):
        loss = loss[len(METHOD_PREFIX):]
    if loss not in LOSSES:
        raise ValueError(f"variant {arg!r}: {loss!r} is not a QAT loss, setting (W4A16), format family "
                         f"{PTQ.FAMILIES}, group size (g64) or NAME=VALUE; losses: {', '.join(LOSSES)}")
    variant["loss"] = loss
    return variant


def check_setting(arg, setting, family):
    """Refuses a float setting and a (setting, family) pair without a format, naming the combination."""
    from bitlaws.sweep import settings  # pylint: disable=g-import-not-at-top

    if settings.parse_setting(setting).is_float:
        raise ValueError(f"variant {arg!r}: {setting} is the float model; QAT needs weights or activations below "
                         f"16 bits (W3A16, W4A16, W8A16, W4A8, W8A8)")
    reason = settings.not_applicable_reason(setting, family)
    if reason is not None:
        hint = "; use int" if family == "fp" else ""
        raise ValueError(f"variant {arg!r}: no QAT at {reason}{hint}")


def method_params(arg, loss, defaults, k, user):
    """`defaults` (plus ``k`` for TopKLD) overridden by `user`, resolved against the method's hyper-parameters.

    Raises:
        ValueError: a hyper-parameter ``qat:<loss>`` does not have (the message lists the ones it has).
    """
    from bitlaws.sweep import settings  # pylint: disable=g-import-not-at-top  (imports bitlaws.qat: qat:* exist)

    params = dict(defaults)
    if loss == "topkld":
        params["k"] = k
    params.update(user)
    try:
        return settings.get_method(METHOD_PREFIX + loss).resolve_params(params)
    except ValueError as e:
        raise ValueError(f"variant {arg!r}: {e}") from e


def qat_config(arg, *, usage, params, k, calibration, runlocal_params, runlocal_calibration, source=None):
    """The ``bitlaws ptq`` config of a QAT variant, on top of ``configs/ptq/demo.py``'s `get_config`.

    Args:
        arg: The variant (see the module docstring); its first item is ``model.source``.
        usage: The variant grammar, for the empty-variant error.
        params: Default hyper-parameters of the method (the variant's ``NAME=VALUE`` items win).
        k: TopKLD's default K.
        calibration: Fields set in ``config.calibration`` (training data).
        runlocal_params, runlocal_calibration: What ``runlocal`` changes in both.
        source: ``model.source`` when the variant's first item only names it (``configs/qat/var.py``: ``d16``).
    """
    variant = parse_variant(arg, usage)
    runlocal = bool(variant.get("runlocal"))
    config = PTQ.get_config(arg)
    if source is not None:
        config.model.source = source
    check_setting(arg, config.setting, config.format)
    config.method = METHOD_PREFIX + variant["loss"]
    defaults = {**params, **(runlocal_params if runlocal else {})}
    config.method_params = ml_collections.ConfigDict(
        method_params(arg, variant["loss"], defaults, k, variant["method_params"]))
    config.calibration.update({**calibration, **(runlocal_calibration if runlocal else {})})
    return config


def get_config(arg=None):
    usage = ("MODEL[,W3A16|W4A16|W8A16|W4A8|W8A8][,int|fp][,g<N>][,mse|js|fkl|rkl|topkld][,NAME=VALUE ...]"
             "[,runlocal], e.g. var-d2,W3A16,topkld")
    source = (arg or "").split(",", 1)[0].strip()
    family = source.split("-", 1)[0]
    calibration = dict(DEMO_CALIBRATION, source="data" if family in DATA_FAMILIES else "samples")
    return qat_config(arg, usage=usage, params=DEMO_PARAMS, k=DEMO_K, calibration=calibration,
                      runlocal_params=RUNLOCAL_PARAMS, runlocal_calibration=RUNLOCAL_CALIBRATION)
