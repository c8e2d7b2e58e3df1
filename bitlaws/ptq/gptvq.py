"""GPTVQ as a registered method (``gptvq``): the thin integration of `bitlaws.ptq.gptvq_core`.

Each matched layer is vector-quantized from its own calibration Hessian (the layer's mean ``x x^T``, as for
``gptq``) into a `VQArray`, which packed layers hold like a `QArray` (the seam dequantizes it; the bit
accounting counts its bytes).

Budget: what a rule's weight spec means for GPTVQ. A spec such as ``int3`` g128 stands for a bit budget, the
*effective* bits per weight its uniform quantizer stores, ``T = qarray_nbytes(shape, spec) * 8 / N`` (codes +
scales + zero points; int3 g128 with float16 scales: ``3 + 16/128 = 3.125``). GPTVQ spends the same budget,
as the paper compares methods at equal bits per value:

* index bits: ``bits_per_dim = spec.bits`` bits per dimension, so each d-vector's index has
  ``spec.bits * dim`` bits (``<= 8``) and indices cost ``spec.bits`` per weight, as the uniform codes do;
* codebooks: the remaining ``T - spec.bits`` bits per weight (the uniform quantizer's scale overhead) buy
  codebooks. The layout ``(group_size rows, group_cols columns)`` per codebook is the valid one whose
  effective bits ``VQArray.nbytes * 8 / N`` are nearest to T (ties: wider ``group_cols``, then taller
  ``group_size``). Valid: ``group_size`` a multiple of ``dim`` dividing K, ``group_cols`` dividing N, and at
  least ``2^(spec.bits * dim)`` vectors per codebook. Small layers may not reach T (one codebook over the whole
  kernel can already cost more): they get the layout nearest to it.

So W3 (g128) with ``gptvq`` stores about as many bits as W3 (g128) with ``rtn`` or ``gptq``: on a 4096 x 4096
kernel, 2-D codebooks of 64 centroids for 4 rows x 4096 columns each, 3.1260 bits per weight against the
uniform 3.1250; W4: 256 centroids for 16 rows x 4096 columns, 4.1252 bits against 4.1250. Setting
``bits_per_dim``, ``group_size`` or ``group_cols`` overrides the mapping (a fixed one narrows the search, all
three fix the layout). The spec's numerics (format, calibrator) play no part: VQ has its own. Every layer's
``bits_per_weight``, ``target_bits`` and layout are reported in `MethodResult.info`; the bit accounting of a
packed model counts ``VQArray.nbytes`` (MT and storage).

Representations: ``packed`` layers hold the `VQArray`; ``baked`` ones its dequantized kernel, so both compute
the same numbers (run eagerly, bit for bit; under jit within float rounding, as XLA may fuse the
dequantization into the dot). ``fake`` (QAT) re-quantizes with the spec's uniform quantizer at every call, as
for every method: GPTVQ's codebooks are not kept there.

Hyper-parameters (``config.method_params`` in sweeps): ``dim`` (2: the paper's 2-D VQ),
``lower_dim_if_small`` (True: a layer too small for ``2^(bits * dim)`` centroids per codebook - the demo
models' 16x16 projections - uses the largest ``d < dim`` that fits, recorded in ``info``), ``bits_per_dim``,
``group_size``, ``group_cols`` (None: from the budget), ``em_iters`` (30), ``codebook_update`` (True),
``update_iters`` (8), ``block_size`` (128: at most this many rows per lazy batch update, see `lazy_block`),
``damp`` (0.01), ``init`` (``mahalanobis``), ``metric`` (``full``: eq. 14), ``codebook_dtype`` (``float16``);
see `gptvq_core.quantize_weight`. The seed of ``init="random"`` is the problem's seed.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Optional

from bitlaws.ptq import gptq, gptvq_core
from bitlaws.quant import MethodProblem, MethodResult, QuantSpec, register_method
from bitlaws.quant.accounting import qarray_nbytes

DEFAULTS = {"dim": 2, "lower_dim_if_small": True, "bits_per_dim": None, "group_size": None, "group_cols": None,
            "em_iters": 30, "codebook_update": True, "update_iters": 8, "block_size": 128, "damp": 0.01, "init": "mahalanobis",
            "metric": "full", "codebook_dtype": "float16"}


class TooFewVectors(ValueError):
    """No codebook layout of a kernel holds as many vectors as its codebooks have centroids."""


@dataclasses.dataclass(frozen=True)
class VQLayout:
    """The codebook layout GPTVQ uses for one kernel, and what it costs.

    Attributes:
        bits_per_dim: b; indices have ``b * dim`` bits.
        dim: d, input rows per vector.
        group_size: Input rows per codebook.
        group_cols: Output columns per codebook.
        nbytes: Bytes of the resulting `VQArray` (`gptvq_core.vq_nbytes`).
        params: Values of the kernel, N.
        target_bits: The budget, effective bits per weight of the spec's uniform quantizer.
    """

    bits_per_dim: int
    dim: int
    group_size: int
    group_cols: int
    nbytes: int
    params: int
    target_bits: float

    @property
    def bits_per_weight(self) -> float:
        """Effective bits per weight of the layout, ``nbytes * 8 / params``."""
        return self.nbytes * 8 / self.params


def target_bits(shape: tuple[int, ...], spec: QuantSpec) -> float:
    """Effective bits per weight of `spec`'s uniform quantizer on a kernel of `shape` (GPTVQ's budget)."""
    return qarray_nbytes(shape, spec) * 8 / math.prod(shape)


def _positive_int(name: str, value, allow_none: bool = False) -> Optional[int]:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        what = "a positive integer" + (" or None" if allow_none else "")
        raise ValueError(f"gptvq: {name} must be {what}, got {value!r}")
    return int(value)


def _divisors(x: int, step: int = 1) -> list[int]:
    return [g for g in range(step, x + 1, step) if x % g == 0]


def choose_layout(shape: tuple[int, ...], spec: QuantSpec, *, dim: int = 2, bits_per_dim: Optional[int] = None,
                  group_size: Optional[int] = None, group_cols: Optional[int] = None,
                  codebook_dtype: str = "float16") -> VQLayout:
    """The layout that spends `spec`'s bit budget on a kernel of `shape` (see the module docstring).

    Args:
        shape: Kernel shape ``[..., in, out]`` (leading axes flatten into K, as in `gptvq_core`).
        spec: The rule's weight spec: its bits are ``bits_per_dim`` unless given, its storage the budget.
        dim: d, input rows per vector.
        bits_per_dim: Index bits per dimension (default ``spec.bits``).
        group_size, group_cols: Fix the codebook's rows / columns (default: searched).
        codebook_dtype: ``float16`` or ``float32`` codebooks.

    Returns:
        A `VQLayout`.

    Raises:
        ValueError: naming the hyper-parameter (or the spec's bits) no layout of this kernel can satisfy.
    """
    shape = tuple(int(s) for s in shape)
    n = shape[-1]
    k = math.prod(shape) // n
    dim = _positive_int("dim", dim)
    given_bits = _positive_int("bits_per_dim", bits_per_dim, allow_none=True)
    bits = spec.bits if given_bits is None else given_bits
    if bits * dim > 8:
        source = f"bits_per_dim={bits}" if given_bits is not None else f"bits_per_dim={bits} (the weight spec's bits)"
        raise ValueError(f"gptvq: {source} x dim={dim} = {bits * dim} index bits per vector; at most 8 are "
                         f"supported: lower dim or bits_per_dim")
    if k % dim:
        raise ValueError(f"gptvq: dim={dim} does not divide the kernel's input dim {k} (shape {shape})")
    rows = _divisors(k, dim)
    if group_size is not None:
        group_size = _positive_int("group_size", group_size)
        if group_size not in rows:
            raise ValueError(f"gptvq: group_size={group_size} must be a multiple of dim={dim} dividing the "
                             f"kernel's input dim {k} (shape {shape})")
        rows = [group_size]
    cols = _divisors(n)
    if group_cols is not None:
        group_cols = _positive_int("group_cols", group_cols)
        if group_cols not in cols:
            raise ValueError(f"gptvq: group_cols={group_cols} must divide the kernel's output dim {n} (shape {shape})")
        cols = [group_cols]
    centroids = 2 ** (bits * dim)
    candidates = [(gs, gc) for gs in rows for gc in cols if gs // dim * gc >= centroids]
    if not candidates:
        raise TooFewVectors(f"gptvq: no codebook of the kernel {shape} (group_size={group_size}, group_cols="
                         f"{group_cols}) holds the {centroids} vectors its 2^({bits} bits_per_dim x {dim} dim) "
                         f"centroids need; lower bits_per_dim or dim, or use larger groups")
    target = target_bits(shape, spec)
    size = k * n

    def cost(gs_gc):
        nbytes = gptvq_core.vq_nbytes(shape, bits_per_dim=bits, dim=dim, group_size=gs_gc[0], group_cols=gs_gc[1],
                                      codebook_dtype=codebook_dtype)
        return abs(nbytes * 8 / size - target), -gs_gc[1], -gs_gc[0]

    gs, gc = min(candidates, key=cost)
    nbytes = gptvq_core.vq_nbytes(shape, bits_per_dim=bits, dim=dim, group_size=gs, group_cols=gc,
                                  codebook_dtype=codebook_dtype)
    return VQLayout(bits_per_dim=bits, dim=dim, group_size=gs, group_cols=gc, nbytes=nbytes, params=size,
                    target_bits=target)


def lazy_block(layout: VQLayout, block_size: int) -> int:
    """Rows per lazy batch update: the largest multiple of ``dim`` dividing ``group_size``, at most `block_size`.

    (For power-of-two groups, ``min(block_size, group_size)``, GPTQ's usual 128.)
    """
    fits = [b for b in _divisors(layout.group_size, layout.dim) if b <= block_size]
    return max(fits) if fits else layout.dim


def _check_options(params) -> None:
    """Validates the layout-independent hyper-parameters before any layer is quantized."""
    _positive_int("block_size", params["block_size"])
    if not isinstance(params["lower_dim_if_small"], bool):
        raise ValueError(f"gptvq: lower_dim_if_small must be True or False, got {params['lower_dim_if_small']!r}")
    if not isinstance(params["codebook_update"], bool):
        raise ValueError(f"gptvq: codebook_update must be True or False, got {params['codebook_update']!r}")
    try:
        gptvq_core.check_options(em_iters=params["em_iters"], update_iters=params["update_iters"],
                                 damp=params["damp"], init=params["init"], metric=params["metric"],
                                 codebook_dtype=params["codebook_dtype"])
    except ValueError as e:
        raise ValueError(f"gptvq: {e}") from None


def gptvq_method(problem: MethodProblem) -> MethodResult:
    """Quantizes every target with a weight spec by GPTVQ at its spec's bit budget (see the module docstring)."""
    params = problem.params
    _positive_int("dim", params["dim"])
    _check_options(params)
    layouts, errors = {}, []
    for target in problem.targets:  # every layout first: all bad layers are named before any work is done
        if target.rule.weight is None:
            continue
        dims = range(int(params["dim"]), 0, -1) if params["lower_dim_if_small"] else (int(params["dim"]),)
        first_error = None
        for dim in dims:  # small layers (too few vectors for 2^(b*d) centroids) fall back to a lower d
            try:
                layouts[target.path] = choose_layout(
                    tuple(target.kernel.shape), target.rule.weight, dim=dim,
                    bits_per_dim=params["bits_per_dim"], group_size=params["group_size"],
                    group_cols=params["group_cols"], codebook_dtype=params["codebook_dtype"])
                break
            except TooFewVectors as e:
                first_error = first_error or e
            except ValueError as e:  # a configuration error, not a small layer: no fallback
                first_error = first_error or e
                break
        if target.path not in layouts:
            errors.append(f"{target.path}: {first_error}")
    if errors:
        raise ValueError("gptvq cannot quantize layer(s): " + "; ".join(errors))
    result = MethodResult()
    for target in problem.targets:
        layout = layouts.get(target.path)
        if layout is None:
            continue
        vqa = gptvq_core.quantize_weight(
            target.kernel, gptq.mean_hessian(target.stats), bits_per_dim=layout.bits_per_dim, dim=layout.dim,
            group_size=layout.group_size, group_cols=layout.group_cols, em_iters=int(params["em_iters"]),
            codebook_update=params["codebook_update"], update_iters=int(params["update_iters"]),
            block_size=lazy_block(layout, int(params["block_size"])), damp=float(params["damp"]), seed=problem.seed,
            init=params["init"], metric=params["metric"], codebook_dtype=params["codebook_dtype"])
        result.weights[target.path] = vqa
        result.info[target.path] = {
            "bits_per_weight": vqa.bits_per_weight, "target_bits": layout.target_bits, "dim": layout.dim,
            "index_bits": vqa.index_bits, "group_size": layout.group_size, "group_cols": layout.group_cols,
            "codebooks": vqa.num_codebooks}
    return result


register_method("gptvq", gptvq_method, kind="ptq", needs_hessian=True, defaults=DEFAULTS)
