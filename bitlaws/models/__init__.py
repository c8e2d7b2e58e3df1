"""Flax NNX models; every matmul and conv goes through the quantization seam (QLinear / QConv)."""
