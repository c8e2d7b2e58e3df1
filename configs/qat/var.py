"""QAT with distillation of a released VAR: ``bitlaws ptq --config configs/qat/var.py:VARIANT --out DIR``.

The same job as ``configs/qat/demo.py`` (whose grammar and checks this config reuses) on a VAR you ported::

    bitlaws port vqvae --ckpt vae_ch160v4096z32.pth --config configs/models/var_d16.py --out ckpt/vqvae
    bitlaws port var --ckpt var_d16.pth --config configs/models/var_d16.py --out ckpt/var_d16
    bitlaws ptq --config configs/qat/var.py:d16,W3A16,topkld --out ckpt/var_d16-w3a16-topkld

VARIANT::

    d16|d20|d24|d30[,W3A16|W4A16|W8A16|W4A8|W8A8][,int|fp][,g<N>][,mse|js|fkl|rkl|topkld][,NAME=VALUE ...]
    [,runlocal]

* ``model.source``: the ``bitlaws port var`` folder, by default ``ckpt/var_d<depth>`` (the README's port
  commands; ``bitlaws port`` has no default output) — ``--set model.source=DIR`` for another.
* ``calibration``: the training data, `bitlaws.qat.var_data.own_samples` (``data_fn``): the teacher-forced token maps
  of the float model's own samples with the release's sampling (cfg 1.5, top-k 900, top-p 0.96), labels spread
  over the 1000 classes, about half of each batch relabelled as the null class; 64 batches of 32 (2048 samples).
  ``calibration.tokenizer`` is the ``bitlaws port vqvae`` folder (default ``ckpt/vqvae``) the sampler needs.
* Layers: every linear of the transformer (``word_embed``, attention ``mat_qkv`` / ``proj``, ``ffn.fc1`` / ``fc2``,
  ``ada_lin``, ``head_nm.ada_lin``, ``head``: the default pattern of ported VARs in `bitlaws.ptq.run`); the
  tokenizer stays in float, as in the paper.
* TopKLD's K = 600: the paper's best K at W3A16 (ablation over 400 ... 800), near the sampling top-k 900 it says
  the best K matches.

QAT defaults (ours: the paper gives the losses and K, not a schedule; every one is a ``NAME=VALUE`` item or
``--set method_params.NAME=VALUE``): the whole transformer fine-tuned (``train=all``) for 2000 AdamW steps of
batch 16 (about 16 epochs of the 2048 samples), peak lr 1e-5 (a fine-tuning rate for a 310M ... 2B pre-trained
transformer; the demo's 1e-3 suits 9k ... 321k parameters), 100 warm-up steps, cosine decay to 10 %, no weight
decay, gradient clipping at 1, log every 50 steps, data parallel over all devices (``mesh_data=-1``; add
``mesh_params=N`` to shard the parameters FSDP-style for d24 / d30). ``runlocal``: 2 steps of batch 8 on one
batch of 8 samples (checks a port end to end).
"""

import pathlib

from bitlaws import configlib

DEMO = configlib.load_module(pathlib.Path(__file__).resolve().with_name("demo.py"))

DEPTHS = (16, 20, 24, 30)
PORT_ROOT = "ckpt"  # the README's `bitlaws port ... --out ckpt/var_d16`, `--out ckpt/vqvae`
PAPER_K = 600
VAR_PARAMS = {"steps": 2000, "batch_size": 16, "lr": 1e-5, "warmup_steps": 100, "final_lr_fraction": 0.1,
              "weight_decay": 0.0, "grad_clip": 1.0, "train": "all", "log_every": 50}
VAR_CALIBRATION = {"data_fn": "bitlaws.qat.var_data:own_samples", "tokenizer": f"{PORT_ROOT}/vqvae",
                   "num_batches": 64, "batch_size": 32, "seed": 0, "cfg": 1.5, "top_k": 900, "top_p": 0.96}
RUNLOCAL_PARAMS = {"steps": 2, "batch_size": 8, "warmup_steps": 1, "log_every": 1}
RUNLOCAL_CALIBRATION = {"num_batches": 1, "batch_size": 8}
USAGE = ("d16|d20|d24|d30[,W3A16|W4A16|W8A16|W4A8|W8A8][,int|fp][,g<N>][,mse|js|fkl|rkl|topkld][,NAME=VALUE ...]"
         "[,runlocal], e.g. d16,W3A16,topkld")


def get_config(arg=None):
    depth = (arg or "").split(",", 1)[0].strip()
    if not depth:
        raise ValueError(f"configs/qat/var.py needs a variant: {USAGE}")
    if depth not in [f"d{d}" for d in DEPTHS]:
        raise ValueError(f"variant {arg!r}: the first item must be the depth, one of "
                         f"{', '.join(f'd{d}' for d in DEPTHS)}; got {depth!r}")
    return DEMO.qat_config(arg, usage=USAGE, params=VAR_PARAMS, k=PAPER_K, calibration=VAR_CALIBRATION,
                           runlocal_params=RUNLOCAL_PARAMS, runlocal_calibration=RUNLOCAL_CALIBRATION,
                           source=f"{PORT_ROOT}/var_{depth}")
