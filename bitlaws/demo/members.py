"""Helpers shared by the tokenizer-based demo families (`bitlaws.demo.var_family`, `bitlaws.demo.llamagen_family`).

Finding, checking and loading the shipped checkpoints (members ``<family>-d<N>`` next to their tokenizer in
`CHECKPOINT_ROOT`), the tokenizers' reconstruction metrics, and the calibration batches and protocol sentences of
members teacher-forced on token maps.
"""

from __future__ import annotations

import functools
import json
import pathlib
import re
from typing import Any, Callable, Mapping, Union

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from bitlaws import checkpoint
from bitlaws.demo.family import with_null_labels
from bitlaws.train import TrainResult

CHECKPOINT_ROOT = pathlib.Path(__file__).resolve().parent / "checkpoints"
PathLike = Union[str, pathlib.Path]


def depth_members(family: str, root: PathLike = CHECKPOINT_ROOT) -> list[str]:
    """The members ``<family>-d<N>`` with a saved model in `root`, by N."""
    found = []
    for path in pathlib.Path(root).glob(f"{family}-d*"):
        match = re.fullmatch(rf"{re.escape(family)}-d(\d+)", path.name)
        if match and (path / checkpoint.STATE_DIR).exists():
            found.append((int(match.group(1)), path.name))
    return [name for _, name in sorted(found)]


def member_metadata(name: str, root: PathLike, tokenizer_name: str) -> tuple[dict, dict]:
    """``(bitlaws.json of member `name`, the tokenizer's constructor arguments)`` of a tokenizer-based member.

    Raises:
        ValueError: no such member in `root` (the message lists the members of its family), or the member was
            trained with another tokenizer than ``root/tokenizer_name``.
    """
    directory = pathlib.Path(root) / name
    if not (directory / checkpoint.STATE_DIR).exists():
        family = name.split("-", 1)[0]
        raise ValueError(f"no {family} demo member {name!r} in {root}; available: {depth_members(family, root)}")
    metadata = checkpoint.load_metadata(directory)
    tokenizer_dir = pathlib.Path(root) / tokenizer_name
    tokenizer_ctor = checkpoint.load_metadata(tokenizer_dir)["ctor"]
    if json.dumps(tokenizer_ctor, sort_keys=True) != json.dumps(metadata["tokenizer_ctor"], sort_keys=True):
        raise ValueError(f"{name} was trained with another tokenizer than the one in {tokenizer_dir}")
    return metadata, tokenizer_ctor


@functools.lru_cache(maxsize=8)
def _load_cached(build: Callable[[Mapping[str, Any]], nnx.Module], directory: str) -> nnx.Module:
    ctor = checkpoint.load_metadata(directory)["ctor"]
    return checkpoint.load_model(lambda: build(ctor), directory)


def load_cached(build: Callable[[Mapping[str, Any]], nnx.Module], directory: PathLike) -> nnx.Module:
    """``build(ctor)`` with the weights saved in `directory` (``ctor`` from its ``bitlaws.json``), cached per
    (`build`, directory): the demo tokenizers, shared by all members; treat the result as read-only."""
    return _load_cached(build, str(pathlib.Path(directory).resolve()))


def reconstruction_metrics(recon: np.ndarray, images: np.ndarray, tokens: np.ndarray,
                           vocab_size: int) -> dict[str, float]:
    """``mse``, ``l1`` of ``recon`` vs ``images`` (same shape) and codebook usage of int ``tokens`` (any shape)."""
    counts = np.bincount(tokens.reshape(-1), minlength=vocab_size).astype(np.float64)
    probs = counts / counts.sum()
    entropy = -np.sum(probs[probs > 0] * np.log(probs[probs > 0]))
    return {"mse": float(np.mean(np.square(recon - images))),
            "l1": float(np.mean(np.abs(recon - images))),
            "codes_used": int(np.count_nonzero(counts)),
            "perplexity": float(np.exp(entropy))}


def sampled_calibration_batches(labels: np.ndarray, inputs: jax.Array, num_batches: int, seed: int,
                                null_class: int) -> list[tuple[jax.Array, jax.Array]]:
    """Splits one drawn batch into `num_batches` calibration batches ``(labels [B], inputs [B, ...])``.

    Args:
        labels: ``[num_batches * B]`` int32 labels the inputs were sampled for.
        inputs: ``[num_batches * B, ...]`` teacher-forced inputs (token maps) of the float model's samples.
        num_batches: Batches.
        seed: Seeds (with the batch index) which half of each batch is relabelled as `null_class`.
        null_class: The unconditional label (CFG runs the network on it half of the time).
    """
    batch_size = labels.shape[0] // num_batches
    batches = []
    for index in range(num_batches):
        rows = slice(index * batch_size, (index + 1) * batch_size)
        batch_labels = with_null_labels(labels[rows], null_class, np.random.default_rng([seed, index]))
        batches.append((jnp.asarray(batch_labels), inputs[rows]))
    return batches


def token_calibration_protocol(source: str, sampling: str) -> str:
    """The protocol sentence of a token-based (VAR / LlamaGen) member's calibration `source`; `sampling` names the
    member's sampling settings (``"cfg 1.5, top-k 0"``)."""
    if source == "samples":
        return (f"teacher-forced on token maps of the float model's own samples ({sampling}), labels spread evenly "
                f"over the classes, half of each batch relabelled as the null class")
    return "teacher-forced on token maps of real training digits, half of each batch relabelled as the null class"


# -------------------------------------------------------------------- training and batching helpers

def plain(value: Any) -> Any:
    """ConfigDicts, tuples and numpy scalars -> JSON-friendly python values."""
    if isinstance(value, (ml_collections.ConfigDict, Mapping)):
        return {str(k): plain(v) for k, v in dict(value).items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def batched(fn: Callable[[jax.Array], Any], images: np.ndarray, batch_size: int) -> list[Any]:
    """Applies `fn` to fixed-size chunks (the last one zero-padded, results trimmed) to avoid recompiling."""
    outputs = []
    for start in range(0, images.shape[0], batch_size):
        chunk = images[start:start + batch_size]
        count = chunk.shape[0]
        if count < batch_size:
            chunk = np.concatenate([chunk, np.zeros((batch_size - count,) + chunk.shape[1:], chunk.dtype)])
        result = fn(jnp.asarray(chunk))
        outputs.append(jax.tree.map(lambda a, n=count: np.asarray(a)[:n], result))
    return outputs


def train_summary(result: TrainResult) -> dict[str, Any]:
    """The ``train`` entry of a summary: start step, steps, wall time (all sessions), recent mean metrics."""
    return {"start_step": result.start_step, "steps": result.step, "wall_s": result.wall_s, "metrics": result.metrics}


def step_rng(seed: int, step: int) -> np.random.Generator:
    """The numpy generator of training step `step` (>= -1; -1 is for set-up draws)."""
    return np.random.default_rng([seed, step + 1])


def train_command(config: ml_collections.ConfigDict) -> str:
    return str(config.get("command", f"bitlaws train --config configs/demo/{config.family}.py"))
