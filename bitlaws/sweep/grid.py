"""Sweep cells and grid expansion.

A sweep config (ml-collections) names the grid::

    config.models = ("var-d2", "var-d4")          # evaluator-specific model names
    config.settings = ("W16A16", "W4A16", "W8A8")  # any W<w>A<a>
    config.formats = ("int", "fp")                 # format families (see `settings`)
    config.methods = ("rtn",)                      # names in the sweep method registry
    config.seeds = (0,)
    config.method_params = {"gptq": {"damp": 0.01}}  # optional: one dict, or a list of dicts to sweep
    config.method_settings = {"smoothquant": ("W8A8", "W4A8")}  # optional: where a method runs (default: all)
    config.method_models = {"qat:topkld": ("var-d2",)}  # optional: on which models a method runs (default: all)
    config.imports = ("my_methods",)               # optional: modules registering custom methods

Expansion order is models × settings × formats × methods × params × seeds (outer to inner), duplicates
removed keeping the first occurrence. ``W16A16`` becomes one float-baseline cell per model and seed
(format ``none``, method ``none``) whatever the formats and methods. Pairs with no concrete format (W3
with ``fp``) are left out and reported in `GridExpansion.skipped`.

Seeds: `Cell.prng_seed` is the first 4 bytes (little endian) of SHA-256 of the cell key, masked to 31
bits. The key contains ``s<seed>``, so the PRNG seed depends on the config seed and on every other
coordinate of the cell, and is the same on every machine and every run. `Cell.model_seed` hashes only
``<model>|s<seed>``: evaluators that want common random numbers across precisions (same labels and noise
for W16A16 and W4A16, which makes FID differences less noisy) use it instead.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Iterator, Mapping, Optional, Sequence

import ml_collections

from bitlaws.sweep import settings as settings_lib

_KEY_SEPARATOR = "|"


def _stable_seed(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") & 0x7FFFFFFF


class FrozenParams(Mapping[str, Any]):
    """An immutable, hashable mapping of method hyper-parameters (JSON-serialisable values)."""

    def __init__(self, items: Optional[Mapping[str, Any]] = None):
        self._items = dict(sorted((items or {}).items()))
        self._text = ",".join(f"{k}={json.dumps(v, sort_keys=True)}" for k, v in self._items.items())

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(self._text)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self._items) == dict(other)

    def __repr__(self) -> str:
        return f"FrozenParams({self._items!r})"

    @property
    def text(self) -> str:
        """``k=v,k2=v2`` with JSON values, keys sorted ('' when empty)."""
        return self._text


@dataclasses.dataclass(frozen=True)
class Cell:
    """One point of the sweep grid.

    Attributes:
        model: Evaluator-specific model name, e.g. ``var-d4``.
        setting: Precision setting, canonical ``W<w>A<a>``.
        format: Format family ``int`` / ``fp``, or ``none`` for W16A16.
        method: Sweep method name (``none`` for W16A16).
        seed: The config seed.
        params: Method hyper-parameters.
    """

    model: str
    setting: str
    format: str
    method: str
    seed: int
    params: Mapping[str, Any] = dataclasses.field(default_factory=FrozenParams)

    def __post_init__(self):
        if not isinstance(self.params, FrozenParams):
            object.__setattr__(self, "params", FrozenParams(self.params))
        for name in ("model", "setting", "format", "method"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value or _KEY_SEPARATOR in value:
                raise ValueError(f"Cell.{name} must be a non-empty string without '|', got {value!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"Cell.seed must be a non-negative integer, got {self.seed!r}")

    @property
    def method_label(self) -> str:
        """``rtn``, or ``gptq[damp=0.01]`` when the cell has hyper-parameters."""
        return f"{self.method}[{self.params.text}]" if self.params else self.method

    @property
    def key(self) -> str:
        """Stable human-readable identity, e.g. ``var-d4|W4A16|int|rtn|s0``."""
        return _KEY_SEPARATOR.join((self.model, self.setting, self.format, self.method_label, f"s{self.seed}"))

    @property
    def prng_seed(self) -> int:
        """31-bit seed from SHA-256 of `key` (see the module docstring)."""
        return _stable_seed(self.key)

    @property
    def model_seed(self) -> int:
        """31-bit seed from SHA-256 of ``<model>|s<seed>``: shared by all precisions of a model."""
        return _stable_seed(f"{self.model}{_KEY_SEPARATOR}s{self.seed}")

    def rules(self, module_path: str, **quant_options) -> list:
        """The cell's `QuantRule` list for layers matching `module_path` (see `settings.quant_rules`)."""
        return settings_lib.quant_rules(self.setting, self.format, module_path, **quant_options)


@dataclasses.dataclass(frozen=True)
class GridExpansion:
    """Result of expanding a sweep config.

    Attributes:
        cells: The cells to evaluate, in grid order, unique.
        skipped: ``(description, reason)`` for every (model, setting, format) combination left out.
    """

    cells: list[Cell]
    skipped: list[tuple[str, str]]


def _names(config: ml_collections.ConfigDict, field: str) -> list[str]:
    """A list field of the config; a comma-separated string is accepted too (handy with ``--set``)."""
    if field not in config:
        raise ValueError(f"sweep config has no field {field!r}")
    value = config[field]
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    value = list(value)
    if not value:
        raise ValueError(f"sweep config field {field!r} is empty")
    return value


def _seeds(config: ml_collections.ConfigDict) -> list[int]:
    seeds = []
    for seed in _names(config, "seeds"):
        try:
            seeds.append(int(seed))
        except (TypeError, ValueError) as e:
            raise ValueError(f"sweep config seeds must be integers, got {seed!r}") from e
    return seeds


def _param_sets(config: ml_collections.ConfigDict, method: str) -> list[FrozenParams]:
    table = config.get("method_params", None) or {}
    if hasattr(table, "to_dict"):
        table = table.to_dict()
    entry = table.get(method)
    if entry is None:
        return [FrozenParams()]
    if isinstance(entry, Mapping) or hasattr(entry, "to_dict"):
        entry = [entry]
    return [FrozenParams(e.to_dict() if hasattr(e, "to_dict") else e) for e in entry]


def _validate_methods(methods: Sequence[str]) -> None:
    for method in methods:
        kind = settings_lib.get_method(method).kind  # raises ValueError listing registered names
        if kind == "float":
            raise ValueError(f"method {method!r} is the float baseline: list 'W16A16' in settings instead")


def _method_restriction(config: ml_collections.ConfigDict, field: str, methods: Sequence[str],
                        names_of) -> dict[str, set[str]]:
    """``config.<field>`` as ``{method: set(names_of(method, names))}``; methods absent from it are unrestricted.

    Raises:
        ValueError: a method that is not in ``config.methods``, or what `names_of` raises for its names.
    """
    block = config.get(field, None) if hasattr(config, "get") else None
    if not block:
        return {}
    result = {}
    for method, names in dict(block).items():
        if method not in methods:
            raise ValueError(f"config.{field} names method {method!r}, which is not in config.methods "
                             f"{list(methods)}")
        result[method] = set(names_of(method, (names,) if isinstance(names, str) else tuple(names)))
    return result


def _method_settings(config: ml_collections.ConfigDict, methods: Sequence[str]) -> dict[str, set[str]]:
    """``config.method_settings`` as ``{method: {setting names}}`` (methods absent from it run everywhere).

    Raises:
        ValueError: a method that is not in ``config.methods`` or a malformed setting name.
    """
    return _method_restriction(config, "method_settings", methods,
                               lambda method, names: [settings_lib.parse_setting(name).name for name in names])


def _method_models(config: ml_collections.ConfigDict, methods: Sequence[str],
                   models: Sequence[str]) -> dict[str, set[str]]:
    """``config.method_models`` as ``{method: {model names}}`` (methods absent from it run on every model).

    Raises:
        ValueError: a method not in ``config.methods`` or a model not in ``config.models``.
    """

    def known_models(method: str, names: tuple) -> tuple:
        unknown = [name for name in names if name not in models]
        if unknown:
            raise ValueError(f"config.method_models[{method!r}] names model(s) {unknown} not in config.models")
        return names

    return _method_restriction(config, "method_models", methods, known_models)


def expand_grid_report(config: ml_collections.ConfigDict) -> GridExpansion:
    """Expands `config` into cells and the reasons for every combination left out.

    The modules the config names (``config.imports``, ``config.evaluator_module``) are imported first, so
    methods they register are known when method names are validated (`settings.import_modules`).

    Raises:
        ValueError: empty or missing fields, malformed settings, unknown format families, unknown methods.
        ImportError: a module in ``config.imports`` or ``config.evaluator_module`` cannot be imported.
    """
    settings_lib.import_modules(config)
    models = _names(config, "models")
    setting_names = [settings_lib.parse_setting(s).name for s in _names(config, "settings")]
    formats = _names(config, "formats")
    for family in formats:
        if family not in settings_lib.FORMAT_FAMILIES:
            raise ValueError(f"unknown format family {family!r}; valid: {settings_lib.FORMAT_FAMILIES}")
    methods = _names(config, "methods")
    _validate_methods(methods)
    method_settings = _method_settings(config, methods)
    method_models = _method_models(config, methods, models)
    seeds = _seeds(config)

    cells: dict[str, Cell] = {}
    skipped: dict[str, str] = {}
    for model in models:
        for setting in setting_names:
            if settings_lib.parse_setting(setting).is_float:
                for seed in seeds:
                    cell = Cell(model, setting, settings_lib.FLOAT_FORMAT, settings_lib.FLOAT_METHOD, seed)
                    cells.setdefault(cell.key, cell)
                continue
            for family in formats:
                reason = settings_lib.not_applicable_reason(setting, family)
                if reason is not None:
                    skipped.setdefault(f"{model}|{setting}|{family}", reason)
                    continue
                for method in methods:
                    if (method in method_settings and setting not in method_settings[method]) or (
                            method in method_models and model not in method_models[method]):
                        continue  # the config's choice, not a gap: not listed in `skipped`
                    for params in _param_sets(config, method):
                        for seed in seeds:
                            cell = Cell(model, setting, family, method, seed, params)
                            cells.setdefault(cell.key, cell)
    return GridExpansion(list(cells.values()), list(skipped.items()))


def expand_grid(config: ml_collections.ConfigDict) -> list[Cell]:
    """The cells of `config` in deterministic grid order (see the module docstring)."""
    return expand_grid_report(config).cells
