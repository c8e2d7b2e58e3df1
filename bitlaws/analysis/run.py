"""The ``bitlaws analyze`` jobs: run an analysis on several models, write JSON + PNG + SVG, summarise in markdown.

Every job writes into one folder (default ``runs/demo/analysis``, inside the demo sweep's folder so that
``bitlaws report --results runs/demo`` links it):

=============================  ==============================================================================
file                           content
=============================  ==============================================================================
``errors.json``                `bitlaws.analysis.errors.run_errors` record per model (+ ``errors.{png,svg}``)
``noise.json``                 ``single_step`` and ``accumulation`` records per model
                               (+ ``noise_single_step.{png,svg}``, ``noise_accumulation.{png,svg}``)
``activations.json``           `bitlaws.analysis.activations.run_activations` record per model
                               (+ ``activations_<model>.{png,svg}``)
``analysis.md``                what every present JSON says, in sentences, against the paper's numbers
=============================  ==============================================================================
"""

from __future__ import annotations

import datetime
import json
import math
import pathlib
from typing import Any, Optional, Sequence, Union

from bitlaws.analysis import activations, errors, figures, noise
from bitlaws.analysis.summary import write_summary
from bitlaws.analysis.subjects import Precision, Subject, demo_subject, ported_dit, ported_var

DEFAULT_MODELS = ("var-d4", "dit-d4")
DEFAULT_OUT = "runs/demo/analysis"
PathLike = Union[str, pathlib.Path]


def load_subjects(models: Sequence[str] = (), *, var_dirs: Optional[Sequence[str]] = None,
                  dit_dirs: Optional[Sequence[str]] = None, dit_respacing: Optional[str] = None) -> list[Subject]:
    """Demo members by name, plus ported models given as ``(model folder, tokenizer/VAE folder)`` pairs.

    Args:
        models: Demo member names (``var-d4`` ...).
        var_dirs: ``(var folder, vqvae folder)`` of a ported VAR, or None.
        dit_dirs: ``(dit folder, vae folder)`` of a ported DiT, or None.
        dit_respacing: Fewer steps for quick runs: the DDIM respacing of demo DiTs (``"ddim10"``) and the
            respacing of a ported DiT's DDPM sampler (``"25"``; default ``"250"``, the paper's protocol).

    Raises:
        ValueError: nothing to analyse, or an unknown member.
    """
    subjects = [demo_subject(name, respacing=dit_respacing if name.startswith("dit-") else None)
                for name in models]
    if var_dirs:
        subjects.append(ported_var(*var_dirs))
    if dit_dirs:
        sampling = None if dit_respacing is None else {"timestep_respacing": dit_respacing.removeprefix("ddim")}
        subjects.append(ported_dit(*dit_dirs, sampling=sampling))
    if not subjects:
        raise ValueError("nothing to analyse: name demo models (--models var-d4,dit-d4) or ported folders")
    return subjects


def _write(out_dir: pathlib.Path, name: str, payload: dict[str, Any]) -> pathlib.Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **payload}
    path = out_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1, allow_nan=False) + "\n")
    tmp.replace(path)
    return path


def analyze_errors(subjects: Sequence[Subject], out_dir: PathLike, *, precision: Precision = Precision(),
                   n: int = 20, seed: int = 0, command: str = "") -> list[pathlib.Path]:
    """``errors.json`` + ``errors.{png,svg}`` (+ the summary); returns the written paths."""
    out_dir = pathlib.Path(out_dir)
    records = [errors.run_errors(subject, precision, n=n, seed=seed) for subject in subjects]
    paths = [_write(out_dir, "errors", {"command": command, "records": records})]
    paths += figures.plot_errors(records, out_dir)
    return paths + [write_summary(out_dir)]


def analyze_noise(subjects: Sequence[Subject], out_dir: PathLike, *, snrs: Sequence[float] = noise.DEFAULT_SNRS,
                  step: Optional[int] = None,
                  accumulation_snrs: Sequence[float] = noise.DEFAULT_ACCUMULATION_SNRS,
                  fraction: float = noise.DEFAULT_FRACTION, n: int = 20, seed: int = 0,
                  command: str = "") -> list[pathlib.Path]:
    """``noise.json`` + its two figures (+ the summary). The single-step sweep always includes +inf dB."""
    out_dir = pathlib.Path(out_dir)
    snrs = list(dict.fromkeys([float(s) for s in snrs] + [math.inf]))
    single, accumulated = [], []
    for subject in subjects:
        reference = noise.noise_free_run(subject, n, seed)  # shared by both experiments
        single.append(noise.single_step(subject, snrs=snrs, step=step, n=n, seed=seed, reference=reference))
        accumulated.append(noise.accumulation(subject, snrs=accumulation_snrs, fraction=fraction, n=n, seed=seed,
                                              reference=reference))
    paths = [_write(out_dir, "noise", {"command": command, "single_step": single, "accumulation": accumulated})]
    paths += figures.plot_noise(single, accumulated, out_dir)
    return paths + [write_summary(out_dir)]


def analyze_activations(subjects: Sequence[Subject], out_dir: PathLike, *,
                        blocks: Sequence[int] = activations.DEFAULT_BLOCKS,
                        kinds: Sequence[str] = ("fc1", "qkv", "fc2"), n: int = 8, seed: int = 0,
                        command: str = "") -> list[pathlib.Path]:
    """``activations.json`` + one figure per model (+ the summary)."""
    out_dir = pathlib.Path(out_dir)
    records = [activations.run_activations(s, blocks=blocks, kinds=kinds, n=n, seed=seed) for s in subjects]
    paths = [_write(out_dir, "activations", {"command": command, "records": records})]
    for record in records:
        paths += figures.plot_activations(record, out_dir)
    return paths + [write_summary(out_dir)]
