"""The `bitlaws formats` table: every format's bits, grid and quantization error on a Gaussian tensor."""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterable, Optional

import jax
import jax.numpy as jnp
from tqdm import tqdm

from bitlaws.quant import formats
from bitlaws.quant.qarray import quantize_dequantize
from bitlaws.quant.spec import QuantSpec

# Canonical names (MX aliases such as mxfp8_e4m3 == mxfp8 are left out).
TABLE_FORMATS = (
    [f"int{b}" for b in range(2, 9)] + [f"uint{b}" for b in range(2, 9)]
    + ["fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1"]
    + ["mxfp8", "mxfp8_e5m2", "mxfp6", "mxfp6_e3m2", "mxfp4", "nf4"])
GROUP_SIZE = 128


@dataclasses.dataclass(frozen=True)
class FormatRow:
    """One line of the table. Errors are relative RMS errors (None: granularity not allowed)."""

    name: str
    bits_per_value: float
    grid_size: int
    max_normal: float
    err_tensor: Optional[float]
    err_channel: Optional[float]
    err_group: Optional[float]


def check_size(size: int) -> None:
    """Raises ValueError unless `size` is a positive multiple of `GROUP_SIZE` (the per-group column's groups)."""
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % GROUP_SIZE:
        raise ValueError(f"size must be a positive multiple of {GROUP_SIZE} (the per-group column uses groups of "
                         f"{GROUP_SIZE}), got {size!r}")


def check_format_names(names: Iterable[str]) -> list[formats.QFormat]:
    """Parses every name; raises ONE ValueError naming all unknown ones (and listing the valid names)."""
    parsed, unknown = [], []
    for name in names:
        try:
            parsed.append(formats.parse_format(name))
        except (TypeError, ValueError):
            unknown.append(name)
    if unknown:
        raise ValueError(f"unknown format(s) {', '.join(map(repr, unknown))}; valid formats: "
                         f"{', '.join(formats.format_names())}")
    return parsed


@functools.partial(jax.jit, static_argnums=1)
def _relative_rms_error(x: jax.Array, spec: QuantSpec) -> jax.Array:
    x_hat, _ = quantize_dequantize(x, spec)
    return jnp.sqrt(jnp.mean(jnp.square(x_hat - x)) / jnp.mean(jnp.square(x)))


def _specs(fmt: formats.QFormat) -> dict[str, Optional[QuantSpec]]:
    if fmt.is_mx:  # one E8M0 scale per 32 values is part of the format
        return {"tensor": None, "channel": None, "group": QuantSpec(format=fmt)}
    return {"tensor": QuantSpec(format=fmt, granularity="tensor"),
            "channel": QuantSpec(format=fmt, granularity="channel"),
            "group": QuantSpec(format=fmt, granularity="group", group_size=GROUP_SIZE)}


def format_rows(names: Iterable[str] = TABLE_FORMATS, size: int = 4096, seed: int = 0,
                progress: bool = True) -> list[FormatRow]:
    """Measures every format on a standard-normal ``[size, size]`` float32 tensor (min-max calibration).

    Args:
        names: Format names.
        size: Side of the square test tensor (a positive multiple of `GROUP_SIZE`, 128).
        seed: PRNG seed of the tensor.
        progress: Show a progress bar.

    Returns:
        One `FormatRow` per format.

    Raises:
        ValueError: a bad `size` or unknown format names (checked before any work).
    """
    check_size(size)
    fmts = check_format_names(names)
    x = jax.random.normal(jax.random.key(seed), (size, size), jnp.float32)
    jobs = [(fmt, gran, spec) for fmt in fmts for gran, spec in _specs(fmt).items() if spec is not None]
    errors: dict[tuple[str, str], float] = {}
    for fmt, gran, spec in tqdm(jobs, desc="quantizing", unit="cell", disable=not progress, leave=False):
        errors[fmt.name, gran] = float(_relative_rms_error(x, spec))
    return [FormatRow(name=fmt.name, bits_per_value=fmt.bits_per_value, grid_size=formats.grid_size(fmt),
                      max_normal=fmt.max_normal, err_tensor=errors.get((fmt.name, "tensor")),
                      err_channel=errors.get((fmt.name, "channel")), err_group=errors.get((fmt.name, "group")))
            for fmt in fmts]


def render(rows: list[FormatRow], size: int) -> str:
    """Renders rows as a fixed-width text table."""

    def err(value: Optional[float]) -> str:
        return "-" if value is None else f"{value:.4f}"

    header = (f"Relative RMS error of min-max quantization of a standard-normal {size}x{size} float32 tensor\n"
              f"(group = {GROUP_SIZE} for int/fp formats, 32 with a shared E8M0 scale for MX; "
              f"scales stored as float16)\n")
    lines = [f"{'format':<12}{'bits/value':>11}{'grid':>7}{'max normal':>12}"
             f"{'per tensor':>12}{'per channel':>13}{'per group':>11}"]
    lines.append("-" * len(lines[0]))
    for r in rows:
        lines.append(f"{r.name:<12}{r.bits_per_value:>11.2f}{r.grid_size:>7}{r.max_normal:>12g}"
                     f"{err(r.err_tensor):>12}{err(r.err_channel):>13}{err(r.err_group):>11}")
    return header + "\n".join(lines)
