"""The paper's distillation table (table 5) on the demo families: RTN against QAT with each loss.

VAR members: RTN and QAT with MSE, JS, forward KL, reverse KL and TopKLD at W3A16, W4A16 and W4A8 (plus RTN at
W8A8, the curve W4A8 should pass, and the W16A16 baseline). DiT members: RTN and QAT with MSE only - the paper
gives no DiT recipe; we distil the full network output (mean and variance channels) at timesteps uniform over
the 1000 training steps (``q_sample`` of real digits), and say so in every record's ``calibration`` field.

QAT data: VAR teacher-forced on token maps of its own samples (the paper's protocol; 8 batches of 32), DiT
``q_sample`` inputs of real digits (8 x 32). Each QAT cell trains 100 AdamW steps of batch 16 (lr 1e-4, warmup
10, cosine to 10 %) and is evaluated baked (the trained weights rounded to the setting's grid). One learning
rate for every loss and family: single runs gave var-d2 W3A16 TopKLD DFD 99 / 98 / 105 and dit-d3 W4A16 MSE
DFD 78 / 89 / 63 at lr 1e-3 / 3e-4 / 1e-4 (RTN: 136 and 65), so 1e-4 is the rate that does not hurt DiT.
TopKLD's K is 16 of the demo vocabulary's 64 (the demo VAR samples without top-k, so the paper's rule "K = the
sampling top-k" gives no value; 16/64 is the share the paper's K = 600 ... 900 takes of 4096 at the upper end).

Usage::

    bitlaws sweep --config configs/sweeps/demo_qat.py --out runs/demo_qat --workers 2 && bitlaws report --results runs/demo_qat
    bitlaws sweep --config configs/sweeps/demo_qat.py:quick --out runs/qat_quick   # smallest member of each family
"""

import ml_collections

from bitlaws.configlib import parse_arg
from bitlaws.demo import dit_family, var_family

QAT_SETTINGS = ("W3A16", "W4A16", "W4A8")
LOSSES = ("mse", "js", "fkl", "rkl", "topkld")
DEMO_K = 16


def get_config(arg=None):
    args = parse_arg(arg, allowed=("quick", "n_per_class", "steps"))
    quick = bool(args.get("quick"))
    var_members, dit_members = var_family.member_names(), dit_family.member_names()
    if quick:
        var_members, dit_members = var_members[:1], dit_members[:1]
    steps = int(args.get("steps", 20 if quick else 100))
    config = ml_collections.ConfigDict()
    config.evaluator = "demo"
    config.evaluator_module = "bitlaws.demo.evaluate"
    config.models = tuple(var_members) + tuple(dit_members)
    config.settings = ("W16A16",) + QAT_SETTINGS + ("W8A8",)
    config.formats = ("int",)
    methods = tuple(f"qat:{loss}" for loss in LOSSES)
    config.methods = ("rtn",) + methods
    config.method_settings = ml_collections.ConfigDict({m: QAT_SETTINGS for m in methods})
    config.method_models = ml_collections.ConfigDict(
        {m: tuple(var_members) for m in methods if m != "qat:mse"})
    common = {"steps": steps, "batch_size": 16, "lr": 1e-4, "warmup_steps": 10, "final_lr_fraction": 0.1,
              "log_every": 10}
    config.method_params = ml_collections.ConfigDict(
        {m: dict(common, **({"k": DEMO_K} if m == "qat:topkld" else {})) for m in methods})
    config.seeds = (0,)
    config.quant = ml_collections.ConfigDict({"weight_group_size": 0, "weight_calibrator": "minmax",
                                              "materialize": "baked", "packed_settings": ()})
    config.demo = ml_collections.ConfigDict({
        "n_per_class": int(args.get("n_per_class", 5 if quick else 30)), "reference_split": "all",
        "calibration": {"source": "samples", "num_batches": 8, "batch_size": 32, "seed": 0,
                        "by_family": {"dit": {"source": "data"}}}})
    config.stop_on_error = True
    return config
