"""Training and export of a demo model on the digits with `bitlaws.train` (shared by the DiT and MAR families).

A family supplies the model, its loss and its validation; this module draws the batches (epochs of seeded
permutations, a pure function of the step, so a resumed run equals an uninterrupted one), runs the one training
loop, exports the EMA weights with `bitlaws.checkpoint.save_model` and writes the summary. Layout of ``out_dir``:
``train_state/`` (orbax: params, EMA, optimizer state and step; resumed from when present), ``metrics.jsonl``,
``model/`` (what ships as ``bitlaws/demo/checkpoints/<name>/``) and ``summary.json``.
"""

from __future__ import annotations

import json
import pathlib
import shlex
import time
from typing import Any, Callable, Optional, Union

import jax
import ml_collections
import numpy as np
from flax import nnx

from bitlaws.checkpoint import save_model
from bitlaws.demo.data import load_digits
from bitlaws.train import STATE_DIR, TrainConfig, train_module

MODEL_DIR = "model"
SUMMARY_FILE = "summary.json"
TRAIN_KEYS_NOT_IN_LOOP = ("batch_size", "val_eval")
"""Keys of a config's ``train`` block that `bitlaws.train.TrainConfig` does not take."""


def batch_indices(num_examples: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """Indices of the batch at `step`: epochs of seeded permutations (a pure function of the step)."""
    per_epoch = num_examples // batch_size
    epoch, offset = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(num_examples)
    return order[offset * batch_size:(offset + 1) * batch_size]


def train_digits_model(config: ml_collections.ConfigDict, out_dir: Union[str, pathlib.Path], model: nnx.Module,
                       loss_fn: Callable, evaluate_val: Callable[[nnx.Module, np.ndarray, np.ndarray], dict], *,
                       summary_extra: Optional[dict[str, Any]] = None,
                       metadata_extra: Optional[dict[str, Any]] = None, progress: bool = True,
                       command: str = "") -> dict[str, Any]:
    """Trains `model` (in place) on the train digits, exports its EMA and returns the summary.

    Args:
        config: The family config (``family``, ``name``, ``model``, ``train``, ``sampling``).
        out_dir: Output folder.
        model: The initialised model.
        loss_fn: ``loss_fn(model, (images, labels), key) -> (loss, metrics)`` with ``loss``, ``mse``, ``vb``.
        evaluate_val: ``evaluate_val(model, images, labels) -> {name: float}`` (the EMA model on the val split).
        summary_extra: More summary entries (e.g. the validation draws).
        metadata_extra: More ``bitlaws.json`` entries.
        progress: Show a tqdm progress bar.
        command: The command line to record.

    Returns:
        The summary: name, family, params, steps, resumed_from, wall_s (this run), train losses (mean of the
        logged steps among the last 100 of this run), val losses of the EMA model, command and paths.
    """
    start_time = time.perf_counter()
    out_dir = pathlib.Path(out_dir)
    train = config.train
    data = load_digits("train")
    batch_size = min(train.batch_size, len(data))

    def get_batch(step: int) -> tuple[np.ndarray, np.ndarray]:
        index = batch_indices(len(data), batch_size, step, train.seed)
        return data.images[index], data.labels[index]

    result = train_module(model, loss_fn, get_batch, TrainConfig.from_config(train, ignore=TRAIN_KEYS_NOT_IN_LOOP),
                          out_dir=out_dir, progress=progress, desc=config.name)
    nnx.update(model, result.ema)  # the exported model is the EMA (the raw weights stay in train_state)
    recent = [r for r in result.history if r["step"] > result.step - 100]
    val = load_digits("val")
    val_losses = evaluate_val(model, val.images, val.labels) if train.get("val_eval", True) else {}
    params = int(sum(np.size(leaf) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))))
    summary = {
        "name": config.name,
        "family": config.family,
        "params": params,
        "steps": result.step,
        "resumed_from": result.start_step,
        "wall_s": round(time.perf_counter() - start_time, 1),
        "train_losses": {name: float(np.mean([r[name] for r in recent])) for name in ("loss", "mse", "vb")}
        if recent else {},
        "val_losses_ema": val_losses,
        **(summary_extra or {}),
        "command": command or str(config.get("command", "")),
    }
    metadata = {"family": config.family, "name": config.name, "model": config.model.to_dict(),
                **(metadata_extra or {}), "sampling": config.sampling.to_dict(),
                "training": {**summary, "config": train.to_dict()}}
    save_model(model, out_dir / MODEL_DIR, metadata)
    summary["model_dir"] = str((out_dir / MODEL_DIR).resolve())
    summary["train_state_dir"] = str((out_dir / STATE_DIR).resolve())
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True))
    return summary


def train_from_config_path(train_from_config: Callable[..., dict[str, Any]], config_spec: str,
                           out_dir: Optional[Union[str, pathlib.Path]] = None, *, overrides: tuple[str, ...] = (),
                           progress: bool = True) -> dict[str, Any]:
    """Loads ``"configs/demo/<family>.py:depth=4"`` and calls the family's `train_from_config` on it.

    Args:
        train_from_config: ``fn(config, out_dir, *, progress, command) -> summary``.
        config_spec: Config file and argument.
        out_dir: Output folder (default ``runs/train/<name>``).
        overrides: ``key.sub=value`` config overrides.
        progress: Show a progress bar.

    Returns:
        The training summary.
    """
    from bitlaws.configlib import load_config  # pylint: disable=g-import-not-at-top

    config = load_config(config_spec, overrides)
    out_dir = pathlib.Path(out_dir) if out_dir is not None else pathlib.Path("runs/train") / config.name
    command = " ".join(["bitlaws train --config", shlex.quote(config_spec),
                        *[f"--set {shlex.quote(o)}" for o in overrides], "--out", shlex.quote(str(out_dir))])
    return train_from_config(config, out_dir, progress=progress, command=command)
