"""Pallas GPU kernels for the `packed` quantization mode.

Each kernel lives beside a plain-jnp `*_reference` and takes an `interpret: bool` flag so it is tested on CPU.
The packed-matmul kernels arrive with roadmap issue [7/8]; until then the `xla` backend
(`bitlaws.quant.seam.xla_dequant_matmul`) is the only registered backend.
"""
