"""Parity check of LlamaGen's GPT with grouped-query attention against the ``llamagen_gpt_gqa`` fixture.

Same model as ``llamagen_gpt`` with ``n_kv_head < n_head`` (from the manifest's constructor); weights
regenerated from ``llamagen_gpt_gqa_weights_manifest.json``. Compares the teacher-forced ``tf.logits`` and
``tf.logits_null`` (upstream's ``generate()`` cannot run GQA, so the fixture has no sampling records).
"""

from __future__ import annotations

import pathlib

from bitlaws.port.checks.llamagen_gpt import load_fixture, teacher_forcing
from bitlaws.port.verify import Comparison

FIXTURE = "llamagen_gpt_gqa"


def check(folder: pathlib.Path, manifest: dict) -> list[Comparison]:
    """Runs the GQA fixture's teacher-forcing calls and compares the stored logits.

    Args:
        folder: Fixture folder.
        manifest: Its parsed ``manifest.json``.

    Returns:
        One `Comparison` per compared array present in the io file.
    """
    _, model, io, labels = load_fixture(folder, manifest, FIXTURE)
    return teacher_forcing(FIXTURE, model, io, labels)
