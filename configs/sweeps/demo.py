"""The demo study: every shipped demo VAR and DiT member x precision setting x format, RTN.

Usage::

    bitlaws sweep --config configs/sweeps/demo.py --out runs/demo          # the full grid (make demo)
    bitlaws sweep --config configs/sweeps/demo.py:quick --out runs/quick   # two sizes per family, 3 settings
    bitlaws sweep --config configs/sweeps/demo.py:quick,seeds=4 --out runs/quick4   # every cell with seeds 0-3
    bitlaws sweep --config configs/sweeps/demo.py:four --out runs/four      # + LlamaGen and MAR (paper app. C.2)

Each cell draws ``demo.n_per_class`` samples per digit and scores them with the DFD (the Fréchet distance in
the digits classifier's features: the demo's FID analogue) against the statistics of all 1797 digits, with a
95 % jackknife interval (``demo.jackknife`` groups, default 50; 0 turns intervals and saved features off).
``seeds=K`` runs every cell with seeds 0..K-1 (the same seeds at every precision, so each seed's quantized
cells pair with its float cell); the report's tables show the mean over seeds.
"""

import ml_collections

from bitlaws.configlib import parse_arg
from bitlaws.demo import dit_family, var_family


def _spread(names, count):
    """`count` members spread over the sorted list (smallest and largest included)."""
    if len(names) <= count:
        return tuple(names)
    step = (len(names) - 1) / (count - 1)
    return tuple(names[round(i * step)] for i in range(count))


def get_config(arg=None):
    args = parse_arg(arg, allowed=("quick", "four", "n_per_class", "seeds"))
    seeds = args.get("seeds", 1)
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"demo config: seeds must be a positive integer (seeds per cell), got {seeds!r}")
    quick = bool(args.get("quick"))
    var_members, dit_members = var_family.member_names(), dit_family.member_names()
    config = ml_collections.ConfigDict()
    config.evaluator = "demo"
    config.evaluator_module = "bitlaws.demo.evaluate"
    if quick and args.get("four"):
        raise ValueError("demo config: choose one of quick and four")
    if quick:
        config.models = _spread(var_members, 2) + _spread(dit_members, 2)
        config.settings = ("W16A16", "W4A16", "W8A8")
        config.formats = ("int",)
    elif args.get("four"):
        # The four families side by side (paper appendix C.2: discrete LlamaGen vs VAR, continuous MAR vs DiT),
        # integer formats only to stay within ~20 minutes on 2 cores.
        from bitlaws.demo import llamagen_family, mar_family  # pylint: disable=g-import-not-at-top

        config.models = (tuple(var_members) + tuple(dit_members) + tuple(llamagen_family.member_names())
                         + tuple(mar_family.member_names()))
        config.settings = ("W16A16", "W8A16", "W4A16", "W3A16", "W8A8", "W4A8")
        config.formats = ("int",)
    else:
        config.models = tuple(var_members) + tuple(dit_members)
        config.settings = ("W16A16", "W8A16", "W4A16", "W3A16", "W8A8", "W4A8")
        config.formats = ("int", "fp")
    config.methods = ("rtn",)
    config.seeds = tuple(range(seeds))
    config.method_params = ml_collections.ConfigDict()
    # W4A16 cells run the deployed representation (packed QArray kernels, storage measured from them); the other
    # settings run the same numbers baked into float kernels (one compilation for every weight-only setting).
    config.quant = ml_collections.ConfigDict({"weight_group_size": 0, "weight_calibrator": "minmax",
                                              "materialize": "baked", "packed_settings": ("W4A16",)})
    config.demo = ml_collections.ConfigDict({"n_per_class": int(args.get("n_per_class", 50)),
                                             "reference_split": "all"})
    config.stop_on_error = True
    return config
