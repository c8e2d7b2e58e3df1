"""Speed of the QAT train step: the compiled step ``qat:topkld`` runs, compile time and steps/s reported apart.

Two models, measured one after the other in one process (side by side, same load):

* **demo**: the shipped demo VAR ``var-d4`` (321k parameters, V = 64) at batch 16, K = 16;
* **VAR-d16**: the released size (310M parameters, V = 4096, L = 680 tokens) with random weights (built from
  ``configs/models/var_d16.py``'s transformer config; no checkpoint) at batch 8 (``--release-batch``), K = 600.
  A batch whose step does not fit in memory is reported as a row with XLA's out-of-memory message.

Both run the method itself (`bitlaws.quant.transform.run_method` with ``qat:topkld``: fake-quantized student,
frozen float teacher, TopKLD, AdamW through `bitlaws.train.train`) with W3A16 int rules on the layers the paper
quantizes (every linear of the transformer: the default pattern of ported VARs, `bitlaws.demo.var_family`'s
``QUANT_PATTERN``), on one batch of random token maps (uniform tokens per scale turned into teacher-forcing inputs
by the tokenizer's quantizer: the demo's trained one, a random-weight release-size one for d16); labels spread over
the classes, half the null class. Values do not change the step's cost.

Timing: ``2 + N`` steps logged every step. The trainer logs the wall time between logged steps, converting each
step's metrics one step late (so the host never waits for the device), and this script records the trainer's
history by wrapping `bitlaws.train.train` for the duration of the run (the QAT method keeps only its summary).
The first interval is compilation plus step 1; the second holds step 2 and the logger's first (eager, so
compiling) evaluation of the learning-rate schedule; the last N intervals telescope to the wall time of steps
3 ... N + 2. step = their mean, steps/s = 1 / step, compile = first interval - step. ``setup`` is the rest of
the method's wall time (student / teacher split, data pool, the final rounding of the trained kernels).

Usage::

    python benchmarks/qat_step.py                 # demo var-d4 (30 steps) and VAR-d16 (3 steps after compile)
    python benchmarks/qat_step.py --release-batch 2   # without --remat batch 8 needs 25.7 GB of XLA temporaries
    python benchmarks/qat_step.py --quick         # var-d1 and a tiny random VAR, a few seconds of steps
    python benchmarks/qat_step.py --only demo --demo-steps 50
    python benchmarks/qat_step.py --only release --remat --release-steps 1   # VAR-d16 batch 8, blocks recomputed
                                                  # in the backward pass: 3.4 GB of temporaries, fits 24 GiB
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bitlaws import configlib
from bitlaws import train as trainlib
from bitlaws.demo import family, var_family
from bitlaws.models.common import random_model
from bitlaws.models.var import VAR, var_ctor_kwargs
from bitlaws.models.vqvae import VectorQuantizer2
from bitlaws.port.convert import REPO_CONFIGS, model_ctor
from bitlaws.quant import CalibrationData, run_method
from bitlaws.sweep import settings

SETTING, FORMAT = "W3A16", "int"


@contextlib.contextmanager
def recorded_training():
    """Collects the `TrainResult` of every `bitlaws.train.train` call inside the block (per-step timings)."""
    results = []
    original = trainlib.train

    def recording(*args, **kwargs):
        result = original(*args, **kwargs)
        results.append(result)
        return result

    trainlib.train = recording
    try:
        yield results
    finally:
        trainlib.train = original


def _logits(model: nnx.Module, batch) -> jax.Array:
    labels, inputs = batch
    return model(labels, inputs)  # [B, L, V]


def token_map_batch(model: VAR, quantizer: nnx.Module, batch: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One batch ``(labels [B] int32 (half the null class), inputs [B, L - 1, Cvae] float32)`` of random token maps."""
    rng = np.random.default_rng(seed)
    tokens = [jnp.asarray(rng.integers(0, model.vocab_size, (batch, pn * pn)), jnp.int32) for pn in model.patch_nums]
    inputs = nnx.jit(lambda q, t: q.idx_bl_to_var_input(t))(quantizer, tokens)  # [B, L - 1, Cvae]
    labels = np.arange(batch, dtype=np.int32) % model.num_classes
    labels = np.where(np.arange(batch) % 2 == 1, model.num_classes, labels).astype(np.int32)
    return labels, np.asarray(inputs, np.float32)


def release_quantizer(vq_ctor: dict, seed: int) -> VectorQuantizer2:
    """The release tokenizer's quantizer (codebook + Phi convs) with random weights: all that builds VAR inputs."""
    return random_model(lambda: VectorQuantizer2(
        vq_ctor["vocab_size"], vq_ctor["z_channels"], using_znorm=vq_ctor["using_znorm"],
        v_patch_nums=tuple(vq_ctor["v_patch_nums"]), quant_resi=vq_ctor["quant_resi"],
        share_quant_resi=vq_ctor["share_quant_resi"], default_qresi_counts=vq_ctor["default_qresi_counts"],
        rngs=nnx.Rngs(0)), seed=seed)


REMAT = {"on": False}  # --remat: recompute each block in the backward pass (qat's ``remat``)


def measure(name: str, model: VAR, quantizer: nnx.Module, batch: int, k: int, steps: int) -> dict:
    """Runs ``qat:topkld`` for ``2 + steps`` steps and splits its time into compile, steps and setup."""
    labels, inputs = token_map_batch(model, quantizer, batch, seed=0)
    data = CalibrationData(nnx.jit(_logits), [(labels, inputs)], {"source": "random token maps"}, apply=_logits)
    rules = settings.quant_rules(SETTING, FORMAT, var_family.QUANT_PATTERN)
    params = {"steps": 2 + steps, "batch_size": batch, "k": k, "log_every": 1, "lr": 1e-5, "warmup_steps": 1,
              "remat": REMAT["on"]}
    began = time.perf_counter()
    with recorded_training() as results:
        run = run_method(model, rules, "qat:topkld", materialize="fake", params=params, data=data)
    total = time.perf_counter() - began
    history = results[-1].history
    intervals = [1.0 / record["steps_per_s"] for record in history]  # s per logged step
    timed = intervals[2:]  # after compile + step 1 and step 2 (the logger's first, eager, lr-schedule call)
    step_s = sum(timed) / len(timed)
    n_params = sum(int(np.size(x)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    return {"model": name, "params": n_params, "vocab": model.vocab_size, "tokens": model.seq_len, "batch": batch,
            "k": k, "layers": len(run.assignments), "compile_s": intervals[0] - step_s, "steps": len(timed),
            "step_s": step_s, "steps_per_s": 1.0 / step_s, "setup_s": total - results[-1].wall_s,
            "loss_first": history[0]["loss"], "loss_last": history[-1]["loss"]}


def demo_case(member_name: str, batch: int, steps: int) -> dict:
    member = family.load_member(member_name)
    return measure(member_name, member.model, member.tokenizer.quantize, batch, k=16, steps=steps)


def release_case(quick: bool, batch: int, steps: int) -> dict:
    config = configlib.load_config(str(REPO_CONFIGS / "var_d16.py"))
    vq_ctor = model_ctor(config.vqvae)
    var_ctor = var_ctor_kwargs(model_ctor(config.var), vq_ctor)
    name, k = "VAR-d16 (random)", 600
    if quick:
        patch = (1, 2, 3, 4)
        vq_ctor.update(vocab_size=256, z_channels=8, v_patch_nums=patch)
        var_ctor.update(depth=2, embed_dim=64, num_heads=2, patch_nums=patch, vocab_size=256, Cvae=8)
        name, k = "tiny VAR (random, --quick)", 40
    model = random_model(lambda: VAR(**var_ctor, rngs=nnx.Rngs(0)), seed=1)
    return measure(name, model, release_quantizer(vq_ctor, seed=2), batch, k=k, steps=steps)


def table(rows: list[dict]) -> str:
    lines = ["| model | params | V | L | batch | K | quantized layers | compile (s) | step (s) | steps/s "
             "| timed steps | setup (s) | loss first -> last |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | | | | {r['batch']} | | | {r['error']} | | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.2f}M | {r['vocab']} | {r['tokens']} | {r['batch']} | "
                     f"{r['k']} | {r['layers']} | {r['compile_s']:.1f} | {r['step_s']:.3g} | {r['steps_per_s']:.3g} | "
                     f"{r['steps']} | {r['setup_s']:.1f} | {r['loss_first']:.4g} -> {r['loss_last']:.4g} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="var-d1 and a tiny random VAR (checks the script)")
    parser.add_argument("--only", choices=("demo", "release"), help="run one of the two models")
    parser.add_argument("--demo-steps", type=int, default=30, help="timed steps of the demo VAR after the first")
    parser.add_argument("--release-steps", type=int, default=3, help="timed steps of VAR-d16 after the first")
    parser.add_argument("--demo-batch", type=int, default=16)
    parser.add_argument("--release-batch", type=int, default=8)
    parser.add_argument("--remat", action="store_true", help="qat remat=True: recompute blocks in the backward pass")
    args = parser.parse_args()
    REMAT["on"] = args.remat
    load = os.getloadavg()
    print(f"{datetime.datetime.now().isoformat(timespec='seconds')}  host {platform.node()} "
          f"({platform.machine()}, {os.cpu_count()} cores), jax {jax.__version__}, devices {jax.devices()}, "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    rows = []
    if args.only in (None, "demo"):
        rows.append(demo_case("var-d1" if args.quick else "var-d4", 4 if args.quick else args.demo_batch,
                              3 if args.quick else args.demo_steps))
        print(table(rows[-1:]), flush=True)
    if args.only in (None, "release"):
        batch = 4 if args.quick else args.release_batch
        try:
            rows.append(release_case(args.quick, batch, 3 if args.quick else args.release_steps))
        except jax.errors.JaxRuntimeError as e:  # XLA's temporaries of the step do not fit in memory
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            rows.append({"model": "VAR-d16 (random)", "batch": batch, "error": str(e).splitlines()[0]})
    print()
    print(f"qat:topkld train step, {SETTING} {FORMAT} on every transformer linear, float32, "
          f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}, peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    print(table(rows))


if __name__ == "__main__":
    main()
