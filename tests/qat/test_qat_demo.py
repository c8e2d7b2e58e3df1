"""QAT on a shipped demo VAR: a short TopKLD run at W3A16 beats RTN W3A16 in distillation loss and in DFD."""

import functools

import jax
import numpy as np
import pytest

from bitlaws.demo import family, metric
from bitlaws.demo import evaluate  # noqa: F401  (registers the demo families)
from bitlaws.qat import losses
from bitlaws.quant import apply_method, materialize_result, run_method
from bitlaws.sweep.grid import Cell

MEMBER = "var-d2"
K = 16


@pytest.mark.slow
def test_short_topkld_run_beats_rtn_at_w3a16():
    member = family.load_member(MEMBER)
    data = family.calibration_data(member, {"source": "samples", "num_batches": 4, "batch_size": 32, "seed": 0})
    held_out = family.calibration_data(member, {"source": "samples", "num_batches": 1, "batch_size": 64, "seed": 1})
    rules = Cell(MEMBER, "W3A16", "int", "rtn", 0).rules(member.quant_pattern)
    rtn = apply_method(member.model, rules, "rtn", materialize="baked")
    run = run_method(member.model, rules, "qat:topkld", materialize="baked", data=data,
                     params={"steps": 100, "lr": 1e-3, "batch_size": 16, "k": K, "log_every": 10})
    qat = materialize_result(member.model, run.assignments, run.result, "baked", run.stats)
    info = run.result.info["qat"]
    assert info["loss_last"] < 0.5 * info["loss_first"]

    loss = functools.partial(losses.topkld, k=K)
    teacher = [held_out.forward(member.model, batch) for batch in held_out.batches]

    def held_out_loss(model):
        return float(np.mean([loss(held_out.forward(model, b), t) for b, t in zip(held_out.batches, teacher)]))

    assert held_out_loss(qat) < 0.7 * held_out_loss(rtn)

    labels = np.repeat(np.arange(10, dtype=np.int32), 20)
    key = jax.random.key(Cell(MEMBER, "W16A16", "none", "none", 0).model_seed)

    def dfd(model):
        images = np.clip(np.asarray(member.sample(model, labels, key)), -1.0, 1.0)
        return metric.evaluate_samples(images, labels, reference_split="all")["dfd"]

    rtn_dfd, qat_dfd = dfd(rtn), dfd(qat)
    assert qat_dfd < 0.85 * rtn_dfd, (rtn_dfd, qat_dfd)
