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
(finite inputs never become inf/NaN). ``mxfp8``/``mxfp6``/``mxfp4`` are the same element formats with one
shared power-of-two E8M0 scale per block of 32 elements.

Lookup-table formats (`LutFormat`) hold any ``2^b`` values in units of the scale and round to the nearest
one; ``nf4`` (QLoRA's NormalFloat-4) is built in. User code adds formats with `register_format`, after
which `parse_format` (and so `QuantSpec`, rules and configs) accepts their names.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Optional, Union

import jax.numpy as jnp
import numpy as np

MX_BLOCK_SIZE = 32
E8M0_BITS = 8


class _ElementFormat:
    """Shared by formats without a block scale: bits per value = bits, not MX."""

    @property
    def bits_per_value(self) -> float:
        return float(self.bits)

    @property
    def is_mx(self) -> bool:
        return False


@dataclasses.dataclass(frozen=True)
class IntFormat(_ElementFormat):
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

    def grid(self) -> np.ndarray:
        """All representable codes in ascending order, as float64 (units of the scale)."""
        return np.arange(self.qmin, self.qmax + 1, dtype=np.float64)

    def round(self, x: jnp.ndarray) -> jnp.ndarray:
        """Rounds to the nearest code (ties to even) and clips to the code range. Same shape as `x`."""
        return jnp.clip(jnp.round(x), self.qmin, self.qmax)

    def __str__(self) -> str:
        return self.name


@dataclasses.dataclass(frozen=True)
class FpFormat(_ElementFormat):
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

    @property
    def native_dtype(self) -> Optional[jnp.dtype]:
        """The JAX dtype with exactly this format's values (fp8_e4m3 -> float8_e4m3fn, fp8_e5m2 -> float8_e5m2),
        or None. (XLA:CPU cannot compile conversions to the float6/float4 dtypes, so those are not used.)"""
        return _NATIVE_FP_DTYPES.get((self.exp_bits, self.man_bits, self.bias, self.ieee_specials,
                                      self.nan_uses_top_mantissa))

    def round(self, x: jnp.ndarray) -> jnp.ndarray:
        """Rounds to the nearest representable value, ties to even, saturating at ±max_normal.

        Works elementwise in the input's float dtype: the step of the binade that holds |x| is
        2^(e - man_bits) with e = clip(floor(log2|x|), emin, emax) (from the exact `frexp`); rounding x/step to the nearest even integer
        is exactly round-to-nearest-even on the mantissa, and a carry into the next binade lands on a
        representable value. float32 input in a format with a `native_dtype` takes the shorter path of
        saturating and converting to that dtype and back (the same bits, ~3x faster for fp8_e4m3 on XLA:CPU).
        """
        x = jnp.asarray(x)
        native = self.native_dtype
        if native is not None and x.dtype == jnp.float32:
            return jnp.clip(x, -self.max_normal, self.max_normal).astype(native).astype(jnp.float32)
        return self.round_arithmetic(x)

    def round_arithmetic(self, x: jnp.ndarray) -> jnp.ndarray:
        """`round` computed from the binade's step for any float input (see `round`)."""
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


@dataclasses.dataclass(frozen=True)
class LutFormat(_ElementFormat):
    """A lookup-table (codebook) format: ``2^b`` arbitrary values in units of the scale, e.g. NF4.

    Rounding is to the nearest table value (ties to the lower one); storage is the b-bit index of the
    value, packed like integer codes, and the table itself (float32, ``4 * 2^b`` bytes per tensor) is
    counted in `QArray.nbytes`. The scale maps the group's absolute maximum to ``max|values|``.

    Attributes:
        name: The format's name (what `parse_format` accepts once it is registered with `register_format`).
        values: The ``2^b`` table values (b in 1..8), finite and distinct; stored sorted ascending.
    """

    name: str
    values: tuple[float, ...]

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"LutFormat.name must be a non-empty string, got {self.name!r}")
        try:
            values = np.asarray(self.values, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError) as e:
            raise ValueError(f"LutFormat {self.name!r}: values must be numbers, got {self.values!r}") from e
        n = values.size
        if n < 2 or n > 256 or n & (n - 1):
            raise ValueError(f"LutFormat {self.name!r}: needs 2^b values (b in 1..8), got {n}")
        if not np.all(np.isfinite(values)):
            raise ValueError(f"LutFormat {self.name!r}: values must be finite, got {values.tolist()}")
        values = np.sort(values)
        if np.any(np.diff(values) == 0):
            raise ValueError(f"LutFormat {self.name!r}: values must be distinct, got {values.tolist()}")
        if np.max(np.abs(values)) == 0:
            raise ValueError(f"LutFormat {self.name!r}: values must not all be zero")
        object.__setattr__(self, "values", tuple(float(v) for v in values))

    @property
    def bits(self) -> int:
        return int(len(self.values)).bit_length() - 1

    @property
    def max_normal(self) -> float:
        """Largest magnitude in the table (the calibrators map the group's absolute maximum to it)."""
        return float(max(abs(self.values[0]), abs(self.values[-1])))

    @property
    def table_nbytes(self) -> int:
        """Bytes of the stored table (float32)."""
        return 4 * len(self.values)

    def grid(self) -> np.ndarray:
        return np.asarray(self.values, dtype=np.float64)

    def round(self, x: jnp.ndarray) -> jnp.ndarray:
        """Nearest table value (ties to the lower value; beyond the ends: the end values; NaN stays NaN)."""
        x = jnp.asarray(x)
        table = jnp.asarray(self.values, x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32)
        midpoints = (table[1:] + table[:-1]) / 2
        index = jnp.searchsorted(midpoints, x, side="left")
        return jnp.where(jnp.isnan(x), jnp.nan, table[index])

    def codes(self, q: jnp.ndarray) -> jnp.ndarray:
        """Table values (output of `round`) -> uint8 indices."""
        table = jnp.asarray(self.values, jnp.float32)
        return jnp.clip(jnp.searchsorted(table, q.astype(jnp.float32)), 0, len(self.values) - 1).astype(jnp.uint8)

    def __str__(self) -> str:
        return self.name


QFormat = Union[IntFormat, FpFormat, MxFormat, LutFormat]

# (exp_bits, man_bits, bias, ieee_specials, nan_uses_top_mantissa) -> the JAX dtype with the same values.
_NATIVE_FP_DTYPES = {(4, 3, 7, False, True): jnp.dtype(jnp.float8_e4m3fn),
                     (5, 2, 15, True, False): jnp.dtype(jnp.float8_e5m2)}

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

# NF4 (QLoRA): the 16 quantiles of a standard normal, normalised to [-1, 1], with an exact zero.
NF4 = LutFormat("nf4", (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0))
_LUT_FORMATS = {NF4.name: NF4}

# Formats added from user code with `register_format` (names are case-insensitive).
_USER_FORMATS: dict[str, QFormat] = {}

_INT_PATTERN = re.compile(r"(u?)int(\d+)")


def _builtin_names() -> list[str]:
    ints = [f"int{b}" for b in range(2, 9)] + [f"uint{b}" for b in range(2, 9)]
    return ints + list(_FP_FORMATS) + list(_MX_FORMATS) + list(_LUT_FORMATS)


def register_format(fmt: QFormat, *, replace: bool = False) -> QFormat:
    """Makes `fmt` known to `parse_format` (and so to `QuantSpec`, rules and sweep configs) by its name.

    Args:
        fmt: An `IntFormat`, `FpFormat`, `MxFormat` or `LutFormat` whose ``name`` is not a built-in name.
        replace: Replace a different format registered earlier under the same name. Registering an equal
            format again is always allowed (re-running a notebook cell).

    Returns:
        `fmt`.

    Raises:
        ValueError: the name is a built-in format, or is taken by a different format and `replace` is False.
    """
    if not isinstance(fmt, (IntFormat, FpFormat, MxFormat, LutFormat)):
        raise TypeError(f"register_format needs a format object, got {type(fmt).__name__}")
    name = fmt.name.strip().lower()
    if name in _builtin_names() or _INT_PATTERN.fullmatch(name):
        raise ValueError(f"format name {fmt.name!r} is built in; register the format under another name")
    if name in _USER_FORMATS and _USER_FORMATS[name] != fmt and not replace:
        raise ValueError(f"format {fmt.name!r} is already registered as {_USER_FORMATS[name]!r}; pass "
                         f"replace=True to replace it")
    _USER_FORMATS[name] = fmt
    return fmt


def format_names() -> list[str]:
    """Every name `parse_format` accepts, in a stable display order."""
    return _builtin_names() + sorted(_USER_FORMATS)


def parse_format(spec: Union[str, QFormat]) -> QFormat:
    """Parses a format name (``int4``, ``uint3``, ``fp8_e4m3``, ``mxfp4`` ...) into a format object.

    Args:
        spec: A format name (case-insensitive) or an already-built format, which is returned unchanged.

    Returns:
        An `IntFormat`, `FpFormat`, `MxFormat` or `LutFormat`; each has ``.grid()``, ``.round()``, ``.bits``.

    Raises:
        ValueError: for an unknown name; the message lists every valid name.
    """
    if isinstance(spec, (IntFormat, FpFormat, MxFormat, LutFormat)):
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
    if name in _LUT_FORMATS:
        return _LUT_FORMATS[name]
    if name in _USER_FORMATS:
        return _USER_FORMATS[name]
    raise ValueError(f"unknown quantization format {spec!r}; valid formats: {', '.join(format_names())}")


def grid_size(fmt: QFormat) -> int:
    """Number of distinct representable values of the element grid."""
    return int(fmt.grid().size)
