"""A fast real sweep over the ``toy`` evaluator (random QLinear MLPs; its "fid" is a relative error).

Usage: ``bitlaws sweep --config configs/sweeps/toy.py --out runs/toy`` (``:small`` for one model,
``--set toy.sleep_s=0.2`` to slow it down, e.g. to try killing and resuming it).
"""

import ml_collections

from bitlaws.configlib import parse_arg


def get_config(arg=None):
    args = parse_arg(arg, allowed=("small", "sleep_s"))
    config = ml_collections.ConfigDict()
    config.evaluator = "toy"
    config.evaluator_module = "bitlaws.sweep.toy"
    config.models = ("mlp-w16-d2",) if args.get("small") else ("mlp-w16-d2", "mlp-w16-d4")
    config.settings = ("W16A16", "W8A16", "W4A16", "W3A16", "W8A8", "W4A8")
    config.formats = ("int", "fp")
    config.methods = ("rtn",)
    config.seeds = (0,)
    config.method_params = ml_collections.ConfigDict()
    config.quant = ml_collections.ConfigDict({"weight_group_size": 0, "weight_calibrator": "minmax"})
    config.toy = ml_collections.ConfigDict(
        {"batch": 64, "sleep_s": float(args.get("sleep_s", 0.0)), "jit": True})
    config.runtime_fields = ("toy.jit",)
    config.stop_on_error = True
    return config
