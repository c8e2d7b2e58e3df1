"""Matmul backends of the ``packed`` mode: what multiplies activations by a packed weight.

A `Backend` is registered by name and chosen per layer (`LayerQuant.backend`, set from `QuantRule.backend` or
the ``backend=`` of `apply_method` / ``config.quant.backend``) or per call (``qdot(..., backend=...)``). It
declares what it consumes:

* ``quantizes_activations=False`` (e.g. ``xla``): the seam fake-quantizes the activation first and the backend
  multiplies a float ``x`` by the weight;
* ``quantizes_activations=True`` (e.g. ``pallas``): the backend receives the *unquantized* ``x`` together with
  the activation spec and calibrated parameters (`ActOperand`), so it can quantize ``x`` to integer codes
  and run an integer kernel (W8A8: int8 x int8 -> int32). It must compute what the fake-quantized reference
  computes: ``dot(fake_quant(x), w.dequantize())``, up to accumulation order.

Convolutions go through the same registry: a backend may define ``conv``; otherwise the seam lowers the
convolution to patches (`im2col`, ordered like the packed kernel's ``[kh * kw * C, O]`` view) and calls the
backend's ``matmul``; the activation is then quantized by the seam before the patches are cut (its per-token
scales belong to pixels, not to patch rows), so the backend receives it already quantized.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp

from bitlaws.quant.qarray import PackedArray
from bitlaws.quant.spec import QuantSpec

ConvPadding = Union[str, Sequence[tuple[int, int]]]


@dataclasses.dataclass(frozen=True)
class ActOperand:
    """The activation side of a packed matmul as a backend receives it.

    Attributes:
        spec: The layer's activation spec, or None (weight-only: ``x`` is used as it is).
        params: Calibrated parameters (``seam.ActQParams``) of a static spec, else None.
        quantized: Whether the seam already fake-quantized ``x`` (backends that do not quantize activations).
    """

    spec: Optional[QuantSpec] = None
    params: Optional[object] = None
    quantized: bool = False


NO_ACT = ActOperand()

MatmulFn = Callable[[jax.Array, PackedArray, ActOperand], jax.Array]
ConvFn = Callable[..., jax.Array]


@dataclasses.dataclass(frozen=True)
class Backend:
    """A packed-mode matmul implementation.

    Attributes:
        name: Registry name.
        matmul: ``(x [M, K], w: PackedArray of a [K, N] kernel, act: ActOperand) -> [M, N]`` in ``x.dtype``.
        quantizes_activations: True if `matmul` takes the unquantized ``x`` and applies ``act`` itself.
        conv: Optional ``(x [B, H, W, C], w: PackedArray of an HWIO kernel, act, *, strides, padding, dilation,
            feature_group_count) -> [B, H', W', O]``; None: patches + `matmul` (`conv_via_matmul`).
    """

    name: str
    matmul: MatmulFn
    quantizes_activations: bool = False
    conv: Optional[ConvFn] = None


_BACKENDS: dict[str, Backend] = {}
# Backends registered by a module that is imported when their name is first asked for (no Pallas import for
# users of ``xla``).
_PROVIDERS = {"pallas": "pallas_kernels", "pallas-interpret": "pallas_kernels"}


def register_backend(name: str, fn: Optional[MatmulFn] = None, *, quantizes_activations: bool = False,
                     conv: Optional[ConvFn] = None, replace: bool = False):
    """Registers a `Backend` called `name` whose matmul is `fn` (usable as a decorator without `fn`).

    Raises:
        ValueError: `name` is taken and `replace` is False.
    """

    def wrap(f: MatmulFn) -> MatmulFn:
        if name in _BACKENDS and not replace:
            raise ValueError(f"matmul backend {name!r} is already registered; pass replace=True to override it")
        _BACKENDS[name] = Backend(name=name, matmul=f, quantizes_activations=quantizes_activations, conv=conv)
        return f

    return wrap(fn) if fn is not None else wrap


def get_backend(name: str) -> Backend:
    """The backend registered as `name`.

    Raises:
        ValueError: unknown name (the message lists the registered ones).
    """
    if name not in _BACKENDS and name in _PROVIDERS:
        importlib.import_module(_PROVIDERS[name])
    if name not in _BACKENDS:
        raise ValueError(f"unknown matmul backend {name!r}; registered: {backend_names()}")
    return _BACKENDS[name]


def backend_names() -> list[str]:
    """Registered backends and those a known module registers on first use."""
    return sorted(set(_BACKENDS) | set(_PROVIDERS))


# ------------------------------------------------------------------------------------------------ conv


def conv_patches(x: jax.Array, kernel_shape: Sequence[int], *, strides: Sequence[int], padding: ConvPadding,
                 dilation: Sequence[int]) -> jax.Array:
    """im2col: ``x [B, H, W, C]`` -> patches ``[B, H', W', kh * kw * C]`` ordered (kh, kw, C), the order of a
    packed HWIO kernel's ``[kh * kw * C, O]`` view, so ``patches @ view == conv(x, kernel)``."""
    kh, kw = int(kernel_shape[0]), int(kernel_shape[1])
    sh, sw = (int(s) for s in strides)
    dh, dw = (int(d) for d in dilation)
    if isinstance(padding, str):
        pads = jax.lax.padtype_to_pads(x.shape[1:3], ((kh - 1) * dh + 1, (kw - 1) * dw + 1), (sh, sw), padding)
    else:
        pads = [tuple(p) for p in padding]
    x = jnp.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))
    out_h = (x.shape[1] - (kh - 1) * dh - 1) // sh + 1
    out_w = (x.shape[2] - (kw - 1) * dw - 1) // sw + 1
    taps = []
    for i in range(kh):
        for j in range(kw):
            taps.append(jax.lax.slice(
                x, (0, i * dh, j * dw, 0),
                (x.shape[0], i * dh + (out_h - 1) * sh + 1, j * dw + (out_w - 1) * sw + 1, x.shape[3]),
                (1, sh, sw, 1)))  # [B, H', W', C]
    return jnp.stack(taps, axis=3).reshape(x.shape[0], out_h, out_w, kh * kw * x.shape[3])


def conv_via_matmul(backend: Backend, x: jax.Array, w: PackedArray, act: ActOperand, *, strides: Sequence[int],
                    padding: ConvPadding, dilation: Sequence[int], feature_group_count: int) -> jax.Array:
    """A convolution of a packed HWIO kernel as patches times its ``[kh * kw * C, O]`` view, through
    ``backend.matmul`` (grouped convolutions are not lowered this way: ValueError naming the backend)."""
    if feature_group_count != 1:
        raise ValueError(f"matmul backend {backend.name!r} has no grouped convolution "
                         f"(feature_group_count={feature_group_count}); use backend 'xla' for this layer")
    patches = conv_patches(x, w.shape[:2], strides=strides, padding=padding, dilation=dilation)
    lead = patches.shape[:-1]
    y = backend.matmul(patches.reshape(-1, patches.shape[-1]), w, act)
    return y.reshape(*lead, y.shape[-1])


# ------------------------------------------------------------------------------------------------ xla


def xla_matmul(x: jax.Array, w: PackedArray, act: ActOperand = NO_ACT) -> jax.Array:
    """The reference backend for every storage type: dequantize the weight to ``x``'s dtype, one XLA dot."""
    del act
    return jnp.dot(x, w.dequantize(x.dtype).reshape(x.shape[-1], -1))


def xla_conv(x: jax.Array, w: PackedArray, act: ActOperand = NO_ACT, *, strides: Sequence[int],
             padding: ConvPadding, dilation: Sequence[int], feature_group_count: int) -> jax.Array:
    """Dequantize the HWIO kernel, one `jax.lax.conv_general_dilated`."""
    del act
    return jax.lax.conv_general_dilated(
        x, w.dequantize(x.dtype), window_strides=tuple(strides), padding=padding, rhs_dilation=tuple(dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=feature_group_count)


register_backend("xla", xla_matmul, conv=xla_conv)
