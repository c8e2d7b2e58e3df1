"""`QArray`: a quantized tensor stored with real bit packing, and the quantize / dequantize / fake_quant ops.

Layout. A tensor of shape ``shape`` is viewed as a matrix ``[K, N]``: the ``reduce_axes`` (the axes that
share a scale; by default every axis but the last, i.e. the contraction axes of a kernel) are moved to
the front and flattened to K, the rest to N. Then

* ``values``: codes of the ``[K, N]`` view packed along K (two int4 codes per byte, eight int3 codes in
  three bytes, ...), int8/uint8 as is, fp8 as ``ml_dtypes`` float8, fp6/fp4 as packed bit codes;
* ``scale``: ``[G, C]`` in the spec's scale dtype (E8M0 exponents as uint8 for MX), G = K / group_size
  for ``group`` and 1 otherwise, C = 1 for ``tensor`` and N otherwise;
* ``scale_exp``: ``[]`` int16, the per-tensor power of two of float16 scales (``scale * 2**scale_exp`` is
  the real scale; see the scale policy in `calibrate`), else None;
* ``zero_point``: ``[G, C]`` uint8 for unsigned integer formats, else None.

Lookup-table formats store b-bit indices into their table; the table is part of the (static) spec and its
bytes are counted in `QArray.nbytes`.

Input checks. `quantize`, `fake_quant` and `quantize_dequantize` raise ValueError for a 0-d or empty
tensor and for ``reduce_axes`` outside the tensor's dimensions. Non-finite values follow the scale policy
of `calibrate`: their group dequantizes to NaN in the fake and the packed path alike.

Packing along K keeps every output column independent, which is what a matmul kernel tiling over N and
streaming over K wants.

`PackedArray` is the small interface every packed weight offers (`QArray` here, GPTVQ's `VQArray` in
`bitlaws.ptq.gptvq_core`): ``shape``, ``nbytes``, ``model_bits`` and ``dequantize(dtype)``. The seam, the
``baked`` materialization and the bit accounting use only this interface, so a new storage type needs no
change there.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bitlaws.quant import calibrate, formats, packing
from bitlaws.quant.spec import QuantSpec

_FP8_DTYPES = {"fp8_e4m3": jnp.float8_e4m3fn, "fp8_e5m2": jnp.float8_e5m2}


def normalize_axes(reduce_axes: Optional[Sequence[int]], ndim: int) -> tuple[int, ...]:
    """Sorted non-negative reduce axes; default: every axis but the last (all axes of a 1-D tensor).

    Raises:
        ValueError: `reduce_axes` is empty, names an axis outside ``[-ndim, ndim)``, repeats an axis, or
            holds a non-integer.
    """
    if ndim < 1:
        raise ValueError("reduce_axes: a 0-d tensor has no axis to reduce; quantize at least a 1-d array")
    if reduce_axes is None:
        return tuple(range(max(ndim - 1, 1)))
    if isinstance(reduce_axes, (int, np.integer)):
        reduce_axes = (reduce_axes,)
    axes = tuple(reduce_axes)
    if not axes:
        raise ValueError("reduce_axes must name at least one axis")
    for a in axes:
        if isinstance(a, bool) or not isinstance(a, (int, np.integer)):
            raise ValueError(f"reduce_axes must hold integers, got {reduce_axes!r}")
        if not -ndim <= a < ndim:
            raise ValueError(f"reduce_axes={tuple(reduce_axes)!r}: axis {a} is out of range for a {ndim}-d tensor")
    normalized = tuple(sorted({int(a) % ndim for a in axes}))
    if len(normalized) != len(axes):
        raise ValueError(f"reduce_axes={tuple(reduce_axes)!r} names an axis twice")
    return normalized


def check_tensor(x: jax.Array, what: str = "x") -> None:
    """Raises ValueError for a 0-d or empty tensor, or a non-floating dtype (the message names `what`)."""
    if x.ndim == 0:
        raise ValueError(f"{what} is a 0-d array; quantization needs at least one axis (reshape it to (1,))")
    if x.size == 0:
        raise ValueError(f"{what} is empty (shape {tuple(x.shape)}); there is nothing to quantize")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{what} must be a floating-point array, got dtype {x.dtype}")


def to_view(x: jax.Array, reduce_axes: tuple[int, ...]) -> jax.Array:
    """``x`` as the ``[K, N]`` reduction view (reduce axes first, flattened)."""
    keep = tuple(a for a in range(x.ndim) if a not in reduce_axes)
    k = math.prod(x.shape[a] for a in reduce_axes)
    return jnp.transpose(x, reduce_axes + keep).reshape(k, -1)


def from_view(v: jax.Array, shape: tuple[int, ...], reduce_axes: tuple[int, ...]) -> jax.Array:
    """Inverse of `to_view`."""
    keep = tuple(a for a in range(len(shape)) if a not in reduce_axes)
    perm = reduce_axes + keep
    v = v.reshape(tuple(shape[a] for a in perm))
    return jnp.transpose(v, np.argsort(perm))


def group_view(v: jax.Array, spec: QuantSpec, what: str = "tensor") -> jax.Array:
    """``[K, N]`` view -> grouped view ``[G, L, N]`` (see `calibrate`)."""
    k, n = v.shape
    if spec.granularity == "group":
        spec.check_axis(k, what)
        return v.reshape(k // spec.group_size, spec.group_size, n)
    return v.reshape(1, k, n)


def compute_params(grouped: jax.Array, spec: QuantSpec) -> tuple[jax.Array, Optional[jax.Array]]:
    """Runs the spec's calibrator on a grouped view and returns ``(scale, zero)``, each ``[G, 1, C]``.

    The scale is the effective float32 scale (see `calibrate.group_params`).
    """
    return calibrate.group_params(grouped, spec)


class PackedArray(abc.ABC):
    """A packed (real low-bit) weight: what the seam, ``baked`` materialization and bit accounting need of it.

    Subclasses are frozen pytree dataclasses whose layout is static metadata (so they pass through
    `jax.jit` / `nnx.jit`) and define:

    * ``shape``: the original tensor's shape (a static field);
    * `nbytes`: the real storage in bytes (everything stored: codes, scales, codebooks, ...);
    * `model_bits`: the bits the bit accounting counts for the tensor in the total model bits MT;
    * `dequantize`: the float tensor it stands for.
    """

    shape: tuple[int, ...]

    @property
    @abc.abstractmethod
    def nbytes(self) -> int:
        """Real storage in bytes."""

    @property
    @abc.abstractmethod
    def model_bits(self) -> int:
        """Bits counted in the total model bits MT (see `bitlaws.quant.accounting`)."""

    @abc.abstractmethod
    def dequantize(self, dtype=None) -> jax.Array:
        """The dequantized tensor, in `shape`, in `dtype` (default: the original dtype)."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QArray(PackedArray):
    """A quantized tensor: packed codes + scale (+ zero point); layout is static pytree metadata.

    Attributes:
        values: Packed codes of the ``[K, N]`` view (see the module docstring).
        scale: ``[G, C]`` stored scales (float16/bfloat16/float32, or uint8 E8M0 exponents for MX).
        zero_point: ``[G, C]`` uint8 zero points (unsigned int formats) or None.
        scale_exp: ``[]`` int16 power of two applied to float16 scales, or None.
        spec: The `QuantSpec` used (static).
        shape: Shape of the original tensor (static).
        reduce_axes: Axes that share a scale (static).
        dtype: Name of the original dtype, restored by `dequantize` (static).
    """

    values: jax.Array
    scale: jax.Array
    zero_point: Optional[jax.Array]
    scale_exp: Optional[jax.Array]
    spec: QuantSpec = dataclasses.field(metadata=dict(static=True))
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    reduce_axes: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    dtype: str = dataclasses.field(metadata=dict(static=True), default="float32")

    @property
    def format(self) -> formats.QFormat:
        return self.spec.format

    @property
    def view_shape(self) -> tuple[int, int]:
        k = math.prod(self.shape[a] for a in self.reduce_axes)
        return k, math.prod(self.shape) // k

    @property
    def nbytes(self) -> int:
        """Real storage in bytes: packed values + scales + zero points (+ scale exponent, lookup table)."""
        total = self.values.nbytes + self.scale.nbytes
        for extra in (self.zero_point, self.scale_exp):
            if extra is not None:
                total += extra.nbytes
        if isinstance(self.format, formats.LutFormat):
            total += self.format.table_nbytes
        return int(total)

    @property
    def model_bits(self) -> int:
        """The format's nominal bits per value times the values (the paper's ``b_w · N``; scales not counted)."""
        return self.format.bits * self.size

    def dequantize(self, dtype=None) -> jax.Array:
        """``dequantize(self, dtype)``."""
        return dequantize(self, dtype)

    @property
    def scale_f32(self) -> jax.Array:
        """The effective scales ``[G, C]`` as float32 (decodes E8M0 and the float16 exponent)."""
        return calibrate.decode_scale(self.scale, self.scale_exp, self.format)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __repr__(self) -> str:
        return (f"QArray({self.spec.short()}, shape={self.shape}, reduce_axes={self.reduce_axes}, "
                f"nbytes={self.nbytes})")


def _encode(q: jax.Array, fmt: formats.QFormat) -> jax.Array:
    """Grid values ``[K, N]`` (float32) -> stored array (packed along K)."""
    if isinstance(fmt, formats.IntFormat):
        q = jnp.where(jnp.isnan(q), 0.0, q)  # NaN groups: the NaN scale carries the NaN
        if fmt.bits == 8:
            return q.astype(jnp.int8 if fmt.signed else jnp.uint8)
        return packing.pack_bits((q - fmt.qmin).astype(jnp.uint8), fmt.bits, axis=0)
    if isinstance(fmt, formats.LutFormat):
        return packing.pack_bits(fmt.codes(jnp.where(jnp.isnan(q), 0.0, q)), fmt.bits, axis=0)
    element = fmt.element if isinstance(fmt, formats.MxFormat) else fmt
    if element.name in _FP8_DTYPES:
        return q.astype(_FP8_DTYPES[element.name])
    positive = jnp.asarray(element.positive_grid(), jnp.float32)
    q = jnp.where(jnp.isnan(q), 0.0, q)
    magnitude_code = jnp.searchsorted(positive, jnp.abs(q)).astype(jnp.uint8)
    sign = (q < 0).astype(jnp.uint8) << (element.bits - 1)
    return packing.pack_bits(sign | magnitude_code, element.bits, axis=0)


def _decode(values: jax.Array, fmt: formats.QFormat, k: int) -> jax.Array:
    """Stored array -> grid values ``[K, N]`` float32."""
    if isinstance(fmt, formats.IntFormat):
        if fmt.bits == 8:
            return values.astype(jnp.float32)
        return packing.unpack_bits(values, fmt.bits, k, axis=0).astype(jnp.float32) + fmt.qmin
    if isinstance(fmt, formats.LutFormat):
        return jnp.asarray(fmt.values, jnp.float32)[packing.unpack_bits(values, fmt.bits, k, axis=0)]
    element = fmt.element if isinstance(fmt, formats.MxFormat) else fmt
    if element.name in _FP8_DTYPES:
        return values.astype(jnp.float32)
    positive = element.positive_grid()
    half = 2 ** (element.bits - 1)
    table = np.zeros(2 * half, np.float32)
    table[: positive.size] = positive
    table[half: half + positive.size] = -positive
    codes = packing.unpack_bits(values, element.bits, k, axis=0)
    return jnp.asarray(table)[codes]


def _qdq_grouped(grouped: jax.Array, spec: QuantSpec):
    """Quantizes a grouped view ``[G, L, C]``. Returns (grid values ``[G, L, C]``, scale, zero ``[G, 1, C]``)."""
    scale, zero = compute_params(grouped, spec)
    return calibrate.quantize_grouped(grouped, scale, zero, spec.format), scale, zero


def quantize(x: jax.Array, spec: QuantSpec, reduce_axes: Optional[Sequence[int]] = None) -> QArray:
    """Quantizes `x` into a packed `QArray`.

    Args:
        x: Floating-point array of any shape.
        spec: How to quantize (format, granularity, calibrator).
        reduce_axes: Axes sharing a scale; default every axis but the last (kernel convention:
            ``[..., in, out]``). Use ``(-1,)`` for activations ``[..., features]``.

    Returns:
        The `QArray`; ``dequantize(quantize(x, spec))`` is within half a grid step of `x` inside the
        clipping range.

    Raises:
        ValueError: the group size does not divide the reduction axis (the message names group_size); a
            0-d or empty `x`; `reduce_axes` out of range.
    """
    x = jnp.asarray(x)
    check_tensor(x)
    return _quantize(x, spec, normalize_axes(reduce_axes, x.ndim))


# One compiled program per (shape, spec, axes): dispatching the ~50 ops one by one costs far more (each op
# compiles on first use) than compiling them together, for eager callers and tests alike.
@functools.partial(jax.jit, static_argnames=("spec", "axes"))
def _quantize(x: jax.Array, spec: QuantSpec, axes: tuple[int, ...]) -> QArray:
    view = to_view(x, axes)
    q, scale, zero = _qdq_grouped(group_view(view, spec, f"a tensor of shape {x.shape}"), spec)
    squeeze = lambda a: None if a is None else a.reshape(a.shape[0], a.shape[2])  # noqa: E731
    return from_grid(q.reshape(view.shape[0], -1), squeeze(scale), squeeze(zero), spec, shape=tuple(x.shape),
                     reduce_axes=axes, dtype=jnp.dtype(x.dtype).name)


def from_grid(q: jax.Array, scale: jax.Array, zero: Optional[jax.Array], spec: QuantSpec, *,
              shape: Sequence[int], reduce_axes: Optional[Sequence[int]] = None, dtype: str = "float32") -> QArray:
    """Packs grid values chosen by an algorithm (GPTQ, ...) into a `QArray`.

    Args:
        q: ``[K, N]`` grid values of the reduction view: integer codes (zero point included) for int formats,
            element values in units of the scale for fp / MX / lookup-table formats (what
            `calibrate.quantize_grouped` returns, reshaped to ``[K, N]``).
        scale: ``[G, C]`` effective float32 scales of one tensor, as `calibrate.range_to_params` returns them
            (reshaped from ``[G, 1, C]``).
        zero: ``[G, C]`` uint8 zero points (unsigned int formats) or None.
        spec: The `QuantSpec` the values follow.
        shape: Shape of the original tensor.
        reduce_axes: Its reduce axes (default: every axis but the last).
        dtype: Name of the dtype `dequantize` restores.

    Returns:
        The `QArray`; ``dequantize`` gives ``(q - zero) * scale`` in the original layout.
    """
    shape = tuple(int(d) for d in shape)
    axes = normalize_axes(reduce_axes, len(shape))
    stored, scale_exp = calibrate.encode_scale(jnp.asarray(scale, jnp.float32), spec)
    return QArray(values=_encode(jnp.asarray(q, jnp.float32), spec.format), scale=stored, zero_point=zero,
                  scale_exp=scale_exp, spec=spec, shape=shape, reduce_axes=axes, dtype=dtype)


def dequantize(qa: QArray, dtype=None) -> jax.Array:
    """Unpacks and rescales a `QArray` to its original shape, in `dtype` (default: the original dtype)."""
    return _dequantize(qa, jnp.dtype(dtype or qa.dtype).name)


@functools.partial(jax.jit, static_argnames=("dtype",))
def _dequantize(qa: QArray, dtype: str) -> jax.Array:
    k, _ = qa.view_shape
    q = _decode(qa.values, qa.format, k)  # [K, N]
    groups = qa.scale.shape[0]
    q = q.reshape(groups, k // groups, -1)
    expand = lambda a: None if a is None else a[:, None, :]  # noqa: E731
    deq = calibrate.dequantize_grouped(q, expand(qa.scale_f32), expand(qa.zero_point), qa.format)
    out = from_view(deq.reshape(k, -1), qa.shape, qa.reduce_axes)
    return out.astype(dtype)


def quantize_dequantize(x: jax.Array, spec: QuantSpec,
                        reduce_axes: Optional[Sequence[int]] = None) -> tuple[jax.Array, jax.Array]:
    """Quantize-dequantize without packing. Returns ``(x_hat, inside)``; `inside` marks unclipped values."""
    x = jnp.asarray(x)
    check_tensor(x)
    return _quantize_dequantize(x, spec, normalize_axes(reduce_axes, x.ndim))


@functools.partial(jax.jit, static_argnames=("spec", "axes"))
def _quantize_dequantize(x: jax.Array, spec: QuantSpec, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    if spec.granularity == "token" and axes == (x.ndim - 1,):
        return _quantize_dequantize_rows(x, spec)
    return _quantize_dequantize_view(x, spec, axes)


def _dequantized_and_inside(grouped: jax.Array, spec: QuantSpec) -> tuple[jax.Array, jax.Array]:
    """Quantize-dequantize of a grouped view ``[G, L, C]``: ``(x_hat, inside)`` in that shape."""
    q, scale, zero = _qdq_grouped(grouped, spec)
    lo, hi = calibrate.clip_bounds(scale, zero, spec.format)
    return calibrate.dequantize_grouped(q, scale, zero, spec.format), (grouped >= lo) & (grouped <= hi)


def _quantize_dequantize_view(x: jax.Array, spec: QuantSpec, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    view = to_view(x, axes)
    deq, inside = _dequantized_and_inside(group_view(view, spec, f"a tensor of shape {x.shape}"), spec)
    k = view.shape[0]
    return (from_view(deq.reshape(k, -1), x.shape, axes).astype(x.dtype),
            from_view(inside.reshape(k, -1), x.shape, axes))


def _quantize_dequantize_rows(x: jax.Array, spec: QuantSpec) -> tuple[jax.Array, jax.Array]:
    """`_quantize_dequantize` of per-token scales over the last axis of ``x [..., K]``, read in place.

    The reduction view of an activation is ``[K, N]`` (features first), which costs a transpose in and two out.
    The same numbers come from the grouped view ``[N, K, 1]``, one group of K rows per token, a reshape of ``x``:
    the calibrator reduces the same K values per token (axis 1 either way) and every other step is elementwise.
    """
    deq, inside = _dequantized_and_inside(x.reshape(-1, x.shape[-1], 1), spec)  # [N, K, 1], scales [N, 1, 1]
    return deq.reshape(x.shape).astype(x.dtype), inside.reshape(x.shape)


def fake_quant(x: jax.Array, spec: QuantSpec, reduce_axes: Optional[Sequence[int]] = None) -> jax.Array:
    """Quantize-dequantize with a straight-through gradient.

    The forward value equals ``dequantize(quantize(x, spec, reduce_axes))``. The gradient with respect to
    `x` is 1 where `x` lies inside the clipping range and 0 where it was clipped; scales are treated as
    constants.
    """
    x = jnp.asarray(x)
    x_hat, inside = quantize_dequantize(jax.lax.stop_gradient(x), spec, reduce_axes)
    return _straight_through(x, jax.lax.stop_gradient(x_hat), inside)


@jax.custom_jvp
def _straight_through(x: jax.Array, x_hat: jax.Array, inside: jax.Array) -> jax.Array:
    """``x_hat``, differentiated as ``x`` where `inside` and as a constant elsewhere (jvp and vjp alike).

    The value is exactly ``x_hat``: no arithmetic on it in the forward pass (inference never computes
    `inside`). ``x + (x_hat - x)``, the usual trick, gives the same bits for round-to-nearest grids (Sterbenz:
    ``x_hat`` lies within a factor 2 of ``x`` or is 0) except a -0.0 result turning into +0.0.
    """
    del x, inside
    return x_hat


@_straight_through.defjvp
def _straight_through_jvp(primals, tangents):
    x, x_hat, inside = primals
    x_dot = tangents[0]
    # The primal output through the rule itself, so derivatives of any order see the same straight-through.
    return _straight_through(x, x_hat, inside), jnp.where(inside, x_dot, jnp.zeros_like(x_dot))
