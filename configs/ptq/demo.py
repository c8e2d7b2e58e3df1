"""PTQ of one model with one method: ``bitlaws ptq --config configs/ptq/demo.py:VARIANT --out DIR``.

VARIANT is a comma-separated list; the first item is the model, the others are told apart by their form
(in any order)::

    MODEL[,W<w>A<a>][,int|fp][,g<N>][,METHOD][,runlocal][,NAME=VALUE ...]

* ``MODEL``: a demo member (``var-d4``, ``dit-d3``; ``bitlaws.demo.family.member_names``) or a folder written
  by ``bitlaws port`` (RTN needs no data; other methods need ``--set calibration.data_fn=module:function``).
* ``W<w>A<a>``: the precision setting (default ``W4A16``); ``int`` / ``fp``: the format family (default ``int``).
* ``g<N>``: weight groups of N input rows (default: one scale per output channel).
* ``METHOD``: a registered method (default ``rtn``): ``gptq``, ``smoothquant``, ``awq``, ``omniquant`` ...
* ``NAME=VALUE``: a hyper-parameter of the method (``alpha=0.6``, ``act_order=True``).
* ``runlocal``: one calibration batch of 8 (a quick run).

Examples: ``var-d4,W4A16,gptq`` · ``dit-d3,W8A8,smoothquant,alpha=0.6`` · ``var-d2,W4A16,g16,rtn`` ·
``dit-d4,W8A16,fp``. Other fields with ``--set``: ``calibration.source=data``, ``calibration.num_batches=2``,
``calibration.when=always`` (also for RTN: output-error proxies in layer_errors.json), ``module_path=...``.
"""

import ast
import re

import ml_collections

from bitlaws.demo.family import DEFAULT_CALIBRATION

_SETTING = re.compile(r"W\d+A\d+", re.IGNORECASE)
_GROUP = re.compile(r"g(\d+)")
FAMILIES = ("int", "fp")


def _value(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_variant(arg):
    """``"var-d4,W4A16,gptq,g64,alpha=0.5"`` -> dict of the config's fields (raises ValueError naming the item)."""
    items = [item.strip() for item in (arg or "").split(",") if item.strip()]
    if not items:
        raise ValueError("configs/ptq/demo.py needs a variant: MODEL[,W<w>A<a>][,int|fp][,g<N>][,METHOD]"
                         "[,runlocal][,NAME=VALUE ...], e.g. var-d4,W4A16,gptq")
    if _SETTING.fullmatch(items[0]) or items[0] in FAMILIES or "=" in items[0]:
        raise ValueError(f"variant {arg!r}: the first item must be the model (a demo member or a folder), got "
                         f"{items[0]!r}")
    out = {"source": items[0], "method_params": {}}
    for item in items[1:]:
        name, sep, value = item.partition("=")
        if sep:
            out["method_params"][name.strip()] = _value(value.strip())
        elif _SETTING.fullmatch(item):
            out["setting"] = item.upper()
        elif item in FAMILIES:
            out["format"] = item
        elif _GROUP.fullmatch(item):
            out["weight_group_size"] = int(_GROUP.fullmatch(item).group(1))
        elif item == "runlocal":
            out["runlocal"] = True
        elif "method" in out:
            raise ValueError(f"variant {arg!r}: {item!r} is not a setting (W4A16), family {FAMILIES}, group size "
                             f"(g64) or NAME=VALUE, and the method is already {out['method']!r}")
        else:
            out["method"] = item
    return out


def get_config(arg=None):
    variant = parse_variant(arg)
    config = ml_collections.ConfigDict()
    config.model = ml_collections.ConfigDict({"source": variant["source"]})
    config.setting = variant.get("setting", "W4A16")
    config.format = variant.get("format", "int")
    config.weight_group_size = variant.get("weight_group_size", 0)  # 0: one scale per output channel
    config.weight_calibrator = "minmax"
    config.module_path = ""  # "": the model's default layers (demo members: member.quant_pattern)
    config.rules = ()  # explicit QuantRules replace setting / format / weight_* / module_path
    config.method = variant.get("method", "rtn")
    config.method_params = ml_collections.ConfigDict(variant["method_params"])
    # Demo members: bitlaws.demo.family.calibration_data (default: the paper's protocol, the float model's own
    # samples; calibration.source=data: real digits, faster).
    config.calibration = ml_collections.ConfigDict({
        **DEFAULT_CALIBRATION,
        "data_fn": "",  # "module:function" -> CalibrationData, for ported models
        "when": "needed"})  # or "always"
    if variant.get("runlocal"):
        config.calibration.num_batches, config.calibration.batch_size = 1, 8
    config.seed = 0
    config.backend = "xla"
    return config
