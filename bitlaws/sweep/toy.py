"""The ``toy`` sweep evaluator: quantizes a small random MLP and measures its relative output error.

It exists to exercise the sweep machinery (resume, kill safety, records) in seconds, with the real
quantization path: `QLinear` layers, `settings.quant_rules`, the sweep method registry and
`bit_accounting`. Its ``fid`` field is NOT an FID: it is ``||f_q(x) - f(x)|| / ||f(x)||`` for the
quantized and float MLPs on Gaussian inputs, and every record says so in ``metric_name``.

Model names are ``mlp-w<width>-d<depth>`` (e.g. ``mlp-w32-d2``). The float weights depend only on the
name; the inputs on `Cell.model_seed`, so every precision of a model sees the same inputs.

Config block ``config.toy``: ``batch`` (inputs per cell, default 64), ``sleep_s`` (seconds to sleep per
cell, default 0; the kill test uses it to have time to kill mid-sweep) and ``jit`` (default True: the
quantization and both forwards of a cell are traced into one XLA computation, several times faster on CPU
than compiling every quantization op; a method that cannot be traced falls back to eager execution).

Pre-check (`check_cells`, run by the sweep before any cell): every unfinished cell's rules must fit the
abstract model of its name (e.g. ``quant.weight_group_size`` must divide the width). A name that does not
parse is left to the evaluation, where its cells fail one by one (this evaluator exists to exercise that
path of the sweep).
"""

from __future__ import annotations

import functools
import re
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from bitlaws.models.common import random_model
from bitlaws.quant import QLinear, QuantRule, bit_accounting, run_calibration, transform
from bitlaws.sweep import grid as grid_lib
from bitlaws.sweep import runner, settings

METRIC_NAME = "toy relative output error ||f_q(x)-f(x)||/||f(x)||, not an FID"
QUANT_PATTERN = r"layers\.\d+"
_NAME_PATTERN = re.compile(r"mlp-w(\d+)-d(\d+)")
_NOT_TRACEABLE = (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError,
                  jax.errors.TracerIntegerConversionError)


class ToyMLP(nnx.Module):
    """``depth`` square `QLinear` layers with GELU between them: ``[B, width] -> [B, width]`` float32."""

    def __init__(self, width: int, depth: int, *, rngs: nnx.Rngs):
        self.layers = nnx.List([QLinear(width, width, rngs=rngs) for _ in range(depth)])

    def __call__(self, x: jax.Array) -> jax.Array:
        for index, layer in enumerate(self.layers):
            x = layer(x)  # [B, width]
            if index < len(self.layers) - 1:
                x = jax.nn.gelu(x)
        return x


def parse_model_name(name: str) -> tuple[int, int]:
    """``"mlp-w32-d2"`` -> ``(32, 2)``; raises ValueError for other names."""
    match = _NAME_PATTERN.fullmatch(name)
    if not match:
        raise ValueError(f"toy model name {name!r} must look like mlp-w<width>-d<depth>, e.g. mlp-w32-d2")
    width, depth = int(match.group(1)), int(match.group(2))
    if width < 1 or depth < 1:
        raise ValueError(f"toy model {name!r}: width and depth must be positive")
    return width, depth


@functools.lru_cache(maxsize=8)
def build_model(name: str) -> ToyMLP:
    """The float toy model of `name`; its random weights depend only on the name."""
    width, depth = parse_model_name(name)
    seed = grid_lib.Cell(name, "W16A16", "none", "none", 0).model_seed
    return random_model(lambda: ToyMLP(width, depth, rngs=nnx.Rngs(0)), seed=seed)


@functools.lru_cache(maxsize=8)
def abstract_model(name: str) -> ToyMLP:
    """The toy model of `name` as ``nnx.eval_shape`` builds it: shapes only, no weights."""
    width, depth = parse_model_name(name)
    return nnx.eval_shape(lambda: ToyMLP(width, depth, rngs=nnx.Rngs(0)))


def check_cells(config: ml_collections.ConfigDict, cells: Sequence[grid_lib.Cell]) -> None:
    """The sweep's pre-check: each cell's rules fit its abstract model (unparseable names are not checked).

    Raises:
        ValueError: naming the first failing cell (and counting the others), see `runner.check_each`.
    """
    options = settings.quant_options(config)

    def check_one(cell: grid_lib.Cell) -> None:
        rules = cell.rules(QUANT_PATTERN, **options)
        if rules and _NAME_PATTERN.fullmatch(cell.model):
            transform.check_rules(abstract_model(cell.model), rules)

    runner.check_each(cells, check_one, key=lambda cell: (cell.model, cell.setting, cell.format))


def relative_error(quantized: jax.Array, reference: jax.Array) -> jax.Array:
    """``||quantized - reference||_2 / ||reference||_2`` over all elements: a float32 scalar."""
    return jnp.linalg.norm(quantized - reference) / jnp.linalg.norm(reference)


def make_evaluator(config: ml_collections.ConfigDict):
    """``factory(config) -> evaluate(cell) -> metrics`` for the sweep runner."""
    toy = config.get("toy", None) or {}
    batch = int(toy.get("batch", 64))
    sleep_s = float(toy.get("sleep_s", 0.0))
    use_jit = bool(toy.get("jit", True))
    options = settings.quant_options(config)

    def evaluate(cell: grid_lib.Cell) -> dict[str, Any]:
        model = build_model(cell.model)
        width, _ = parse_model_name(cell.model)
        x = jax.random.normal(jax.random.key(cell.model_seed), (batch, width), jnp.float32)  # [B, width]
        rules = cell.rules(QUANT_PATTERN, **options)

        def calibrate(float_model: nnx.Module, calib_rules: Sequence[QuantRule],
                      record_hessian: bool) -> Mapping[str, Any]:
            return run_calibration(float_model, calib_rules, lambda m, b: m(b), [x], record_hessian=record_hessian)

        def error(inputs: jax.Array) -> jax.Array:
            context = settings.MethodContext(params=cell.params, calibrate=calibrate, seed=cell.prng_seed)
            quantized = settings.quantize_for_cell(model, rules, cell.method, context)
            return relative_error(quantized(inputs), model(inputs))

        if use_jit:
            try:  # one compilation per cell is much cheaper than one per quantization op
                value = float(jax.jit(error)(x))
            except _NOT_TRACEABLE:  # a method that needs concrete values: run it eagerly
                value = float(error(x))
        else:
            value = float(error(x))
        report = bit_accounting(model, rules)
        if sleep_s:
            time.sleep(sleep_s)
        return {"fid": value, "metric_name": METRIC_NAME, "mt_bits": report.mt_bits, "ct_bits": report.ct_bits,
                "storage_bytes": report.storage_bytes, "total_params": report.total_params}

    return evaluate


runner.register_evaluator("toy", make_evaluator, check=check_cells)
