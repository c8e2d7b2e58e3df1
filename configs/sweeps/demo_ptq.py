"""The paper's PTQ tables (appendix A, tables 2-4) on the demo families: RTN against the PTQ methods.

Weight-only settings (W3A16, W4A16) compare RTN, GPTQ, GPTVQ, OmniQuant (LWC) and AWQ; weight-activation
settings (W4A8, W8A8) compare RTN, SmoothQuant and OmniQuant (LWC + LET), as the paper does. Every shipped
demo VAR and DiT member, integer formats, per-channel weight scales, one seed. Calibration follows the paper:
VAR teacher-forced on its own samples, DiT along its own sampling trajectories (`bitlaws.demo.family`).

Usage::

    bitlaws sweep --config configs/sweeps/demo_ptq.py --out runs/demo_ptq && bitlaws report runs/demo_ptq
    bitlaws sweep --config configs/sweeps/demo_ptq.py:quick --out runs/ptq_quick   # smallest member of each family

``bitlaws report`` writes one table per (family, setting) with a column per method, says whether each method
beats RTN, and recomputes the bit-level verdict on each method's cells.
"""

import ml_collections

from bitlaws.configlib import parse_arg
from bitlaws.demo import dit_family, var_family

WEIGHT_ONLY = ("W4A16", "W3A16")
WEIGHT_ACTIVATION = ("W8A8", "W4A8")


def get_config(arg=None):
    args = parse_arg(arg, allowed=("quick", "n_per_class"))
    quick = bool(args.get("quick"))
    var_members, dit_members = var_family.member_names(), dit_family.member_names()
    config = ml_collections.ConfigDict()
    config.evaluator = "demo"
    config.evaluator_module = "bitlaws.demo.evaluate"
    config.models = (var_members[:1] + dit_members[:1]) if quick else tuple(var_members) + tuple(dit_members)
    config.settings = ("W16A16",) + WEIGHT_ONLY + WEIGHT_ACTIVATION
    config.formats = ("int",)
    config.methods = ("rtn", "gptq", "gptvq", "omniquant", "awq", "smoothquant")
    config.method_settings = ml_collections.ConfigDict({
        "gptq": WEIGHT_ONLY, "gptvq": WEIGHT_ONLY, "awq": WEIGHT_ONLY, "smoothquant": WEIGHT_ACTIVATION})
    config.seeds = (0,)
    config.method_params = ml_collections.ConfigDict()
    # Baked: the methods' quantized values in float kernels (the same numbers as packed, tested bit for bit in
    # tests/ptq; `make demo` runs its W4A16 cells packed). Packed cells compile one graph per method and member.
    config.quant = ml_collections.ConfigDict({"weight_group_size": 0, "weight_calibrator": "minmax",
                                              "materialize": "baked", "packed_settings": ()})
    config.demo = ml_collections.ConfigDict({
        "n_per_class": int(args.get("n_per_class", 5 if quick else 30)), "reference_split": "all",
        "calibration": {"source": "samples", "num_batches": 4, "batch_size": 32, "seed": 0}})
    config.stop_on_error = True
    return config
