"""The ``demo`` sweep evaluator: quantize a demo member, sample digits, score them with the DFD.

For a cell (model, setting, format, method, seed) it loads the member (cached), builds the setting's rules
for the member's quantized layers, applies the method, draws ``n_per_class`` class-conditional samples per
digit with a key derived from ``Cell.model_seed`` (so every precision of a model sees the same labels and
noise), and records:

* ``fid``: the **Digits Fréchet Distance** (DFD) — the Fréchet distance between the samples and the data in
  the penultimate features of the shipped digits classifier, computed by the same code path as the real FID
  (`bitlaws.eval`). It is an FID *analogue*, not an FID; ``metric_name`` says so in every record;
* ``accuracy``: how often the classifier assigns a sample to its conditioning digit;
* ``mt_bits`` / ``ct_bits`` / ``params`` / ``storage_bytes`` of the quantized network (`bit_accounting`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import ml_collections
import numpy as np

from bitlaws.demo import dit_family, family, metric, var_family  # noqa: F401  (registers the families)
from bitlaws.quant import bit_accounting
from bitlaws.sweep import runner, settings
from bitlaws.sweep.grid import Cell

METRIC_NAME = "DFD (Frechet distance in digits-classifier features; the demo's FID analogue, not FID)"
NUM_CLASSES = 10


def make_evaluator(config: ml_collections.ConfigDict):
    """Returns ``evaluate(cell) -> metrics`` for a demo sweep config (block ``config.demo``)."""
    n_per_class = int(config.demo.n_per_class)
    reference_split = str(config.demo.get("reference_split", "all"))
    options = settings.quant_options(config)
    load = functools.lru_cache(maxsize=None)(family.load_member)

    def evaluate(cell: Cell) -> dict[str, Any]:
        member = load(cell.model)
        rules = cell.rules(member.quant_pattern, **options)
        quantized = settings.quantize_for_cell(
            member.model, rules, cell.method,
            settings.MethodContext(params=cell.params, seed=cell.prng_seed))
        labels = np.repeat(np.arange(NUM_CLASSES, dtype=np.int32), n_per_class)
        images = np.asarray(member.sample(quantized, labels, jax.random.key(cell.model_seed)))
        scores = metric.evaluate_samples(np.clip(images, -1.0, 1.0), labels, reference_split=reference_split)
        report = bit_accounting(member.model, rules)
        return dict(fid=float(scores["dfd"]), accuracy=float(scores["accuracy"]), n_samples=int(scores["n"]),
                    metric_name=METRIC_NAME, family=member.family, n_params=int(report.total_params),
                    mt_bits=int(report.mt_bits), ct_bits=int(report.ct_bits),
                    storage_bytes=int(report.storage_bytes))

    return evaluate


runner.register_evaluator("demo", make_evaluator)
