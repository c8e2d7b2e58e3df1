"""VAR's multi-scale residual VQ tokenizer (``VQVAE``) in Flax NNX.

Port of FoundationVision/VAR ``models/vqvae.py``, ``models/quant.py`` and ``models/basic_vae.py``
(commit ``78b95394``). Everything is NHWC; token maps are lists of int32 ``[B, pn*pn]`` arrays in
row-major order, one per scale.

Architecture (fixed by upstream): ``ch_mult=(1, 1, 2, 2, 4)``, two res blocks per encoder level and
three per decoder level, single-head self-attention after every res block of the lowest-resolution
level and in the middle, GroupNorm with 32 groups and eps 1e-6. The quantizer quantizes the residual
scale by scale: ``area``-downsample, nearest code, bicubic-upsample, refine with a ``Phi`` conv, add to
``f_hat``, subtract from the residual.

The resampling operators are written as small constant matrices computed in numpy (float64, cast to
float32), applied separably with einsum, so they are exact ports of PyTorch's ``F.interpolate`` and
fold into constants under jit.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bitlaws.models.common import GroupNorm
from bitlaws.quant.layers import QConv, QLinear

CH_MULT = (1, 1, 2, 2, 4)
NUM_RES_BLOCKS = 2
NORM_GROUPS = 32
NORM_EPS = 1e-6
BICUBIC_A = -0.75
NORMALIZE_EPS = 1e-12  # F.normalize's default eps


# ----------------------------------------------------------------------------------------------
# Resampling matrices (PyTorch F.interpolate semantics) and the phi index mapping.
# ----------------------------------------------------------------------------------------------

def _cubic_weights(t: float, a: float = BICUBIC_A) -> tuple[float, float, float, float]:
    """Keys cubic-convolution weights of the taps at offsets -1, 0, 1, 2 for fraction ``t`` in [0, 1)."""

    def near(x: float) -> float:  # |x| <= 1
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0

    def far(x: float) -> float:  # 1 < |x| < 2
        return ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a

    return far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)


@functools.lru_cache(maxsize=None)
def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """1-D bicubic resampling matrix of ``F.interpolate(mode='bicubic', align_corners=False)``.

    Source coordinate ``(o + 0.5) * in/out - 0.5`` (not clamped), Keys kernel with a = -0.75, the four
    source indices clamped to ``[0, in_size - 1]`` (weights of clamped taps accumulate on the border).

    Args:
        in_size: Input length.
        out_size: Output length.

    Returns:
        ``[out_size, in_size]`` float64 matrix (read-only).
    """
    scale = in_size / out_size
    matrix = np.zeros((out_size, in_size), np.float64)
    for o in range(out_size):
        source = scale * (o + 0.5) - 0.5
        base = int(np.floor(source))
        weights = _cubic_weights(source - base)
        for offset, weight in zip((-1, 0, 1, 2), weights):
            matrix[o, min(max(base + offset, 0), in_size - 1)] += weight
    matrix.setflags(write=False)
    return matrix


@functools.lru_cache(maxsize=None)
def area_matrix(in_size: int, out_size: int) -> np.ndarray:
    """1-D ``F.interpolate(mode='area')`` (adaptive average pooling) matrix.

    Output ``o`` averages inputs ``[floor(o*in/out), ceil((o+1)*in/out))``; windows overlap when the sizes
    do not divide.

    Args:
        in_size: Input length.
        out_size: Output length.

    Returns:
        ``[out_size, in_size]`` float64 matrix (read-only).
    """
    matrix = np.zeros((out_size, in_size), np.float64)
    for o in range(out_size):
        start = (o * in_size) // out_size
        end = -((-(o + 1) * in_size) // out_size)
        matrix[o, start:end] = 1.0 / (end - start)
    matrix.setflags(write=False)
    return matrix


def resample(x: jax.Array, rows: Union[np.ndarray, jax.Array], cols: Union[np.ndarray, jax.Array]) -> jax.Array:
    """Applies separable matrices: ``[B, H, W, C] -> [B, H', W', C]`` with rows ``[H', H]``, cols ``[W', W]``."""
    rows = jnp.asarray(rows, dtype=x.dtype)
    cols = jnp.asarray(cols, dtype=x.dtype)
    return jnp.einsum("ph,qw,bhwc->bpqc", rows, cols, x)


def bicubic_resize(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """PyTorch-compatible bicubic resize (``align_corners=False``, a = -0.75).

    Args:
        x: ``[B, H, W, C]`` float.
        size: ``(H', W')``.

    Returns:
        ``[B, H', W', C]``, same dtype.
    """
    h, w = x.shape[1:3]
    return resample(x, bicubic_matrix(h, size[0]), bicubic_matrix(w, size[1]))


def area_resize(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """PyTorch ``F.interpolate(mode='area')``: ``[B, H, W, C] -> [B, H', W', C]``."""
    h, w = x.shape[1:3]
    return resample(x, area_matrix(h, size[0]), area_matrix(w, size[1]))


def num_phi(share_quant_resi: int, num_scales: int, default_qresi_counts: int = 0) -> int:
    """Number of ``Phi`` convs upstream builds (0: one per scale or ``default_qresi_counts``; 1: one)."""
    if share_quant_resi == 0:
        return default_qresi_counts or num_scales
    if share_quant_resi == 1:
        return 1
    return share_quant_resi


def phi_index(si: int, sn: int, share_quant_resi: int, default_qresi_counts: int = 0) -> int:
    """Which ``Phi`` conv scale ``si`` of ``sn`` uses (upstream ``quant_resi[si / (sn - 1)]``).

    ``ticks = linspace(1/12, 11/12, 4)`` when there are 4 convs, else ``linspace(1/(2K), 1 - 1/(2K), K)``;
    the index is the first argmin of ``|ticks - si/(sn-1)|``, all in float64 numpy (ties such as 0.5 are
    decided by float64 rounding, exactly as upstream).

    Args:
        si: Scale index, ``0 <= si < sn``.
        sn: Number of scales (at least 2, as upstream divides by ``sn - 1``).
        share_quant_resi: Upstream's sharing mode (0 none, 1 fully shared, K > 1 K shared convs).
        default_qresi_counts: Number of convs when ``share_quant_resi == 0`` (0: one per scale).

    Returns:
        The conv index.
    """
    if sn < 2:
        raise ValueError(f"phi_index needs at least 2 scales (upstream divides by sn - 1), got sn={sn}")
    if share_quant_resi == 1:
        return 0
    k = num_phi(share_quant_resi, sn, default_qresi_counts)
    if k == 4:
        ticks = np.linspace(1 / 3 / k, 1 - 1 / 3 / k, k)
    else:
        ticks = np.linspace(1 / 2 / k, 1 - 1 / 2 / k, k)
    return int(np.argmin(np.abs(ticks - si / (sn - 1))))


# ----------------------------------------------------------------------------------------------
# Building blocks (basic_vae.py).
# ----------------------------------------------------------------------------------------------

class ResnetBlock(nnx.Module):
    """GN-SiLU-conv3x3-GN-SiLU-conv3x3 plus a (1x1 ``nin_shortcut`` when channels change) skip."""

    def __init__(self, in_channels: int, out_channels: int, *, rngs: nnx.Rngs):
        self.norm1 = GroupNorm(in_channels, num_groups=NORM_GROUPS, eps=NORM_EPS)
        self.conv1 = QConv(in_channels, out_channels, 3, padding=1, rngs=rngs)
        self.norm2 = GroupNorm(out_channels, num_groups=NORM_GROUPS, eps=NORM_EPS)
        self.conv2 = QConv(out_channels, out_channels, 3, padding=1, rngs=rngs)
        self.nin_shortcut = (QLinear(in_channels, out_channels, rngs=rngs)
                             if in_channels != out_channels else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, H, W, Cin] -> [B, H, W, Cout]``."""
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nnx.Module):
    """Single-head self-attention over all positions; q, k, v from one 1x1 conv (3C), scale C^-0.5."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        self.channels = channels
        self.norm = GroupNorm(channels, num_groups=NORM_GROUPS, eps=NORM_EPS)
        self.qkv = QLinear(channels, 3 * channels, rngs=rngs)
        self.proj_out = QLinear(channels, channels, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, H, W, C] -> [B, H, W, C]``."""
        b, h, w, c = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, h * w, 3 * c)  # [B, HW, 3C]
        q, k, v = qkv[..., :c], qkv[..., c:2 * c], qkv[..., 2 * c:]  # [B, HW, C] each
        logits = jnp.einsum("bqc,bkc->bqk", q, k) * (c ** -0.5)  # [B, HW, HW]
        weights = jax.nn.softmax(logits, axis=-1)
        attended = jnp.einsum("bqk,bkc->bqc", weights, v).reshape(b, h, w, c)
        return x + self.proj_out(attended)


class Downsample2x(nnx.Module):
    """Zero pad right/bottom by one, then 3x3 conv with stride 2 and no padding."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        self.conv = QConv(channels, channels, 3, strides=2, padding=((0, 1), (0, 1)), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, H, W, C] -> [B, H/2, W/2, C]``."""
        return self.conv(x)


class Upsample2x(nnx.Module):
    """Nearest-neighbour x2, then 3x3 conv."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        self.conv = QConv(channels, channels, 3, padding=1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, H, W, C] -> [B, 2H, 2W, C]``."""
        return self.conv(x, upsample=2)


class Level(nnx.Module):
    """One resolution level: res blocks, optional attention after each, optional resampling.

    Attribute names follow upstream (``block``, ``attn``, ``downsample`` / ``upsample``).
    """

    def __init__(self, channels_in: int, channels_out: int, num_blocks: int, *, with_attn: bool,
                 resample: Optional[str], rngs: nnx.Rngs):
        blocks = []
        for i in range(num_blocks):
            blocks.append(ResnetBlock(channels_in if i == 0 else channels_out, channels_out, rngs=rngs))
        self.block = nnx.List(blocks)
        self.attn = nnx.List([AttnBlock(channels_out, rngs=rngs) for _ in range(num_blocks)]
                             if with_attn else [])
        self.downsample = Downsample2x(channels_out, rngs=rngs) if resample == "down" else None
        self.upsample = Upsample2x(channels_out, rngs=rngs) if resample == "up" else None

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, H, W, Cin] -> [B, H', W', Cout]``."""
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        if self.downsample is not None:
            x = self.downsample(x)
        if self.upsample is not None:
            x = self.upsample(x)
        return x


class MidBlock(nnx.Module):
    """``block_1`` -> ``attn_1`` -> ``block_2`` at constant width."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        self.block_1 = ResnetBlock(channels, channels, rngs=rngs)
        self.attn_1 = AttnBlock(channels, rngs=rngs)
        self.block_2 = ResnetBlock(channels, channels, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nnx.Module):
    """Image ``[B, H, W, 3]`` -> features ``[B, H/16, W/16, z_channels]``.

    Args:
        ch: Base width.
        z_channels: Output channels.
        ch_mult: Width multipliers per level (downsampling after every level but the last).
        num_res_blocks: Res blocks per level.
        in_channels: Image channels.
    """

    def __init__(self, *, ch: int, z_channels: int, ch_mult: Sequence[int] = CH_MULT,
                 num_res_blocks: int = NUM_RES_BLOCKS, in_channels: int = 3, rngs: nnx.Rngs):
        num_levels = len(ch_mult)
        self.conv_in = QConv(in_channels, ch, 3, padding=1, rngs=rngs)
        levels = []
        width = ch
        for i, mult in enumerate(ch_mult):
            last = i == num_levels - 1
            levels.append(Level(width, ch * mult, num_res_blocks, with_attn=last,
                                resample=None if last else "down", rngs=rngs))
            width = ch * mult
        self.down = nnx.List(levels)
        self.mid = MidBlock(width, rngs=rngs)
        self.norm_out = GroupNorm(width, num_groups=NORM_GROUPS, eps=NORM_EPS)
        self.conv_out = QConv(width, z_channels, 3, padding=1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, H, W, 3] -> [B, H/16, W/16, z_channels]``."""
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(jax.nn.silu(self.norm_out(h)))


class Decoder(nnx.Module):
    """Features ``[B, h, w, z_channels]`` -> image ``[B, 16h, 16w, 3]`` (not clamped).

    ``up`` is stored in level order (index 0 = highest resolution), as upstream's state dict, and run
    from the last level to the first.
    """

    def __init__(self, *, ch: int, z_channels: int, ch_mult: Sequence[int] = CH_MULT,
                 num_res_blocks: int = NUM_RES_BLOCKS, out_channels: int = 3, rngs: nnx.Rngs):
        num_levels = len(ch_mult)
        width = ch * ch_mult[-1]
        self.conv_in = QConv(z_channels, width, 3, padding=1, rngs=rngs)
        self.mid = MidBlock(width, rngs=rngs)
        levels: list[Level] = []
        for i in reversed(range(num_levels)):
            levels.insert(0, Level(width, ch * ch_mult[i], num_res_blocks + 1, with_attn=i == num_levels - 1,
                                   resample="up" if i != 0 else None, rngs=rngs))
            width = ch * ch_mult[i]
        self.up = nnx.List(levels)
        self.norm_out = GroupNorm(width, num_groups=NORM_GROUPS, eps=NORM_EPS)
        self.conv_out = QConv(width, out_channels, 3, padding=1, rngs=rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        """``[B, h, w, z_channels] -> [B, 16h, 16w, 3]``."""
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(jax.nn.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------------------------
# Quantizer (quant.py).
# ----------------------------------------------------------------------------------------------

class Phi(nnx.Module):
    """``(1 - r) * h + r * conv3x3(h)`` with ``r = |quant_resi|``."""

    def __init__(self, channels: int, resi_ratio: float, *, rngs: nnx.Rngs):
        self.resi_ratio = abs(resi_ratio)
        self.conv = QConv(channels, channels, 3, padding=1, rngs=rngs)

    def __call__(self, h: jax.Array) -> jax.Array:
        """``[B, H, W, C] -> [B, H, W, C]``."""
        return h * (1.0 - self.resi_ratio) + self.conv(h) * self.resi_ratio


def _l2_normalize(x: jax.Array, axis: int) -> jax.Array:
    """``F.normalize``: ``x / max(||x||, 1e-12)``."""
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
    return x / jnp.maximum(norm, NORMALIZE_EPS)


class VectorQuantizer2(nnx.Module):
    """Multi-scale residual quantizer with a ``[V, C]`` codebook and shared ``Phi`` refiners.

    Args:
        vocab_size: V.
        cvae: Code width C.
        using_znorm: Select codes by cosine similarity of normalized vectors instead of L2 distance.
        v_patch_nums: Side length of each scale's token map (the last equals the feature map side).
        quant_resi: Phi residual ratio (|r| <= 1e-6 means identity, no convs).
        share_quant_resi: 0 (one conv per scale), 1 (one conv) or K (K shared convs).
        default_qresi_counts: Conv count when ``share_quant_resi == 0`` (0: one per scale).
    """

    def __init__(self, vocab_size: int, cvae: int, *, using_znorm: bool, v_patch_nums: Sequence[int],
                 quant_resi: float, share_quant_resi: int, default_qresi_counts: int, rngs: nnx.Rngs):
        self.vocab_size = vocab_size
        self.cvae = cvae
        self.using_znorm = using_znorm
        self.v_patch_nums = tuple(int(p) for p in v_patch_nums)
        self.share_quant_resi = share_quant_resi
        self.default_qresi_counts = default_qresi_counts
        count = num_phi(share_quant_resi, len(self.v_patch_nums), default_qresi_counts)
        self.quant_resi = nnx.List([Phi(cvae, quant_resi, rngs=rngs) for _ in range(count)]
                                   if abs(quant_resi) > 1e-6 else [])
        self.embedding = nnx.Embed(vocab_size, cvae, rngs=rngs)

    @property
    def num_scales(self) -> int:
        return len(self.v_patch_nums)

    def phi_index(self, si: int) -> int:
        """Which of `quant_resi` scale ``si`` uses (`phi_index`); 0 when there are none."""
        if not len(self.quant_resi):
            return 0
        return phi_index(si, self.num_scales, self.share_quant_resi, self.default_qresi_counts)

    def phi(self, si: int, h: jax.Array) -> jax.Array:
        """Applies the Phi conv of scale ``si``: ``[B, H, W, C] -> [B, H, W, C]``."""
        if not len(self.quant_resi):
            return h
        return self.quant_resi[self.phi_index(si)](h)

    def phi_at(self, index: jax.Array, h: jax.Array) -> jax.Array:
        """`phi` with the conv chosen by a traced int32 ``index`` (`phi_index`): one program for every scale.

        ``[B, H, W, C] -> [B, H, W, C]``; runs only the chosen conv (`jax.lax.switch`).
        """
        if len(self.quant_resi) <= 1:
            return self.quant_resi[0](h) if len(self.quant_resi) else h
        branches = [lambda x, phi=phi: phi(x) for phi in self.quant_resi]
        return jax.lax.switch(index, branches, h)

    def embed(self, idx: jax.Array) -> jax.Array:
        """Codebook lookup: int ``[...]`` -> float32 ``[..., C]``."""
        return jnp.take(self.embedding.embedding[...], idx, axis=0)

    def nearest_code(self, z: jax.Array) -> jax.Array:
        """Nearest code per row: float32 ``[N, C]`` -> int32 ``[N]`` (first index on ties)."""
        codebook = self.embedding.embedding[...]  # [V, C]
        if self.using_znorm:
            similarity = _l2_normalize(z, 1) @ _l2_normalize(codebook, 1).T  # [N, V]
            return jnp.argmax(similarity, axis=1).astype(jnp.int32)
        distance = (jnp.sum(jnp.square(z), axis=1, keepdims=True) + jnp.sum(jnp.square(codebook), axis=1)
                    - 2.0 * (z @ codebook.T))  # [N, V]
        return jnp.argmin(distance, axis=1).astype(jnp.int32)

    def f_to_idx_bl_or_fhat(self, f: jax.Array, to_fhat: bool) -> list[jax.Array]:
        """Residual quantization of a feature map.

        Args:
            f: ``[B, H, W, C]`` float32 features (H = W = the last patch number).
            to_fhat: Return the cumulative reconstructions instead of the tokens.

        Returns:
            Per scale, int32 ``[B, pn*pn]`` token indices (row-major) or float32 ``[B, H, W, C]`` f_hat.
        """
        b, height, width, c = f.shape
        if self.v_patch_nums[-1] != height or self.v_patch_nums[-1] != width:
            raise ValueError(f"feature map {height}x{width} does not match the last patch number "
                             f"{self.v_patch_nums[-1]}")
        rest = f
        f_hat = jnp.zeros_like(f)
        outputs = []
        for si, pn in enumerate(self.v_patch_nums):
            last = si == self.num_scales - 1
            z = rest if last else area_resize(rest, (pn, pn))  # [B, pn, pn, C]
            idx = self.nearest_code(z.reshape(-1, c)).reshape(b, pn * pn)  # [B, pn*pn]
            h = self.embed(idx).reshape(b, pn, pn, c)
            if not last:
                h = bicubic_resize(h, (height, width))
            h = self.phi(si, h)
            f_hat = f_hat + h
            rest = rest - h
            outputs.append(f_hat if to_fhat else idx)
        return outputs

    def token_maps(self, idx_list: Sequence[jax.Array]) -> list[jax.Array]:
        """Token lists ``[B, pn*pn]`` -> code maps ``[B, pn, pn, C]``."""
        maps = []
        for idx in idx_list:
            b, n = idx.shape
            pn = round(n ** 0.5)
            maps.append(self.embed(idx).reshape(b, pn, pn, self.cvae))
        return maps

    def embed_to_fhat(self, maps: Sequence[jax.Array], all_to_max_scale: bool = True) -> list[jax.Array]:
        """Cumulative f_hat after each scale from per-scale code maps.

        Args:
            maps: Per scale ``[B, pn, pn, C]``.
            all_to_max_scale: Upsample every map to the last scale and accumulate there (the normal path);
                False grows f_hat scale by scale with bicubic and applies phi at the small scale
                (upstream's experimental path).

        Returns:
            Per scale f_hat: ``[B, H, H, C]`` (or ``[B, pn, pn, C]`` when not ``all_to_max_scale``).
        """
        b = maps[0].shape[0]
        side = self.v_patch_nums[-1]
        outputs = []
        if all_to_max_scale:
            f_hat = jnp.zeros((b, side, side, self.cvae), jnp.float32)
            for si, h in enumerate(maps):
                if si < self.num_scales - 1:
                    h = bicubic_resize(h, (side, side))
                f_hat = f_hat + self.phi(si, h)
                outputs.append(f_hat)
        else:
            first = self.v_patch_nums[0]
            f_hat = jnp.zeros((b, first, first, self.cvae), jnp.float32)
            for si, pn in enumerate(self.v_patch_nums):
                f_hat = bicubic_resize(f_hat, (pn, pn)) + self.phi(si, maps[si])
                outputs.append(f_hat)
        return outputs

    def idx_bl_to_var_input(self, idx_list: Sequence[jax.Array]) -> jax.Array:
        """Teacher-forcing input of VAR: for each scale but the first, ``area``-downsampled cumulative f_hat.

        Args:
            idx_list: Per scale int ``[B, pn*pn]``.

        Returns:
            ``[B, L - pn_0^2, C]`` float32 (tokens of scales 1..SN-1, row-major, concatenated).
        """
        maps = self.token_maps(idx_list)
        b = maps[0].shape[0]
        side = self.v_patch_nums[-1]
        f_hat = jnp.zeros((b, side, side, self.cvae), jnp.float32)
        next_scales = []
        for si in range(self.num_scales - 1):
            f_hat = f_hat + self.phi(si, bicubic_resize(maps[si], (side, side)))
            pn_next = self.v_patch_nums[si + 1]
            next_scales.append(area_resize(f_hat, (pn_next, pn_next)).reshape(b, pn_next * pn_next, self.cvae))
        if not next_scales:
            return jnp.zeros((b, 0, self.cvae), jnp.float32)
        return jnp.concatenate(next_scales, axis=1)

    def get_next_autoregressive_input(self, si: int, sn: int, f_hat: jax.Array,
                                      h: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Adds scale ``si``'s codes to f_hat and returns the next scale's input.

        Args:
            si: Scale index.
            sn: Number of scales.
            f_hat: ``[B, H, H, C]`` float32 cumulative reconstruction.
            h: ``[B, pn, pn, C]`` float32 code map of scale ``si``.

        Returns:
            ``(f_hat, next)`` with ``next`` ``[B, pn_next, pn_next, C]`` (area-downsampled f_hat), or
            ``(f_hat, f_hat)`` at the last scale.
        """
        side = self.v_patch_nums[-1]
        if si != sn - 1:
            f_hat = f_hat + self.phi(si, bicubic_resize(h, (side, side)))
            pn_next = self.v_patch_nums[si + 1]
            return f_hat, area_resize(f_hat, (pn_next, pn_next))
        f_hat = f_hat + self.phi(si, h)
        return f_hat, f_hat


# ----------------------------------------------------------------------------------------------
# The tokenizer.
# ----------------------------------------------------------------------------------------------

class VQVAE(nnx.Module):
    """VAR's multi-scale VQ tokenizer (upstream ``models.vqvae.VQVAE``; same constructor arguments).

    Args:
        vocab_size: Codebook size V.
        z_channels: Code width Cvae.
        ch: Base width of encoder and decoder (multiple of 32).
        dropout: Unused at inference (upstream's training-only dropout).
        beta: Commitment weight (training only; stored for reference).
        using_znorm: Cosine-similarity code selection.
        quant_conv_ks: Kernel size of ``quant_conv`` / ``post_quant_conv``.
        quant_resi: Phi residual ratio.
        share_quant_resi: Phi sharing mode (see `VectorQuantizer2`).
        default_qresi_counts: Phi count when ``share_quant_resi == 0``.
        v_patch_nums: Token-map side per scale; the last equals image side / 16 (/ ``2 ** (len(ch_mult) - 1)``).
        test_mode: Upstream freezes the model; ours is always inference-only.
        ch_mult: Encoder/decoder width multipliers per level (None: upstream's ``(1, 1, 2, 2, 4)``);
            the image side is ``2 ** (len(ch_mult) - 1)`` times the latent side.
        num_res_blocks: Encoder res blocks per level (the decoder has one more).
        in_channels: Image channels.
        rngs: NNX RNG streams (``params``).
    """

    def __init__(self, *, vocab_size: int = 4096, z_channels: int = 32, ch: int = 160, dropout: float = 0.0,
                 beta: float = 0.25, using_znorm: bool = False, quant_conv_ks: int = 3, quant_resi: float = 0.5,
                 share_quant_resi: int = 4, default_qresi_counts: int = 0,
                 v_patch_nums: Sequence[int] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), test_mode: bool = True,
                 ch_mult: Optional[Sequence[int]] = None, num_res_blocks: int = NUM_RES_BLOCKS,
                 in_channels: int = 3, rngs: nnx.Rngs):
        del dropout, test_mode  # inference only
        self.vocab_size = vocab_size
        self.cvae = z_channels
        self.beta = beta
        self.v_patch_nums = tuple(int(p) for p in v_patch_nums)
        ch_mult = CH_MULT if ch_mult is None else tuple(int(m) for m in ch_mult)
        self.downsample = 2 ** (len(ch_mult) - 1)
        self.encoder = Encoder(ch=ch, z_channels=z_channels, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                               in_channels=in_channels, rngs=rngs)
        self.decoder = Decoder(ch=ch, z_channels=z_channels, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
                               out_channels=in_channels, rngs=rngs)
        self.quantize = VectorQuantizer2(vocab_size, z_channels, using_znorm=using_znorm,
                                         v_patch_nums=self.v_patch_nums, quant_resi=quant_resi,
                                         share_quant_resi=share_quant_resi,
                                         default_qresi_counts=default_qresi_counts, rngs=rngs)
        pad = quant_conv_ks // 2
        self.quant_conv = QConv(z_channels, z_channels, quant_conv_ks, padding=pad, rngs=rngs)
        self.post_quant_conv = QConv(z_channels, z_channels, quant_conv_ks, padding=pad, rngs=rngs)

    def encode_features(self, img: jax.Array) -> jax.Array:
        """``quant_conv(encoder(img))``: ``[B, H, W, 3]`` in [-1, 1] -> ``[B, H/16, W/16, Cvae]`` float32."""
        return self.quant_conv(self.encoder(img))

    def f_to_idx_bl_or_fhat(self, f: jax.Array, to_fhat: bool) -> list[jax.Array]:
        """See `VectorQuantizer2.f_to_idx_bl_or_fhat`."""
        return self.quantize.f_to_idx_bl_or_fhat(f, to_fhat)

    def img_to_idx_bl(self, img: jax.Array) -> list[jax.Array]:
        """Tokenizes images: ``[B, H, W, 3]`` -> per scale int32 ``[B, pn*pn]``."""
        return self.f_to_idx_bl_or_fhat(self.encode_features(img), to_fhat=False)

    def embed(self, idx: jax.Array) -> jax.Array:
        """Codebook lookup: int ``[B, n]`` -> float32 ``[B, n, Cvae]``."""
        return self.quantize.embed(idx)

    def idx_bl_to_var_input(self, idx_list: Sequence[jax.Array]) -> jax.Array:
        """See `VectorQuantizer2.idx_bl_to_var_input`: ``[B, L - 1, Cvae]`` (first scale has one token)."""
        return self.quantize.idx_bl_to_var_input(idx_list)

    def get_next_autoregressive_input(self, si: int, sn: int, f_hat: jax.Array,
                                      h: jax.Array) -> tuple[jax.Array, jax.Array]:
        """See `VectorQuantizer2.get_next_autoregressive_input`."""
        return self.quantize.get_next_autoregressive_input(si, sn, f_hat, h)

    def phi_index(self, si: int) -> int:
        """See `VectorQuantizer2.phi_index`."""
        return self.quantize.phi_index(si)

    def phi_at(self, index: jax.Array, h: jax.Array) -> jax.Array:
        """See `VectorQuantizer2.phi_at`."""
        return self.quantize.phi_at(index, h)

    def fhat_to_img(self, f_hat: jax.Array) -> jax.Array:
        """``clamp(decoder(post_quant_conv(f_hat)), -1, 1)``: ``[B, h, w, Cvae] -> [B, 16h, 16w, 3]``."""
        return jnp.clip(self.decoder(self.post_quant_conv(f_hat)), -1.0, 1.0)

    def idx_bl_to_fhat(self, idx_list: Sequence[jax.Array], same_shape: bool = True) -> list[jax.Array]:
        """Cumulative f_hat after each scale from token lists (see `VectorQuantizer2.embed_to_fhat`).

        Args:
            idx_list: Per scale int ``[B, pn*pn]``.
            same_shape: Accumulate at the full scale (normal); False: upstream's experimental progressive path.

        Returns:
            Per scale float32 ``[B, H, H, Cvae]`` (``[B, pn, pn, Cvae]`` when not ``same_shape``).
        """
        maps = self.quantize.token_maps(idx_list)
        return self.quantize.embed_to_fhat(maps, all_to_max_scale=same_shape)

    def idx_bl_to_img(self, idx_list: Sequence[jax.Array], same_shape: bool = True,
                      last_one: bool = False) -> Union[jax.Array, list[jax.Array]]:
        """Decodes token maps.

        Args:
            idx_list: Per scale int ``[B, pn*pn]``.
            same_shape: Accumulate at the full scale (normal). False: upstream's experimental progressive
                path (f_hat grown by bicubic scale by scale).
            last_one: Return only the image of the full f_hat.

        Returns:
            ``[B, H, W, 3]`` in [-1, 1], or a list of them (one per scale; with ``same_shape=False`` the
            earlier ones are smaller).
        """
        f_hats = self.idx_bl_to_fhat(idx_list, same_shape)
        if last_one:
            return self.fhat_to_img(f_hats[-1])
        if same_shape:
            batch = f_hats[0].shape[0]
            images = self.fhat_to_img(jnp.concatenate(f_hats, axis=0))  # [SN*B, H, W, 3], one decoder pass
            return [images[i * batch:(i + 1) * batch] for i in range(len(f_hats))]
        return [self.fhat_to_img(f_hat) for f_hat in f_hats]
