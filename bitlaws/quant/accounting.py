"""Bit accounting: the paper's total model bits (MT) and total compute bits (CT), and exact storage.

For every parameter tensor with N values:

* a kernel of a quantized layer counts ``b_w · N`` model bits and ``b_w · b_a · N`` compute bits, where
  ``b_w`` / ``b_a`` are the nominal bits of the weight / activation formats (16 when that side is not
  quantized, e.g. W4A16 → 4 · 16);
* every other parameter (unquantized kernels, biases, norms, embeddings) counts at 16 bits:
  ``16 · N`` model bits and ``16 · 16 · N`` compute bits.

``storage_bytes`` is what the weights really occupy when deployed: packed values + scales + zero points
for quantized kernels (measured from the live `QArray`s of a packed model; for fake/baked models and float
models under rules, computed analytically by `qarray_nbytes`, which equals `QArray.nbytes`), and 2 bytes per
value for everything else.

Packed layers are measured from their live arrays (the `PackedArray` interface: ``nbytes`` and
``model_bits``). For a `QArray` that gives exactly the spec's numbers above. A vector-quantized kernel
(GPTVQ's `VQArray`) has no nominal per-weight width: it counts everything it stores, ``b_w = nbytes · 8 / N``
(indices + codebooks), in MT and CT alike; only the live array knows that layout, so such layers are
measured from the model, with or without rules.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

from flax import nnx

from bitlaws.quant import formats, packing
from bitlaws.quant.spec import QuantRule, QuantSpec
from bitlaws.quant.transform import match_rules, quant_layers

FLOAT_BITS = 16


def qarray_nbytes(shape: Sequence[int], spec: QuantSpec, reduce_axes: Optional[Sequence[int]] = None) -> int:
    """Bytes `quantize(x, spec, reduce_axes).nbytes` would report for an ``x`` of `shape`, computed analytically."""
    shape = tuple(shape)
    axes = tuple(range(max(len(shape) - 1, 1))) if reduce_axes is None else tuple(a % len(shape) for a in reduce_axes)
    k = math.prod(shape[a] for a in axes)
    n = math.prod(shape) // k
    fmt = spec.format
    if fmt.bits == 8:  # int8/uint8 and fp8 (plain or MX) elements are stored one per byte
        values = k * n
    else:
        values = packing.packed_length(k, fmt.bits) * n
    groups = k // spec.group_size if spec.granularity == "group" else 1
    columns = 1 if spec.granularity == "tensor" else n
    scale_bytes = 1 if fmt.is_mx else {"float16": 2, "bfloat16": 2, "float32": 4}[spec.scale_dtype]
    zero_bytes = 1 if isinstance(fmt, formats.IntFormat) and not fmt.signed else 0
    scale_exp_bytes = 2 if not fmt.is_mx and spec.scale_dtype == "float16" else 0  # int16 per tensor
    table_bytes = fmt.table_nbytes if isinstance(fmt, formats.LutFormat) else 0
    return values + groups * columns * (scale_bytes + zero_bytes) + scale_exp_bytes + table_bytes


@dataclasses.dataclass(frozen=True)
class LayerBits:
    """Accounting of one seam layer's kernel.

    Attributes:
        path: Dotted layer path.
        params: Values of the kernel, N.
        bits_w: Weight bits per value: the format's nominal bits (16 for float), or the effective
            ``model_bits / params`` of a vector-quantized kernel (then not an integer).
        bits_a: Activation bits (16 for float).
        storage_bytes: Deployed bytes of the kernel.
        model_bits: The kernel's MT bits, ``bits_w · params`` (an exact integer).
    """

    path: str
    params: int
    bits_w: float
    bits_a: int
    storage_bytes: int
    model_bits: int


@dataclasses.dataclass(frozen=True)
class BitReport:
    """Model-level accounting.

    Attributes:
        layers: Per seam-layer kernel accounting.
        other_params: Parameters outside seam kernels (biases, norms, embeddings), at 16 bits.
        total_params: All parameters.
        mt_bits: Total model bits MT.
        ct_bits: Total compute bits CT.
        storage_bytes: Deployed storage of all weights.
    """

    layers: tuple[LayerBits, ...]
    other_params: int
    total_params: int
    mt_bits: int
    ct_bits: int
    storage_bytes: int

    @property
    def mean_bits_w(self) -> float:
        return self.mt_bits / max(self.total_params, 1)


def _param_count(model: nnx.Module) -> int:
    state = nnx.state(model, nnx.Param)
    return sum(math.prod(v.get_value().shape) for _, v in nnx.to_flat_state(state))


def bit_accounting(model: nnx.Module, rules: Optional[Sequence[QuantRule]] = None) -> BitReport:
    """MT, CT and storage of `model` under `rules` (or under its own layer settings if `rules` is None).

    Without rules, packed layers are measured from their live arrays (``nbytes``, ``model_bits``). With
    rules, the matched layers' specs give the numbers analytically (`qarray_nbytes`), except for a layer that
    holds a live packed array and gets a weight spec: it is measured from that array — identical for a
    `QArray` packed with that spec, and the only correct count for a vector-quantized (GPTVQ) kernel, whose
    storage no spec describes.

    Works on concrete and abstract (`nnx.eval_shape`) models alike.
    """
    assignments = match_rules(model, rules).assignments if rules is not None else None
    layers = []
    packed_kernel_params = 0
    for path, layer in quant_layers(model):
        shape = layer.kernel_shape
        n = math.prod(shape)
        if assignments is not None:
            rule = assignments.get(path)
            w_spec, a_spec = (rule.weight, rule.act) if rule else (None, None)
        else:
            w_spec = layer.quant.weight if layer.quant.quantizes_weights else None
            a_spec = layer.quant.act if layer.quant.quantizes_acts else None
        bits_a = a_spec.bits if a_spec else FLOAT_BITS
        if layer.qkernel is not None and w_spec is not None:
            packed = layer.qkernel.get_value()  # measured: the live packed arrays
            storage, model_bits = int(packed.nbytes), int(packed.model_bits)
        elif w_spec is not None:
            storage, model_bits = qarray_nbytes(shape, w_spec), w_spec.bits * n
        else:
            storage, model_bits = n * FLOAT_BITS // 8, FLOAT_BITS * n
        bits_w = model_bits // n if model_bits % n == 0 else model_bits / n
        layers.append(LayerBits(path, n, bits_w, bits_a, storage, model_bits))
        if layer.qkernel is not None:
            packed_kernel_params += n  # a packed kernel is a QWeight, not an nnx.Param
    total = _param_count(model) + packed_kernel_params
    other = total - sum(l.params for l in layers)
    mt = sum(l.model_bits for l in layers) + FLOAT_BITS * other
    ct = sum(l.model_bits * l.bits_a for l in layers) + FLOAT_BITS * FLOAT_BITS * other
    storage = sum(l.storage_bytes for l in layers) + other * FLOAT_BITS // 8
    return BitReport(tuple(layers), other, total, mt, ct, storage)
