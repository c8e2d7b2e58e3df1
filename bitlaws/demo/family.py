"""The contract between the demo model families, the demo evaluator and the sweep.

A *member* is one trained model of a family (``var-d2``, ``dit-d4`` ...). The sweep quantizes
``member.model`` (the generator network: VAR transformer / DiT; the tokenizer, VAE and classifier stay in
float, as in the paper) and samples through ``member.sample`` with the quantized copy.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Protocol

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
