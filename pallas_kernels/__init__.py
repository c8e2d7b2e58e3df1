"""Pallas GPU kernels for the ``packed`` quantization mode, and the ``pallas`` seam backends.

One file per kernel, each with the kernel, a plain-jnp ``*_reference``, a frozen tuning config (``CONFIG``) and
an ``interpret: bool`` flag so it is tested on CPU:

* `int_kernel` - `int_matmul`: W2/W3/W4/W8 x A16, packed integer weights (3-bit in the project's packing) with
  group or channel scales (zero points for uint), dequantized in the kernel;
* `fp8_kernel` - `fp8_matmul`: E4M3 weights with per-channel (or group) scales;
* `mxfp4_kernel` - `mxfp4_matmul`: E2M1 elements with an E8M0 scale per 32 values;
* `w8a8_kernel` - `w8a8_matmul`: int8 x int8 -> int32 with per-token and per-channel scales.

The weight-only kernels share one skeleton, `dequant_matmul` (the packed layout read as stored, strided slices
per position in a packing unit, f32 accumulation, scales per group).

`matmul` dispatches on the weight's format; importing this package registers the seam backends ``pallas``
(Triton kernels on CUDA, the ``xla`` computation elsewhere, chosen at lowering time) and ``pallas-interpret``
(the Pallas interpreter anywhere). See `pallas_kernels.backend`.
"""

from pallas_kernels.backend import matmul, pallas_matmul
from pallas_kernels.fp8_kernel import fp8_matmul, fp8_matmul_reference
from pallas_kernels.int_kernel import int_matmul, int_matmul_reference
from pallas_kernels.mxfp4_kernel import mxfp4_matmul, mxfp4_matmul_reference
from pallas_kernels.w8a8_kernel import w8a8_matmul, w8a8_matmul_reference

__all__ = ["matmul", "pallas_matmul", "int_matmul", "int_matmul_reference", "fp8_matmul", "fp8_matmul_reference",
           "mxfp4_matmul", "mxfp4_matmul_reference", "w8a8_matmul", "w8a8_matmul_reference"]
