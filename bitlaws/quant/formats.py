"""Numeric formats: integer and floating-point grids, rounding, and the format parser.

A format knows only its *grid*: which values (in units of its scale) it can represent and how to round onto
them. How a scale is chosen is the calibrator's job (`calibrate.py`); how values are stored is `qarray.py`'s.

Integer formats follow the paper's eq. 4-6:

* ``int<b>``: signed, symmetric, codes ``-2^(b-1) .. 2^(b-1)-1``; scales map the absolute maximum to
    ``2^(b-1)-1`` so the grid is symmetric around zero (the most negative code is representable but unused
    by the calibrators).
* ``uint<b>``: unsigned with a zero point, codes ``0 .. 2^b-1`` (eq. 4: ``clip(round(x/s) + z, 0, 2^b-1)``).

Floating-point formats follow the OCP 8-bit (OFP8) and Microscaling (MX v1.0) specifications:

============  ====  =====  ===========  =====================================
name          bias  max    inf / NaN    notes
============  ====  =====  ===========  =====================================
fp8_e4m3      7     448    none / S.1111.111   "fn": no infinities
fp8_e5m2      15    57344  IEEE-like: exponent 11111 is inf/NaN
fp6_e3m2      3     28     none / none
fp6_e2m3      1     7.5    none / none
fp4_e2m1      1     6      none / none  positive grid {0, .5, 1, 1.5, 2, 3, 4, 6}
============  ====  =====  ===========  =====================================

All have subnormals. Rounding is round-to-nearest, ties-to-even, saturating at the largest finite value
(quantizers never produce inf/NaN). ``mxfp8``/``mxfp6``/``mxfp4`` are the same element formats with one
shared power-of-two E8M0 scale per block of 32 elements.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Union

import jax.numpy as jnp
import numpy as np

MX_BLOCK_SIZE = 32
E8M0_BITS = 8


@dataclasses.dataclass(frozen=True)
class IntFormat:
    """A `bits`-wide integer format.

    Attributes:
        bits: Width in bits, 2..8.
        signed: True for the symmetric signed format (``int<b>``), False for unsigned with zero point.
    """

    bits: int
    signed: bool = True

    def __post_init__(self):
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"IntFormat.bits must be an integer in [2, 8], got {self.bits!r}")

    @property
    def name(self) -> str:
        return f"{'int' if self.signed else 'uint'}{self.bits}"

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def max_normal(self) -> float:
        """Largest magnitude a unit scale maps to (the calibrators' target for the range)."""
        return float(self.qmax)

    @property
    def bits_per_value(self) -> float:
        return float(self.bits)

    @property
    def is_mx(self) -> bool:
        return False

    def grid(self) -> np.ndarray:
        """All representable codes in ascending order, as float64 (units of the scale)."""
        return np.arange(self.qmin, self.qmax + 1, dtype=np.float64)

    def round(self, x: jnp.ndarray) -> jnp.ndarray:
        """Rounds to the nearest code (ties to even) and clips to the code range. Same shape as `x`."""
        return jnp.clip(jnp.round(x), self.qmin, self.qmax)

    def __str__(self) -> str:
        return self.name


@dataclasses.dataclass(frozen=True)
class FpFormat:
    """A small floating-point format with `exp_bits` exponent and `man_bits` mantissa bits plus a sign.

    Attributes:
        exp_bits: Exponent width.
        man_bits: Mantissa (fraction) width.
        bias: Exponent bias.
        ieee_specials: True when the all-ones exponent encodes inf/NaN (fp8_e5m2); False for the OCP "fn"
            convention of fp8_e4m3 where only S.1111.111 is NaN, and for the fp6/fp4 formats without specials.
        nan_uses_top_mantissa: True when the largest exponent with an all-ones mantissa is NaN (fp8_e4m3).
        name: The canonical name.
    """

    exp_bits: int
    man_bits: int
    bias: int
    ieee_specials: bool
    nan_uses_top_mantissa: bool
    name: str

    @property
    def bits(self) -> int:
        return 1 + self.exp_bits + self.man_bits

    @property
    def bits_per_value(self) -> float:
        return float(self.bits)

    @property
    def is_mx(self) -> bool:
        return False

    @property
    def emax(self) -> int:
        """Unbiased exponent of the largest finite binade."""
        top = 2**self.exp_bits - 1
        return (top - 1 if self.ieee_specials else top) - self.bias

    @property
    def emin(self) -> int:
        """Unbiased exponent of the smallest normal binade (subnormals share its step)."""
        return 1 - self.bias

    @property
    def max_normal(self) -> float:
        top_mantissa = 2**self.man_bits - 1
        if self.nan_uses_top_mantissa:
            top_mantissa -= 1
        return float(2.0**self.emax * (1 + top_mantissa / 2**self.man_bits))

    @property
    def min_subnormal(self) -> float:
        return float(2.0 ** (self.emin - self.man_bits))

    @functools.cache
    def positive_grid(self) -> np.ndarray:
        """Non-negative finite values in code order (which is ascending), float64."""
        values = []
        for code in range(2 ** (self.exp_bits + self.man_bits)):
            exponent, mantissa = divmod(code, 2**self.man_bits)
            if exponent == 0:
                value = 2.0**self.emin * mantissa / 2**self.man_bits
            else:
                value = 2.0 ** (exponent - self.bias) * (1 + mantissa / 2**self.man_bits)
            if value > self.max_normal:
                break
            values.append(value)
        return np.asarray(values, dtype=np.float64)

    def grid(self) -> np.ndarray:
        """All representable finite values in ascending order (zero once), float64."""
        pos = self.positive_grid()
        return np.concatenate([-pos[:0:-1], pos])

    def round(self, x: jnp.ndarray) -> jnp.ndarray:
        """Rounds to the nearest representable value, ties to even, saturating at ±max_normal.

        Works elementwise in the input's float dtype: the step of the binade that holds |x| is
        2^(e - man_bits) with e = clip(floor(log2|x|), emin, emax) (from the exact `frexp`); rounding x/step to the nearest even integer
        is exactly round-to-nearest-even on the mantissa, and a carry into the next binade lands on a
        representable value.
        """
        x = jnp.asarray(x)
        mag = jnp.abs(x)
        _, frexp_exponent = jnp.frexp(jnp.where(mag > 0, mag, 1.0))  # exact: mag = m * 2^e, m in [.5, 1)
        exponent = jnp.clip(frexp_exponent - 1, self.emin, self.emax)
        step = jnp.ldexp(jnp.ones_like(x), exponent - self.man_bits)
        rounded = jnp.round(x / step) * step
        return jnp.clip(rounded, -self.max_normal, self.max_normal)

    def __str__(self) -> str:
        return self.name


@dataclasses.dataclass(frozen=True)
class MxFormat:
    """An OCP Microscaling format: `element` values sharing one E8M0 power-of-two scale per block.

    Attributes:
        element: The element format (fp8_e4m3, fp8_e5m2, fp6_e3m2, fp6_e2m3 or fp4_e2m1).
        block_size: Elements per shared scale (32 in MX v1.0).
        name: The canonical name.
    """

    element: FpFormat
    name: str
    block_size: int = MX_BLOCK_SIZE

    @property
    def bits(self) -> int:
        return self.element.bits

    @property
    def bits_per_value(self) -> float:
        """Element bits plus the amortised shared scale."""
        return self.element.bits + E8M0_BITS / self.block_size

    @property
    def is_mx(self) -> bool:
        return True

    @property
    def max_normal(self) -> float:
        return self.element.max_normal

    def grid(self) -> np.ndarray:
        return self.element.grid()

    def round(self, x: jnp.ndarray) -> jnp.ndarray:
        return self.element.round(x)

    def __str__(self) -> str:
        return self.name


QFormat = Union[IntFormat, FpFormat, MxFormat]

FP8_E4M3 = FpFormat(4, 3, bias=7, ieee_specials=False, nan_uses_top_mantissa=True, name="fp8_e4m3")
FP8_E5M2 = FpFormat(5, 2, bias=15, ieee_specials=True, nan_uses_top_mantissa=False, name="fp8_e5m2")
FP6_E3M2 = FpFormat(3, 2, bias=3, ieee_specials=False, nan_uses_top_mantissa=False, name="fp6_e3m2")
FP6_E2M3 = FpFormat(2, 3, bias=1, ieee_specials=False, nan_uses_top_mantissa=False, name="fp6_e2m3")
FP4_E2M1 = FpFormat(2, 1, bias=1, ieee_specials=False, nan_uses_top_mantissa=False, name="fp4_e2m1")

_FP_FORMATS = {f.name: f for f in (FP8_E4M3, FP8_E5M2, FP6_E3M2, FP6_E2M3, FP4_E2M1)}

# MX v1.0 element types. `mxfp6` defaults to E2M3 (the MX paper's better-accuracy choice for inference).
_MX_FORMATS = {
        "mxfp8": MxFormat(FP8_E4M3, "mxfp8"),
        "mxfp8_e4m3": MxFormat(FP8_E4M3, "mxfp8_e4m3"),
        "mxfp8_e5m2": MxFormat(FP8_E5M2, "mxfp8_e5m2"),
        "mxfp6": MxFormat(FP6_E2M3, "mxfp6"),
        "mxfp6_e2m3": MxFormat(FP6_E2M3, "mxfp6_e2m3"),
        "mxfp6_e3m2": MxFormat(FP6_E3M2, "mxfp6_e3m2"),
        "mxfp4": MxFormat(FP4_E2M1, "mxfp4"),
}

_INT_PATTERN = re.compile(r"(u?)int(\d+)")


def format_names() -> list[str]:
    """Every name `parse_format` accepts, in a stable display order."""
    ints = [f"int{b}" for b in range(2, 9)] + [f"uint{b}" for b in range(2, 9)]
    return ints + list(_FP_FORMATS) + list(_MX_FORMATS)


def parse_format(spec: Union[str, QFormat]) -> QFormat:
    """Parses a format name (``int4``, ``uint3``, ``fp8_e4m3``, ``mxfp4`` ...) into a format object.

    Args:
        spec: A format name (case-insensitive) or an already-built format, which is returned unchanged.

    Returns:
        An `IntFormat`, `FpFormat` or `MxFormat`; each has ``.grid()``, ``.round()``, ``.bits``.

    Raises:
        ValueError: for an unknown name; the message lists every valid name.
    """
    if isinstance(spec, (IntFormat, FpFormat, MxFormat)):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"format must be a string or a format object, got {type(spec).__name__}")
    name = spec.strip().lower()
    match = _INT_PATTERN.fullmatch(name)
    if match and 2 <= int(match.group(2)) <= 8:
        return IntFormat(int(match.group(2)), signed=not match.group(1))
    if name in _FP_FORMATS:
        return _FP_FORMATS[name]
    if name in _MX_FORMATS:
        return _MX_FORMATS[name]
    raise ValueError(f"unknown quantization format {spec!r}; valid formats: {', '.join(format_names())}")


def grid_size(fmt: QFormat) -> int:
    """Number of distinct representable values of the element grid."""
    return int(fmt.grid().size)
