"""Real bit packing of b-bit codes into bytes, along one axis.

Values are packed little-endian: value i of a run occupies bits ``[i*b, (i+1)*b)`` of the byte stream, so

* 2-bit: four values per byte (``v0 | v1<<2 | v2<<4 | v3<<6``);
* 3-bit: eight values in three bytes;
* 4-bit: two values per byte (``v0 | v1<<4``);
* 8-bit: one value per byte.

The packed axis is padded with zeros up to the smallest multiple of ``8 / gcd(b, 8)`` values so the bits
fill whole bytes; `unpack_bits` takes the original length and drops the padding.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def values_per_unit(bits: int) -> int:
    """Smallest run of `bits`-wide values that fills whole bytes (8 / gcd(bits, 8))."""
    return 8 // math.gcd(bits, 8)


def packed_length(length: int, bits: int) -> int:
    """Bytes needed to pack `length` values of `bits` bits along one axis."""
    unit = values_per_unit(bits)
    return -(-length // unit) * unit * bits // 8


def pack_bits(codes: jax.Array, bits: int, axis: int = -1) -> jax.Array:
    """Packs unsigned codes (< 2**bits) into uint8 along `axis`.

    Args:
        codes: Integer array ``[..., n, ...]`` with values in ``[0, 2**bits)``.
        bits: Code width, 1..8.
        axis: Axis to pack along.

    Returns:
        uint8 array with `axis` of length ``packed_length(n, bits)``; other axes unchanged.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"pack_bits: bits must be in [1, 8], got {bits}")
    codes = jnp.moveaxis(jnp.asarray(codes), axis, -1).astype(jnp.uint8)
    if bits == 8:
        return jnp.moveaxis(codes, -1, axis)
    n = codes.shape[-1]
    unit = values_per_unit(bits)
    pad = -n % unit
    if pad:
        codes = jnp.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, pad)])
    shifts = jnp.arange(bits, dtype=jnp.uint8)
    bitplanes = (codes[..., None] >> shifts) & 1  # [..., n_pad, bits]
    bitstream = bitplanes.reshape(*codes.shape[:-1], -1, 8)  # [..., n_pad*bits/8, 8]
    packed = jnp.sum(bitstream << jnp.arange(8, dtype=jnp.uint8), axis=-1, dtype=jnp.uint8)
    return jnp.moveaxis(packed, -1, axis)


def unpack_bits(packed: jax.Array, bits: int, length: int, axis: int = -1) -> jax.Array:
    """Inverse of `pack_bits`: uint8 codes with `axis` restored to `length` values."""
    if not 1 <= bits <= 8:
        raise ValueError(f"unpack_bits: bits must be in [1, 8], got {bits}")
    packed = jnp.moveaxis(jnp.asarray(packed), axis, -1)
    if bits == 8:
        return jnp.moveaxis(packed.astype(jnp.uint8)[..., :length], -1, axis)
    expected = packed_length(length, bits)
    if packed.shape[-1] != expected:
        raise ValueError(
            f"unpack_bits: {packed.shape[-1]} bytes along axis {axis} cannot hold exactly {length} values of "
            f"{bits} bits (expected {expected} bytes)")
    bitstream = (packed[..., None] >> jnp.arange(8, dtype=jnp.uint8)) & 1  # [..., bytes, 8]
    bitplanes = bitstream.reshape(*packed.shape[:-1], -1, bits)  # [..., n_pad, bits]
    codes = jnp.sum(bitplanes << jnp.arange(bits, dtype=jnp.uint8), axis=-1, dtype=jnp.uint8)
    return jnp.moveaxis(codes[..., :length], -1, axis)
