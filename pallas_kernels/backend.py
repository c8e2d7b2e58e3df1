"""The ``pallas`` and ``pallas-interpret`` matmul backends of the seam, and `matmul`, the public entry.

Dispatch on the operands (first match):

1. **W8A8** - an int8 per-channel weight and an int8 activation spec (dynamic per token or static per tensor):
   `w8a8_kernel.w8a8_matmul` on the unquantized activation (the backend quantizes it to int8 codes itself);
2. **weight-only** - the activation is fake-quantized as the seam would (if the layer quantizes it), then the
   kernel of the weight's format: `int_kernel.int_matmul` (int/uint 2, 3, 4, 8 bits), `fp8_kernel.fp8_matmul`
   (E4M3), `mxfp4_kernel.mxfp4_matmul`;
3. a `QArray` of a format without a kernel: the ``xla`` backend, with a one-time notice naming the format;
   another storage type (GPTVQ's `VQArray`): ValueError naming it.

Platforms. ``pallas`` lowers the Triton kernels for CUDA and the ``xla`` backend's computation for every other
platform, chosen when the program is lowered (`common.on_platform`), so the same traced program lowered for
CUDA on a CPU-only host contains the kernels; on a host without a GPU it says so once. ``pallas-interpret``
runs the kernels in the Pallas interpreter on any platform (tests, debugging; slow).
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional

import jax

from bitlaws.quant import backends, seam
from bitlaws.quant.qarray import PackedArray, QArray
from pallas_kernels import common, fp8_kernel, int_kernel, mxfp4_kernel, w8a8_kernel

# Weight-only kernels, first match: (supports(w), kernel(x, w, interpret=)).
WEIGHT_ONLY = (
    (int_kernel.supports, int_kernel.int_matmul_kernel),
    (fp8_kernel.supports, fp8_kernel.fp8_matmul_kernel),
    (mxfp4_kernel.supports, mxfp4_kernel.mxfp4_matmul_kernel),
)

BACKENDS = ("pallas", "pallas-interpret")
_NOTICED: set[str] = set()


def _notice_once(key: str, message: str) -> None:
    if key not in _NOTICED:
        _NOTICED.add(key)
        warnings.warn(message, stacklevel=3)


def weight_only_kernel(w: PackedArray) -> Optional[Callable[..., jax.Array]]:
    """``kernel(x, w, interpret=...)`` of the weight's format, or None when no kernel covers it."""
    for supports, kernel in WEIGHT_ONLY:
        if supports(w):
            return kernel
    return None


def _fake_quantized(x: jax.Array, act: backends.ActOperand) -> jax.Array:
    if act.spec is None or act.quantized:
        return x
    return seam.quantize_activation(x, seam.LayerQuant(mode="fake", act=act.spec), act.params)


def pallas_matmul(x: jax.Array, w: PackedArray, act: backends.ActOperand = backends.NO_ACT, *,
                  interpret: bool = False) -> jax.Array:
    """The backend's matmul: ``[M, K] x packed [K, N] -> [M, N]`` in ``x.dtype`` (see the module docstring)."""
    if not isinstance(w, QArray):
        raise ValueError(f"the pallas backend has kernels for QArray weights only, got {type(w).__name__} "
                         f"({w!r}); use backend 'xla' for these layers")
    if not interpret and jax.default_backend() != "gpu":
        _notice_once("no-gpu", f"pallas backend: no GPU on this host ({jax.default_backend()}); programs lowered "
                               f"for it use the xla backend's computation (backend 'pallas-interpret' runs the "
                               f"kernels in the Pallas interpreter)")
    if act.spec is not None and not act.quantized and w8a8_kernel.supports(w, act.spec):
        codes, row_scale = w8a8_kernel.quantize_rows(x, act.spec, act.params)
        return common.on_platform(
            lambda c, s, interpret=False: w8a8_kernel.w8a8_matmul_kernel(c, s, w, out_dtype=x.dtype,
                                                                         interpret=interpret),
            lambda c, s: backends.xla_matmul(_fake_quantized(x, act), w), codes, row_scale, interpret=interpret)
    x = _fake_quantized(x, act)
    kernel = weight_only_kernel(w)
    if kernel is None:
        _notice_once(f"format:{w.spec.short()}", f"pallas backend: no kernel for {w.spec.short()} weights; "
                                                  f"those layers use the xla backend")
        return backends.xla_matmul(x, w)
    return common.on_platform(lambda x_, interpret=False: kernel(x_, w, interpret=interpret),
                              lambda x_: backends.xla_matmul(x_, w), x, interpret=interpret)


def matmul(x: jax.Array, w: QArray, *, backend: str = "pallas", interpret: bool = False,
           act: backends.ActOperand = backends.NO_ACT) -> jax.Array:
    """``x @ w`` for a packed weight, dispatching on its format (and on ``act`` for W8A8).

    Args:
        x: ``[M, K]`` activations (unquantized when ``act`` names a spec).
        w: The packed ``[K, N]`` weight.
        backend: ``pallas`` (kernels; interpreter with `interpret`) or any registered seam backend (``xla``).
        interpret: Run the kernels in the Pallas interpreter (any platform).
        act: The activation spec and calibrated parameters, for weight-activation quantization.

    Returns:
        ``[M, N]`` in ``x.dtype``.
    """
    if backend in BACKENDS:
        return pallas_matmul(x, w, act, interpret=interpret or backend == "pallas-interpret")
    chosen = backends.get_backend(backend)
    if not chosen.quantizes_activations:
        x = _fake_quantized(x, act)
        act = backends.ActOperand(spec=act.spec, params=act.params, quantized=act.spec is not None)
    return chosen.matmul(x, w, act)


backends.register_backend("pallas", pallas_matmul, quantizes_activations=True, replace=True)
backends.register_backend("pallas-interpret", lambda x, w, act=backends.NO_ACT: pallas_matmul(x, w, act,
                                                                                             interpret=True),
                          quantizes_activations=True, replace=True)
