"""The contract between the demo model families, the demo evaluator and the sweep.

A *member* is one trained model of a family (``var-d2``, ``dit-d4`` ...). The sweep quantizes
``member.model`` (the generator network: VAR transformer / DiT; the tokenizer, VAE and classifier stay in
float, as in the paper) and samples through ``member.sample`` with the quantized copy.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol

import jax
import numpy as np
from flax import nnx


class DemoMember(Protocol):
    """One trained demo model."""

    name: str  # e.g. "var-d4"
    family: str  # "var" or "dit"
    model: nnx.Module  # the network that gets quantized (QLinear/QConv inside)
    quant_pattern: str  # module-path regex of the layers the paper quantizes

    def sample(self, model: nnx.Module, labels: np.ndarray, key: jax.Array) -> np.ndarray:
        """Class-conditional samples ``[B, 16, 16, 3]`` float32 in [-1, 1] drawn with `model` (maybe quantized)."""

    def calibration_batches(self, num_batches: int, batch_size: int, seed: int) -> list[Any]:
        """Deterministic calibration inputs of `model` built from real training digits (see `calibration_digits`)."""

    def calibration_forward(self, model: nnx.Module, batch: Any) -> Any:
        """Runs `model` (a ``calibrate``-mode copy) on one calibration batch; its statistics are the side effect."""


@dataclasses.dataclass(frozen=True)
class FamilyEntry:
    names: Callable[[], list[str]]
    load: Callable[[str], DemoMember]


_FAMILIES: dict[str, FamilyEntry] = {}


def register_family(family: str, names: Callable[[], list[str]], load: Callable[[str], DemoMember]) -> None:
    """Registers a family: `names()` lists its members, `load(name)` returns one."""
    _FAMILIES[family] = FamilyEntry(names, load)


def families() -> list[str]:
    return sorted(_FAMILIES)


def member_names(family: str) -> list[str]:
    """The shipped members of `family` (``"var"`` / ``"dit"``), smallest first."""
    if family not in _FAMILIES:
        raise ValueError(f"unknown demo family {family!r}; registered: {families()}")
    return list(_FAMILIES[family].names())


def load_member(name: str) -> DemoMember:
    """Loads ``<family>-<member>`` (e.g. ``var-d4``) from the shipped checkpoints."""
    family = name.split("-", 1)[0]
    if family not in _FAMILIES:
        raise ValueError(f"unknown demo family {family!r} in {name!r}; registered: {families()}")
    return _FAMILIES[family].load(name)


def calibration_digits(num_batches: int, batch_size: int, seed: int, null_class: int,
                       null_fraction: float = 0.5) -> list[tuple[np.ndarray, np.ndarray, np.random.Generator]]:
    """Batches of real training digits for PTQ calibration, the same for every precision of a member.

    A share `null_fraction` of the labels is replaced by `null_class`, because CFG sampling runs the network on the
    null class half of the time (VAR and DiT both double the batch); calibration statistics should see both.

    Returns:
        ``num_batches`` tuples ``(images [B, 16, 16, 3] float32 in [-1, 1], labels [B] int32, rng)``; the rng
        (seeded from `seed` and the batch index) draws anything else the family needs (timesteps, noise).
    """
    from bitlaws.demo.data import load_digits  # pylint: disable=g-import-not-at-top  (keeps this module light)

    if num_batches < 1 or batch_size < 1:
        raise ValueError(f"calibration needs num_batches >= 1 and batch_size >= 1, got {num_batches}, {batch_size}")
    data = load_digits("train")
    batches = []
    for index in range(num_batches):
        rng = np.random.default_rng([seed, index])
        rows = rng.choice(len(data), batch_size, replace=batch_size > len(data))
        labels = np.where(rng.random(batch_size) < null_fraction, null_class, data.labels[rows]).astype(np.int32)
        batches.append((data.images[rows], labels, rng))
    return batches

