"""The FID Inception-v3 network (pytorch-fid's ``FIDInception*`` variant of torchvision's `Inception3`), NHWC.

This is the network behind every published FID number: torchvision's Inception-v3 trunk with the
2015-12-05 TensorFlow weights, whose pool branches differ from the stock torchvision blocks:

* ``Mixed_5b/5c/5d`` (A), ``Mixed_6b..6e`` (C) and ``Mixed_7b`` (E_1) average-pool 3x3, stride 1, pad 1
  with ``count_include_pad=False`` (border windows divide by the number of real pixels);
* ``Mixed_7c`` (E_2) uses a 3x3, stride 1, pad 1 **max** pool in its pool branch;
* ``Mixed_6a`` (B) and ``Mixed_7a`` (D) are the stock blocks.

`BasicConv2d` is a bias-free conv, an inference BatchNorm with eps 0.001 and a ReLU. The input is resized to
299x299 with PyTorch's bilinear ``align_corners=False`` rule (no antialias, also when downsampling) and mapped
from [0, 1] to [-1, 1]. Module and attribute names follow torchvision (``Conv2d_1a_3x3``, ``Mixed_5b``,
``branch1x1``, ``conv``, ``bn``) so the port table is a rename of leaf names only.

pytorch-fid groups the trunk into four blocks whose outputs `FIDInceptionV3.features` exposes:
block 0 = Conv2d_1a (stride 2), 2a, 2b, max pool 3/2 -> ``[B, 73, 73, 64]``; block 1 = 3b, 4a, max pool 3/2
-> ``[B, 35, 35, 192]``; block 2 = Mixed_5b..6e -> ``[B, 17, 17, 768]``; block 3 = Mixed_7a..7c + global average
pool -> ``[B, 1, 1, 2048]`` (the pool3 features).
"""

from __future__ import annotations

import functools
from typing import Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bitlaws.quant import seam
from bitlaws.quant.layers import QConv, QLinear

INPUT_SIZE = 299
POOL3_FEATURES = 2048
NUM_LOGITS = 1008
BATCHNORM_EPS = 1e-3

Padding = Union[int, tuple[tuple[int, int], tuple[int, int]]]


# ----------------------------------------------------------------------------------------------------------
# Input handling
# ----------------------------------------------------------------------------------------------------------

def _layout_error(images, problem: str) -> ValueError:
    shape, dtype = tuple(np.shape(images)), getattr(images, "dtype", type(images).__name__)
    return ValueError(
        "FID Inception expects images as an NHWC array [batch, height, width, 3], either float in [0, 1] or "
        f"uint8 in [0, 255]; {problem} (got shape {shape}, dtype {dtype})")


def validate_images(images) -> None:
    """Checks the layout, dtype and (for concrete float arrays) the range of an image batch.

    Args:
        images: ``[B, H, W, 3]`` float in [0, 1] or uint8.

    Raises:
        ValueError: describing the expected layout when rank, channel count, dtype or range is wrong.
    """
    if not hasattr(images, "dtype"):
        images = np.asarray(images)
    if images.ndim != 4:
        raise _layout_error(images, f"rank {images.ndim} instead of 4")
    if images.shape[-1] != 3:
        hint = " (this looks like NCHW: transpose with (0, 2, 3, 1))" if images.shape[1] == 3 else ""
        raise _layout_error(images, f"the last axis has {images.shape[-1]} channels instead of 3{hint}")
    dtype = np.dtype(images.dtype)
    if dtype == np.uint8:
        return
    if not np.issubdtype(dtype, np.floating):
        raise _layout_error(images, f"dtype {dtype} is neither floating nor uint8")
    if isinstance(images, jax.core.Tracer):
        return
    values = np.asarray(images)
    if values.size and not (np.isfinite(values).all() and values.min() >= 0.0 and values.max() <= 1.0):
        raise _layout_error(images, f"values span [{values.min()}, {values.max()}], outside [0, 1] "
                                    f"(for [-1, 1] images pass (x + 1) / 2)")


def preprocess_uint8(images: jax.Array) -> jax.Array:
    """uint8 ``[B, H, W, 3]`` in [0, 255] -> float32 ``[B, H, W, 3]`` in [0, 1] (``x / 255``, like ``ToTensor``)."""
    if np.dtype(images.dtype) != np.uint8:
        raise _layout_error(images, "preprocess_uint8 needs a uint8 array")
    validate_images(images)
    return jnp.asarray(images, jnp.float32) / 255.0


@functools.lru_cache(maxsize=32)
def bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The two taps of PyTorch's ``F.interpolate(mode='bilinear', align_corners=False)`` along one axis.

    Source index ``s = (i + 0.5) * in/out - 0.5``, clamped below at 0 (float32 arithmetic, as PyTorch's
    CPU kernel); taps ``floor(s)`` and ``min(floor(s) + 1, in - 1)`` with weights ``1 - frac`` and ``frac``.
    No antialiasing, so it is exact for down-sampling as well.

    Returns:
        ``(low, high, frac)``: ``[out_size]`` int64 source indices and float32 weight of ``high``.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    dst = np.arange(out_size, dtype=np.float32)
    src = np.maximum(scale * (dst + np.float32(0.5)) - np.float32(0.5), np.float32(0.0))  # [out]
    low = np.minimum(np.floor(src).astype(np.int64), in_size - 1)  # [out]
    high = np.minimum(low + 1, in_size - 1)  # [out]
    return low, high, src - low.astype(np.float32)


@functools.lru_cache(maxsize=32)
def bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
    """`bilinear_taps` as an interpolation matrix ``[out_size, in_size]`` float32, rows summing to 1."""
    low, high, frac = bilinear_taps(in_size, out_size)
    matrix = np.zeros((out_size, in_size), np.float32)
    rows = np.arange(out_size)
    np.add.at(matrix, (rows, low), np.float32(1.0) - frac)
    np.add.at(matrix, (rows, high), frac)
    return matrix


def _interpolate_axis(x: jax.Array, axis: int, size: int) -> jax.Array:
    """Two-tap linear interpolation of `x` along `axis` to `size` (`bilinear_taps`)."""
    low, high, frac = bilinear_taps(x.shape[axis], size)
    shape = [1] * x.ndim
    shape[axis] = size
    frac = jnp.asarray(frac.reshape(shape), x.dtype)
    return jnp.take(x, low, axis=axis) * (1 - frac) + jnp.take(x, high, axis=axis) * frac


def resize_bilinear(images: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
    """Bilinear resize, ``align_corners=False``, no antialias (PyTorch semantics): rows, then columns.

    Two taps per output pixel gathered along each axis (4x faster on XLA:CPU than two products with the
    `bilinear_matrix`, which has the same numbers).

    Args:
        images: ``[B, H, W, C]`` float.
        size: Output height and width.

    Returns:
        ``[B, size, size, C]`` with the input dtype.
    """
    return _interpolate_axis(_interpolate_axis(images, 1, size), 2, size)


# ----------------------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------------------

class FrozenBatchNorm(nnx.Module):
    """Inference BatchNorm over the last axis: ``(x - mean) / sqrt(var + eps) * scale + bias``.

    ``scale``/``bias`` are `nnx.Param` (PyTorch ``weight``/``bias``); ``mean``/``var`` are `nnx.BatchStat`
    (``running_mean``/``running_var``), i.e. non-trainable state.
    """

    def __init__(self, features: int, *, eps: float = BATCHNORM_EPS):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((features,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((features,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[..., C] -> [..., C]``."""
        multiplier = self.scale[...] / jnp.sqrt(self.var[...] + self.eps)  # [C]
        return x * multiplier + (self.bias[...] - self.mean[...] * multiplier)


class BasicConv2d(nnx.Module):
    """Bias-free conv + BatchNorm(eps 0.001) + ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Union[int, tuple[int, int]], *,
                 strides: int = 1, padding: Padding = 0, rngs: nnx.Rngs):
        self.conv = QConv(in_channels, out_channels, kernel_size, strides=strides,
                          padding="VALID" if padding == 0 else padding, use_bias=False, rngs=rngs)
        self.bn = FrozenBatchNorm(out_channels)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, H, W, in] -> [B, H', W', out]``."""
        return self.activate(self.conv(x))

    def activate(self, y: jax.Array) -> jax.Array:
        """BatchNorm + ReLU of conv outputs ``[..., out]``."""
        return jax.nn.relu(self.bn(y))

    @property
    def plain(self) -> bool:
        """Whether the conv is a plain bias-free float conv (not quantized, calibrating or smoothed): then it is
        linear and may be fused with other 1x1 convs or moved across an average pool."""
        quant = self.conv.quant
        return (not quant.quantizes_weights and not quant.quantizes_acts and quant.mode != "calibrate"
                and self.conv.input_scale is None and self.conv.kernel is not None and self.conv.bias is None)


def _pad_hw(pad_h: int, pad_w: int) -> tuple[tuple[int, int], tuple[int, int]]:
    return ((pad_h, pad_h), (pad_w, pad_w))


def _window_reduce(x: jax.Array, axis: int, window: int, stride: int, combine) -> jax.Array:
    """``combine`` of the `window` strided slices along `axis` (a 1-D pooling pass; floor mode)."""
    out = (x.shape[axis] - window) // stride + 1
    taps = [jax.lax.slice_in_dim(x, i, i + (out - 1) * stride + 1, stride, axis) for i in range(window)]
    return functools.reduce(combine, taps)


def max_pool(x: jax.Array, window: int, stride: int, padding: int = 0) -> jax.Array:
    """Max pool over H, W (padding with -inf, floor mode). ``[B, H, W, C] -> [B, H', W', C]``.

    Two separable passes of strided-slice maxima: XLA:CPU fuses them into elementwise loops; with its
    ``reduce_window`` the 13 pools of a 32-image batch ran 2.7x slower (`python benchmarks/conv_forms.py`).
    """
    if padding:
        x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)), constant_values=-jnp.inf)
    return _window_reduce(_window_reduce(x, 1, window, stride, jnp.maximum), 2, window, stride, jnp.maximum)


@functools.lru_cache(maxsize=32)
def _valid_counts_3x3(height: int, width: int) -> np.ndarray:
    """Number of real pixels in each padded 3x3 stride-1 window, ``[H, W, 1]`` float32."""
    def along(n: int) -> np.ndarray:
        i = np.arange(n)
        return (np.minimum(i + 1, n - 1) - np.maximum(i - 1, 0) + 1).astype(np.float32)  # [n]
    return np.outer(along(height), along(width))[:, :, None]


def avg_pool_3x3_exclude_pad(x: jax.Array) -> jax.Array:
    """``avg_pool2d(3, stride=1, padding=1, count_include_pad=False)``. ``[B, H, W, C] -> [B, H, W, C]``."""
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    window_sum = _window_reduce(_window_reduce(padded, 1, 3, 1, jnp.add), 2, 3, 1, jnp.add)  # separable sums
    return window_sum / jnp.asarray(_valid_counts_3x3(x.shape[1], x.shape[2]), x.dtype)


def pointwise_branches(x: jax.Array, layers: Sequence[BasicConv2d], pooled_last: bool = False) -> list[jax.Array]:
    """The 1x1 branch convs reading the same input, as one matmul when they are plain.

    With ``pooled_last`` the last layer is a pool branch, ``layer(avg_pool_3x3_exclude_pad(x))``: a plain 1x1
    conv (no bias) commutes with that pool (both linear, the pool's divisor is per pixel), so the pool runs on
    its few output channels instead of the block's input channels.

    Args:
        x: ``[B, H, W, C]``.
        layers: `BasicConv2d` with 1x1 kernels, stride 1, no padding, no bias.

    Returns:
        Each layer's output ``[B, H, W, out_i]``.
    """
    if not all(layer.plain for layer in layers) or len({layer.conv.quant for layer in layers}) != 1:
        inputs = [x] * len(layers)
        if pooled_last:
            inputs[-1] = avg_pool_3x3_exclude_pad(x)
        return [layer(h) for layer, h in zip(layers, inputs)]
    widths = [layer.conv.out_features for layer in layers]
    kernel = jnp.concatenate([layer.conv.kernel[...].reshape(x.shape[-1], -1) for layer in layers], axis=-1)
    y = seam.qdot(x, kernel, layers[0].conv.quant)  # [B, H, W, sum(out_i)]
    parts = jnp.split(y, np.cumsum(widths)[:-1], axis=-1)
    if pooled_last:
        parts[-1] = avg_pool_3x3_exclude_pad(parts[-1])
    return [layer.activate(part) for layer, part in zip(layers, parts)]


# ----------------------------------------------------------------------------------------------------------
# Inception blocks (pytorch-fid FID variants and stock torchvision B / D)
# ----------------------------------------------------------------------------------------------------------

class FIDInceptionA(nnx.Module):
    """Mixed_5b/5c/5d: 1x1 | 1x1->5x5 | 1x1->3x3->3x3 | avgpool(exclude pad)->1x1. Out ``224 + pool_features``."""

    def __init__(self, in_channels: int, pool_features: int, *, rngs: nnx.Rngs):
        self.branch1x1 = BasicConv2d(in_channels, 64, 1, rngs=rngs)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1, rngs=rngs)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1, rngs=rngs)
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, H, W, in] -> [B, H, W, 224 + pool_features]``."""
        b1, b5, b3, bp = pointwise_branches(x, (self.branch1x1, self.branch5x5_1, self.branch3x3dbl_1,
                                                self.branch_pool), pooled_last=True)
        b5 = self.branch5x5_2(b5)
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(b3))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nnx.Module):
    """Mixed_6a (stock): 3x3/2 | 1x1->3x3->3x3/2 | maxpool 3/2. Out ``384 + 96 + in``."""

    def __init__(self, in_channels: int, *, rngs: nnx.Rngs):
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, strides=2, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, strides=2, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, H, W, in] -> [B, (H-3)//2+1, (W-3)//2+1, 480 + in]``."""
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([b3, bd, max_pool(x, 3, 2)], axis=-1)


class FIDInceptionC(nnx.Module):
    """Mixed_6b..6e: factorised 7x7 branches, avgpool(exclude pad)->1x1. Out 768."""

    def __init__(self, in_channels: int, channels_7x7: int, *, rngs: nnx.Rngs):
        c7 = channels_7x7
        row, col = _pad_hw(0, 3), _pad_hw(3, 0)  # (1, 7) and (7, 1) kernels
        self.branch1x1 = BasicConv2d(in_channels, 192, 1, rngs=rngs)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1, rngs=rngs)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=row, rngs=rngs)
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=col, rngs=rngs)
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1, rngs=rngs)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=col, rngs=rngs)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=row, rngs=rngs)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=col, rngs=rngs)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=row, rngs=rngs)
        self.branch_pool = BasicConv2d(in_channels, 192, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, H, W, in] -> [B, H, W, 768]``."""
        b1, b7, bd, bp = pointwise_branches(x, (self.branch1x1, self.branch7x7_1, self.branch7x7dbl_1,
                                                self.branch_pool), pooled_last=True)
        b7 = self.branch7x7_3(self.branch7x7_2(b7))
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nnx.Module):
    """Mixed_7a (stock): 1x1->3x3/2 | 1x1->1x7->7x1->3x3/2 | maxpool 3/2. Out ``320 + 192 + in``."""

    def __init__(self, in_channels: int, *, rngs: nnx.Rngs):
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1, rngs=rngs)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, strides=2, rngs=rngs)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1, rngs=rngs)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=_pad_hw(0, 3), rngs=rngs)
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=_pad_hw(3, 0), rngs=rngs)
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, strides=2, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, H, W, in] -> [B, (H-3)//2+1, (W-3)//2+1, 512 + in]``."""
        b3, b7 = pointwise_branches(x, (self.branch3x3_1, self.branch7x7x3_1))
        b3 = self.branch3x3_2(b3)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        return jnp.concatenate([b3, b7, max_pool(x, 3, 2)], axis=-1)


class FIDInceptionE(nnx.Module):
    """Mixed_7b (``pool='avg'``, E_1, exclude pad) and Mixed_7c (``pool='max'``, E_2). Out 2048."""

    def __init__(self, in_channels: int, *, pool: str, rngs: nnx.Rngs):
        if pool not in ("avg", "max"):
            raise ValueError(f"FIDInceptionE pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        row, col = _pad_hw(0, 1), _pad_hw(1, 0)  # (1, 3) and (3, 1) kernels
        self.branch1x1 = BasicConv2d(in_channels, 320, 1, rngs=rngs)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1, rngs=rngs)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=row, rngs=rngs)
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=col, rngs=rngs)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1, rngs=rngs)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1, rngs=rngs)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=row, rngs=rngs)
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=col, rngs=rngs)
        self.branch_pool = BasicConv2d(in_channels, 192, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, H, W, in] -> [B, H, W, 2048]``."""
        if self.pool == "avg":
            b1, b3, bd, bp = pointwise_branches(x, (self.branch1x1, self.branch3x3_1, self.branch3x3dbl_1,
                                                    self.branch_pool), pooled_last=True)
        else:  # a max pool does not commute with the conv
            b1, b3, bd = pointwise_branches(x, (self.branch1x1, self.branch3x3_1, self.branch3x3dbl_1))
            bp = self.branch_pool(max_pool(x, 3, 1, padding=1))
        b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
        bd = self.branch3x3dbl_2(bd)
        bd = jnp.concatenate([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], axis=-1)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


# ----------------------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------------------

class FIDInceptionV3(nnx.Module):
    """pytorch-fid's FID Inception-v3 (``InceptionV3(resize_input=True, normalize_input=True,
    use_fid_inception=True)``) with torchvision `Inception3` parameter names.

    Args:
        rngs: NNX RNG streams (``params``); ported weights overwrite the random initialisation.
        include_fc: Build the 2048 -> 1008 ``fc`` classifier (needed for logits, e.g. Inception Score).
            pytorch-fid's wrapper state dict has no ``fc``; a model ported from it is built without one.
    """

    def __init__(self, rngs: nnx.Rngs, *, include_fc: bool = True):
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, strides=2, rngs=rngs)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, rngs=rngs)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, rngs=rngs)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, rngs=rngs)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, rngs=rngs)
        self.Mixed_5b = FIDInceptionA(192, 32, rngs=rngs)
        self.Mixed_5c = FIDInceptionA(256, 64, rngs=rngs)
        self.Mixed_5d = FIDInceptionA(288, 64, rngs=rngs)
        self.Mixed_6a = InceptionB(288, rngs=rngs)
        self.Mixed_6b = FIDInceptionC(768, 128, rngs=rngs)
        self.Mixed_6c = FIDInceptionC(768, 160, rngs=rngs)
        self.Mixed_6d = FIDInceptionC(768, 160, rngs=rngs)
        self.Mixed_6e = FIDInceptionC(768, 192, rngs=rngs)
        self.Mixed_7a = InceptionD(768, rngs=rngs)
        self.Mixed_7b = FIDInceptionE(1280, pool="avg", rngs=rngs)
        self.Mixed_7c = FIDInceptionE(2048, pool="max", rngs=rngs)
        self.fc = QLinear(POOL3_FEATURES, NUM_LOGITS, rngs=rngs) if include_fc else None

    def prepare(self, images: jax.Array) -> jax.Array:
        """Validates, converts uint8, resizes to 299x299 (bilinear, align_corners=False) and maps to [-1, 1].

        Args:
            images: ``[B, H, W, 3]`` float in [0, 1] or uint8.

        Returns:
            ``[B, 299, 299, 3]`` float32 in [-1, 1].
        """
        validate_images(images)
        if np.dtype(images.dtype) == np.uint8:
            images = preprocess_uint8(images)
        x = resize_bilinear(jnp.asarray(images, jnp.float32), INPUT_SIZE)  # [B, 299, 299, 3]
        return 2.0 * x - 1.0

    def _blocks(self, x: jax.Array) -> list[jax.Array]:
        """The four pytorch-fid block outputs for a prepared ``[B, 299, 299, 3]`` input (NHWC)."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        block0 = max_pool(x, 3, 2)  # [B, 73, 73, 64]
        block1 = max_pool(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(block0)), 3, 2)  # [B, 35, 35, 192]
        x = block1
        for mixed in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a,
                      self.Mixed_6b, self.Mixed_6c, self.Mixed_6d, self.Mixed_6e):
            x = mixed(x)
        block2 = x  # [B, 17, 17, 768]
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(block2)))  # [B, 8, 8, 2048]
        block3 = jnp.mean(x, axis=(1, 2), keepdims=True)  # [B, 1, 1, 2048]
        return [block0, block1, block2, block3]

    def features(self, images: jax.Array, return_blocks: bool = False
                 ) -> Union[jax.Array, tuple[jax.Array, list[jax.Array]]]:
        """pool3 features, optionally with every block output (debugging / layer-wise parity).

        Args:
            images: ``[B, H, W, 3]`` float in [0, 1] or uint8.
            return_blocks: Also return the four block outputs.

        Returns:
            pool3 ``[B, 2048]`` float32; with ``return_blocks``, ``(pool3, [block0 [B, 73, 73, 64],
            block1 [B, 35, 35, 192], block2 [B, 17, 17, 768], block3 [B, 1, 1, 2048]])`` (NHWC).
        """
        blocks = self._blocks(self.prepare(images))
        pool3 = blocks[-1][:, 0, 0, :]  # [B, 2048]
        return (pool3, blocks) if return_blocks else pool3

    def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Images -> ``(pool3 [B, 2048], logits [B, 1008])`` (float32).

        Args:
            images: ``[B, H, W, 3]`` float in [0, 1] or uint8, any H and W.

        Raises:
            ValueError: for a bad layout, dtype or range, or when the model was built without ``fc``.
        """
        if self.fc is None:
            raise ValueError("this FIDInceptionV3 has no fc layer (built with include_fc=False, e.g. ported from "
                             "pytorch-fid's wrapper state dict); use .features(images) for pool3 features")
        pool3 = self.features(images)
        return pool3, self.fc(pool3)


def block_names() -> tuple[tuple[str, ...], ...]:
    """torchvision module names in pytorch-fid block order (block 0, 1, 2, 3)."""
    return (("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"), ("Conv2d_3b_1x1", "Conv2d_4a_3x3"),
            ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"),
            ("Mixed_7a", "Mixed_7b", "Mixed_7c"))
