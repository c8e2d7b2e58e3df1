"""Shared pieces of the packed-matmul kernels: block configs, padding, platform dispatch, operand views."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as pltriton

from bitlaws.quant.qarray import QArray

@dataclasses.dataclass(frozen=True)
class BlockConfig:
    """A frozen tuning config: power-of-two blocks over (M, N, K) and Triton's warps / pipeline stages.

    ``block_m`` >= 16 (Triton's smallest dot); ``block_k`` is the K step of the in-kernel loop.
    """

    block_m: int = 16
    block_n: int = 64
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"BlockConfig.{name} must be a power of two >= 16, got {value}")

    def compiler_params(self) -> pltriton.CompilerParams:
        """Triton compiler params, passed explicitly: they select the Triton lowering of `pallas_call`."""
        return pltriton.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages)

    def for_m(self, m: int) -> "BlockConfig":
        """The config with ``block_m`` shrunk towards `m` (a decode step, M = 1, does not pad to 64 rows)."""
        block_m = max(16, min(self.block_m, 1 << max(m - 1, 0).bit_length()))
        return dataclasses.replace(self, block_m=block_m)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def largest_block(size: int, cap: int, floor: int = 16) -> Optional[int]:
    """The largest power of two in [floor, cap] dividing `size`, or None (then the caller pads)."""
    block = cap
    while block >= floor:
        if size % block == 0:
            return block
        block //= 2
    return None


def pad_axis(x: jax.Array, axis: int, multiple: int, value=0) -> jax.Array:
    """`x` padded at the end of `axis` to a multiple of `multiple` (no copy when it already is one)."""
    size = x.shape[axis]
    extra = round_up(size, multiple) - size
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def kernel_view_shape(w: QArray) -> tuple[int, int]:
    """``(K, N)`` of a packed weight's reduction view, checking it is a matmul kernel (``reduce_axes`` first)."""
    k, n = w.view_shape
    if w.reduce_axes != tuple(range(len(w.reduce_axes))):
        raise ValueError(f"packed matmul kernels need the reduction axes first (a [..., in, out] kernel view); "
                         f"got reduce_axes={w.reduce_axes} for shape {w.shape}")
    return k, n


def effective_scales(w: QArray) -> jax.Array:
    """The weight's effective float32 scales ``[G, N]`` (float16 mantissas times the per-tensor power of two,
    E8M0 decoded): a pass over 1/group_size of the weight count, done outside the kernel."""
    return w.scale_f32.reshape(w.scale.shape[0], -1)


def on_platform(kernel: Callable[..., jax.Array], fallback: Callable[..., jax.Array], *operands,
                interpret: bool = False) -> jax.Array:
    """``kernel(*operands)`` where it runs, chosen when the program is lowered, not from the host at trace time.

    ``interpret=True``: the Pallas interpreter on every platform (tests). Otherwise `jax.lax.platform_dependent`
    lowers the Triton kernel for CUDA and `fallback` (plain XLA) for every other platform, so a program traced
    on a CPU host and lowered for CUDA gets the kernel.
    """
    if interpret:
        return kernel(*operands, interpret=True)
    gpu = functools.partial(kernel, interpret=False)
    return jax.lax.platform_dependent(*operands, cuda=gpu, default=fallback)


def memory_bound_speedup(bits_per_weight: float, activation_bits: int = 16) -> float:
    """The weight-streaming limit of a low-bit matmul against a bf16 one: ``16 / bits per stored weight``."""
    return activation_bits / bits_per_weight


def bits_per_weight(w: QArray) -> float:
    """Stored bits per weight, scales and zero points included."""
    return 8.0 * w.nbytes / math.prod(w.shape)
