"""The contract between the demo model families, the demo evaluator and the sweep.

A *member* is one trained model of a family (``var-d2``, ``dit-d4`` ...). The sweep quantizes
``member.model`` (the generator network: VAR transformer / DiT; the tokenizer, VAE and classifier stay in
float, as in the paper) and samples through ``member.sample`` with the quantized copy.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Protocol

import jax
import numpy as np
from flax import nnx

from bitlaws.quant.methods import CalibrationData

# Where PTQ calibration inputs come from: ``samples`` (the paper's protocol: the float model's own samples, labels
# spread over the classes) or ``data`` (real training digits).
CALIBRATION_SOURCES = ("samples", "data")
DEFAULT_CALIBRATION = {"source": "samples", "num_batches": 4, "batch_size": 32, "seed": 0}


class DemoMember(Protocol):
    """One trained demo model."""

    name: str  # e.g. "var-d4"
    family: str  # "var" or "dit"
    model: nnx.Module  # the network that gets quantized (QLinear/QConv inside)
    quant_pattern: str  # module-path regex of the layers the paper quantizes

    def sample(self, model: nnx.Module, labels: np.ndarray, key: jax.Array) -> np.ndarray:
        """Class-conditional samples ``[B, 16, 16, 3]`` float32 in [-1, 1] drawn with `model` (maybe quantized)."""

    def calibration_batches(self, num_batches: int, batch_size: int, seed: int, source: str = "data") -> list[Any]:
        """Deterministic calibration inputs of `model` from `source` (`CALIBRATION_SOURCES`)."""

    def calibration_protocol(self, source: str) -> str:
        """One sentence saying what the calibration inputs of `source` are (for records)."""

    def calibration_forward(self, model: nnx.Module, batch: Any) -> Any:
        """Runs `model` (a ``calibrate``-mode copy) on one calibration batch; its statistics are the side effect."""

    def calibration_apply(self, model: nnx.Module, batch: Any) -> Any:
        """`calibration_forward` without `nnx.jit`: the model's output, traceable inside a compiled step (QAT)."""


@dataclasses.dataclass(frozen=True)
class FamilyEntry:
    names: Callable[[], list[str]]
    load: Callable[[str], DemoMember]


_FAMILIES: dict[str, FamilyEntry] = {}


def register_family(family: str, names: Callable[[], list[str]], load: Callable[[str], DemoMember]) -> None:
    """Registers a family: `names()` lists its members, `load(name)` returns one."""
    _FAMILIES[family] = FamilyEntry(names, load)


# The shipped families register themselves when their module is imported; the lookups below import them on first
# use, so ``family.load_member("var-d2")`` works without importing `bitlaws.demo.var_family` first.
SHIPPED_FAMILY_MODULES = ("bitlaws.demo.var_family", "bitlaws.demo.dit_family", "bitlaws.demo.llamagen_family",
                          "bitlaws.demo.mar_family")


def _import_shipped() -> None:
    import importlib  # pylint: disable=g-import-not-at-top

    for module in SHIPPED_FAMILY_MODULES:
        importlib.import_module(module)


def families() -> list[str]:
    _import_shipped()
    return sorted(_FAMILIES)


def member_names(family: str) -> list[str]:
    """The shipped members of `family` (``"var"`` / ``"dit"``), smallest first."""
    _import_shipped()
    if family not in _FAMILIES:
        raise ValueError(f"unknown demo family {family!r}; registered: {families()}")
    return list(_FAMILIES[family].names())


def load_member(name: str) -> DemoMember:
    """Loads ``<family>-<member>`` (e.g. ``var-d4``) from the shipped checkpoints."""
    family = name.split("-", 1)[0]
    _import_shipped()
    if family not in _FAMILIES:
        raise ValueError(f"unknown demo family {family!r} in {name!r}; registered: {families()}")
    return _FAMILIES[family].load(name)


def calibration_options(options: Any = None, family: Optional[str] = None) -> dict[str, Any]:
    """`DEFAULT_CALIBRATION` overridden by `options` (a mapping), validated.

    ``options["by_family"]`` (optional) maps a family name to overrides for its members only, e.g.
    ``{"dit": {"source": "data"}}`` (QAT distils DiT at ``q_sample`` timesteps of real digits); they apply when
    `family` is given.

    Raises:
        ValueError: unknown option names or source, non-positive sizes.
    """
    options = dict(options or {})
    by_family = dict(options.pop("by_family", None) or {})
    for name, overrides in by_family.items():
        if not hasattr(overrides, "keys"):
            raise ValueError(f"calibration options: by_family[{name!r}] must be a mapping, got {overrides!r}")
    valid = sorted(DEFAULT_CALIBRATION) + ["by_family"]
    unknown = sorted(set(options) - set(DEFAULT_CALIBRATION)) + sorted(
        f"by_family.{name}.{key}" for name, overrides in by_family.items() for key in overrides
        if key not in DEFAULT_CALIBRATION)
    if unknown:
        raise ValueError(f"calibration options: unknown field(s) {unknown}; valid: {valid}")
    options = {**DEFAULT_CALIBRATION, **options, **dict(by_family.get(family, None) or {})}
    source = str(options["source"])
    if source not in CALIBRATION_SOURCES:
        raise ValueError(f"calibration source must be one of {CALIBRATION_SOURCES}, got {source!r}")
    num_batches, batch_size, seed = int(options["num_batches"]), int(options["batch_size"]), int(options["seed"])
    if num_batches < 1 or batch_size < 1:
        raise ValueError(f"calibration needs num_batches >= 1 and batch_size >= 1, got {num_batches}, {batch_size}")
    return {"source": source, "num_batches": num_batches, "batch_size": batch_size, "seed": seed}


def calibration_data(member: DemoMember, options: Any = None) -> CalibrationData:
    """The PTQ calibration (and QAT training) data of `member` for `options` (see `calibration_options`).

    The batches are computed once here (sampling the float model for ``source="samples"``); the description
    (source, sizes, seed, protocol sentence) goes into every sweep record and quantized checkpoint.
    """
    options = calibration_options(options, member.family)
    source, num_batches, batch_size, seed = (options[k] for k in ("source", "num_batches", "batch_size", "seed"))
    batches = member.calibration_batches(num_batches, batch_size, seed, source=source)
    description = {"source": source, "num_batches": num_batches, "batch_size": batch_size, "seed": seed,
                   "protocol": member.calibration_protocol(source)}
    return CalibrationData(member.calibration_forward, batches, description, apply=member.calibration_apply)


def spread_labels(n: int, num_classes: int, seed: int) -> np.ndarray:
    """``[n]`` int32 labels covering the classes as evenly as possible (counts differ by at most one), shuffled."""
    labels = np.arange(n, dtype=np.int32) % num_classes
    return np.random.default_rng([seed, 1]).permutation(labels).astype(np.int32)


def with_null_labels(labels: np.ndarray, null_class: int, rng: np.random.Generator,
                     null_fraction: float = 0.5) -> np.ndarray:
    """`labels` with a share `null_fraction` replaced by `null_class` (CFG runs the network on both)."""
    return np.where(rng.random(labels.shape[0]) < null_fraction, null_class, labels).astype(np.int32)


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
        labels = with_null_labels(data.labels[rows], null_class, rng, null_fraction)
        batches.append((data.images[rows], labels, rng))
    return batches

