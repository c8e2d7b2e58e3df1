"""Folding per-input-channel input transforms into the op that produces the input (VAR, DiT).

SmoothQuant, AWQ and OmniQuant-LET make a linear layer (the *consumer*) read ``(x - delta) / s`` instead of
``x`` (``s [in] > 0``, optional shift ``delta [in]``) and compensate in its own parameters::

    x @ W + b  =  ((x - delta) / s) @ (s[:, None] * W)  +  (b + delta @ W)

The transformed input costs nothing at run time when the op producing ``x`` is affine per channel and only
feeds this consumer; its columns are rewritten instead (the *predecessor* fold). These models' LayerNorms
have no affine weights, so the predecessors are linear layers:

``modulate``  ``x = u * (1 + scale) + shift`` with (scale, shift) columns of an adaLN linear (VAR's
              ``ada_lin``, DiT's ``adaLN_modulation``). ``(x - delta) / s`` is ``u * (1 + scale') + shift'``
              with ``1 + scale' = (1 + scale) / s`` and ``shift' = (shift - delta) / s``: the linear's scale
              and shift kernel columns are divided by ``s``, its scale bias becomes ``(1 + b) / s - 1`` and
              its shift bias ``(b - delta) / s``.
``value``     ``proj`` reads ``P v`` per head (``P`` = softmax probabilities, rows summing to 1), which is
              linear in ``v``: ``(P v - delta) / s = P ((v - delta) / s)``, so the v kernel columns of the
              fused qkv linear are divided by ``s`` and the v bias becomes ``(b_v - delta) / s``. The shift
              is exact because the rows of ``P`` sum to 1 (true in evaluation; attention dropout at training
              time breaks it).

Which consumer folds where is one small table per block type (`FOLD_SITES`); everything else keeps an
explicit `InputScale` divisor (fc2 after GELU, the adaLN linears after SiLU, ``word_embed``, the patch
embedding, VAR's per-block projections with ``shared_aln``). `InputScale` can only divide, so a shift on
such a layer is an error naming it. The consumer's bias correction ``b + delta @ W`` is also structural:
VAR's ``mat_qkv`` has no bias of its own but separate ``q_bias`` / ``v_bias`` variables and no k bias
(`SPLIT_BIASES`); a constant added to every key cancels in the softmax, unless the keys are L2-normalised
(``attn_l2_norm``), in which case a shift on ``mat_qkv`` is an error.

Composition. A layer can be both a consumer and a predecessor (qkv: its rows carry its own ``s``, its v
columns carry ``proj``'s fold; ``ada_lin``: its rows carry its own ``s``, its scale/shift columns the folds
of the layers it modulates). `fold_input_transforms` first applies every consumer's own rewrite (rows and
bias correction), then every predecessor fold (columns), which commute. Folds act on float kernels, before
anything is quantized; the returned kernels are what gets quantized. Dividing a kernel column by a positive
number does not change its per-channel or per-group quantization (the column's scale follows), so a
method's choices made on the unfolded kernel (AWQ's alpha and clipping) stay valid; per-tensor weight
scales are the exception.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Collection, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bitlaws.models import dit, var
from bitlaws.ptq import smoothquant_core
from bitlaws.quant.layers import QuantizedLayer
from bitlaws.quant.transform import quant_layers

KINDS = ("modulate", "value")


class InputTransform(NamedTuple):
    """A consumer's input transform ``x -> (x - delta) / s``.

    Attributes:
        s: ``[in]`` positive per-input-channel divisor.
        delta: ``[in]`` shift, or None (SmoothQuant, AWQ).
    """

    s: jax.Array
    delta: Optional[jax.Array] = None


@dataclasses.dataclass(frozen=True)
class FoldSite:
    """Where one consumer's input transform folds (paths relative to the block the table belongs to).

    Attributes:
        consumer: The layer reading the transformed input (``attn.mat_qkv``).
        predecessor: The linear whose output columns produce that input (``ada_lin``).
        kind: ``modulate`` (adaLN scale/shift columns) or ``value`` (v columns of a fused qkv linear).
        chunks: The predecessor's output is this many equal column blocks (6 adaLN chunks; q, k, v).
        shift: Index of the additive chunk (the adaLN shift; the v block).
        scale: Index of the ``(1 + scale)`` chunk (``modulate`` only).
        bias: The variable holding the shift chunk's bias when it is not a slice of the predecessor's own
            ``bias`` (VAR's ``attn.v_bias``), else None.
        unless: A block attribute that disables the site when true (VAR's ``shared_aln``: one adaLN linear
            shared by all blocks cannot take a per-block fold).
    """

    consumer: str
    predecessor: str
    kind: str
    chunks: int
    shift: int
    scale: Optional[int] = None
    bias: Optional[str] = None
    unless: Optional[str] = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"FoldSite({self.consumer!r}).kind must be one of {KINDS}, got {self.kind!r}")
        if (self.scale is None) != (self.kind == "value"):
            raise ValueError(f"FoldSite({self.consumer!r}): 'modulate' needs a scale chunk, 'value' has none")
        for name in ("shift", "scale"):
            index = getattr(self, name)
            if index is not None and not 0 <= index < self.chunks:
                raise ValueError(f"FoldSite({self.consumer!r}).{name}={index} is outside 0..{self.chunks - 1}")

    def describe(self) -> str:
        """E.g. ``blocks.0.ada_lin[scale 2/6, shift 4/6]`` or ``blocks.0.attn.mat_qkv[v 2/3]``."""
        if self.kind == "value":
            return f"{self.predecessor}[v {self.shift}/{self.chunks}]"
        return f"{self.predecessor}[scale {self.scale}/{self.chunks}, shift {self.shift}/{self.chunks}]"


@dataclasses.dataclass(frozen=True)
class SplitBias:
    """A layer without a bias of its own whose output chunks get bias variables of the block (VAR's qkv).

    Attributes:
        layer: The layer (relative to the block).
        chunks: The bias variable of each equal output chunk; None marks the attention-key chunk, which has
            none: a constant added to every key shifts each query's scores by one constant and cancels in
            the softmax, unless the keys are L2-normalised.
        key_norm: The block attribute saying the keys are L2-normalised (then a key offset is an error).
    """

    layer: str
    chunks: tuple[Optional[str], ...]
    key_norm: str


FOLD_SITES: dict[type, tuple[FoldSite, ...]] = {
    var.VAR: (FoldSite("head", "head_nm.ada_lin", "modulate", chunks=2, scale=0, shift=1),),
    # ada_lin chunks: gamma1, gamma2, scale1, scale2, shift1, shift2
    var.AdaLNSelfAttn: (
        FoldSite("attn.mat_qkv", "ada_lin", "modulate", chunks=6, scale=2, shift=4, unless="shared_aln"),
        FoldSite("ffn.fc1", "ada_lin", "modulate", chunks=6, scale=3, shift=5, unless="shared_aln"),
    ),
    var.SelfAttention: (FoldSite("proj", "mat_qkv", "value", chunks=3, shift=2, bias="v_bias"),),
    # adaLN_modulation chunks: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp
    dit.DiTBlock: (
        FoldSite("attn.qkv", "adaLN_modulation", "modulate", chunks=6, scale=1, shift=0),
        FoldSite("mlp.fc1", "adaLN_modulation", "modulate", chunks=6, scale=4, shift=3),
    ),
    dit.Attention: (FoldSite("proj", "qkv", "value", chunks=3, shift=2),),
    dit.FinalLayer: (FoldSite("linear", "adaLN_modulation", "modulate", chunks=2, scale=1, shift=0),),
}
"""Per block type, the consumers whose input transform folds into a predecessor."""

SPLIT_BIASES: dict[type, tuple[SplitBias, ...]] = {
    var.SelfAttention: (SplitBias("mat_qkv", ("q_bias", None, "v_bias"), key_norm="attn_l2_norm"),),
}
"""Per block type, consumers whose bias correction goes to separate per-chunk variables."""


@dataclasses.dataclass
class FoldResult:
    """What `fold_input_transforms` returns (the fields of `bitlaws.quant.MethodResult` it fills).

    Attributes:
        kernels: ``{layer path: kernel}`` for target layers: every consumer's rewritten kernel and every
            target predecessor's kernel with folded columns (both, composed, for layers that are both).
        params: ``{dotted parameter path: array}``: kernels of non-target predecessors and every rewritten
            bias (``blocks.0.ada_lin.bias``, ``blocks.0.attn.v_bias``).
        input_scales: ``{layer path: s [in]}`` for consumers with no predecessor to fold into.
        folded: ``{consumer path: predecessor description}`` (`FoldSite.describe`) for folded consumers.
    """

    kernels: dict[str, jax.Array] = dataclasses.field(default_factory=dict)
    params: dict[str, jax.Array] = dataclasses.field(default_factory=dict)
    input_scales: dict[str, jax.Array] = dataclasses.field(default_factory=dict)
    folded: dict[str, str] = dataclasses.field(default_factory=dict)


# ------------------------------------------------------------------------------------------ pure array rewrites


def _f32(a: jax.Array) -> jax.Array:
    return jnp.asarray(a).astype(jnp.float32)


def fold_scale_columns(w: jax.Array, b: jax.Array, s: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Rewrites the linear producing ``scale`` so that ``1 + scale`` becomes ``(1 + scale) / s``.

    Args:
        w: ``[in, C]`` the kernel columns producing ``scale``.
        b: ``[C]`` their bias.
        s: ``[C]`` divisors.

    Returns:
        ``(w / s [in, C], (1 + b) / s - 1 [C])`` float32.
    """
    s = _f32(s)
    return _f32(w) / s, (1.0 + _f32(b)) / s - 1.0


def fold_shift_columns(w: jax.Array, b: Optional[jax.Array], s: jax.Array,
                       delta: Optional[jax.Array] = None) -> tuple[jax.Array, Optional[jax.Array]]:
    """Rewrites the linear producing an additive term ``y`` (adaLN shift, attention values) to ``(y - delta) / s``.

    Args:
        w: ``[in, C]`` the kernel columns producing ``y``.
        b: ``[C]`` their bias, or None (then `delta` must be None).
        s: ``[C]`` divisors.
        delta: ``[C]`` shift, or None.

    Returns:
        ``(w / s [in, C], (b - delta) / s [C] or None)`` float32.
    """
    s = _f32(s)
    if b is None:
        if delta is not None:
            raise ValueError("fold_shift_columns: a shift needs a bias to fold into")
        return _f32(w) / s, None
    b = _f32(b) if delta is None else _f32(b) - _f32(delta)
    return _f32(w) / s, b / s


@functools.partial(jax.jit, static_argnames=("chunks", "shift", "scale"))
def fold_columns(kernel: jax.Array, bias: Optional[jax.Array], s: jax.Array, delta: Optional[jax.Array] = None, *,
                 chunks: int, shift: int, scale: Optional[int] = None) -> tuple[jax.Array, Optional[jax.Array]]:
    """A predecessor fold on whole kernels: `fold_scale_columns` / `fold_shift_columns` on chunks.

    Args:
        kernel: ``[in, chunks * C]`` the predecessor's kernel (its output is `chunks` equal column blocks).
        bias: ``[chunks * C]`` its bias, or None (needs ``scale=None`` and ``delta=None``).
        s: ``[C]`` divisors.
        delta: ``[C]`` shift, or None.
        chunks: Number of column blocks.
        shift: The additive block (adaLN shift, attention values): ``(y - delta) / s``.
        scale: The ``(1 + scale)`` block (adaLN), or None: ``(1 + scale) / s``.

    Returns:
        ``(kernel [in, chunks * C], bias [chunks * C] or None)`` float32; other blocks unchanged.
    """
    w = _f32(kernel).reshape(kernel.shape[0], chunks, -1)  # [in, chunks, C]
    b = None if bias is None else _f32(bias).reshape(chunks, -1)  # [chunks, C]
    if scale is not None:
        if b is None:
            raise ValueError("fold_columns: a scale fold needs a bias to take (1 + b) / s - 1")
        ws, bs = fold_scale_columns(w[:, scale], b[scale], s)
        w, b = w.at[:, scale].set(ws), b.at[scale].set(bs)
    wh, bh = fold_shift_columns(w[:, shift], None if b is None else b[shift], s, delta)
    w = w.at[:, shift].set(wh)
    if b is not None:
        b = b.at[shift].set(bh)
    return w.reshape(kernel.shape), None if b is None else b.reshape(-1)


def rewrite_consumer(kernel: jax.Array, bias: Optional[jax.Array], s: jax.Array,
                     delta: Optional[jax.Array] = None) -> tuple[jax.Array, Optional[jax.Array]]:
    """A consumer's own rewrite for the input ``(x - delta) / s``: ``(s[:, None] * W, b + delta @ W)``.

    Args:
        kernel: ``[in, out]`` float kernel (``[..., in, out]`` without a shift).
        bias: ``[out]`` bias or None (a missing bias with a shift gets one: ``delta @ W``).
        s: ``[in]`` divisors.
        delta: ``[in]`` shift, or None (the bias is returned unchanged).

    Returns:
        ``(kernel [..., in, out] in kernel's dtype, bias [out] or None)``.
    """
    rewritten = smoothquant_core.smooth(kernel, s)
    if delta is None:
        return rewritten, bias
    correction = shift_correction(rewritten, s, delta)
    return rewritten, correction if bias is None else (_f32(bias) + correction).astype(jnp.asarray(bias).dtype)


def shift_correction(rewritten: jax.Array, s: jax.Array, delta: jax.Array) -> jax.Array:
    """The bias term ``(delta / s) @ K`` (``= delta @ W`` for ``K = s W``) restoring a shifted input.

    Uses the kernel the layer will run (``K``, e.g. after AWQ's clipping) so that the shift is exactly
    neutral for it.

    Args:
        rewritten: ``[in, out]`` the consumer's rewritten kernel ``K``.
        s: ``[in]`` divisors.
        delta: ``[in]`` shift.

    Returns:
        ``[out]`` float32.
    """
    if rewritten.ndim != 2:
        raise ValueError(f"a shift needs a [in, out] kernel, got shape {tuple(rewritten.shape)} (convolutions "
                         f"pad with zeros: a shift does not fold into their bias)")
    return jnp.dot(_f32(delta) / _f32(s), _f32(rewritten), precision=jax.lax.Precision.HIGHEST)


# ------------------------------------------------------------------------------------------ the model's structure


def _join(prefix: str, sub: str) -> str:
    return f"{prefix}.{sub}" if prefix else sub


def _blocks(model: nnx.Module, table: Mapping[type, tuple]):
    """``(block path, block, entry)`` for every table entry of every module of `model`, in graph order."""
    for path, module in nnx.iter_modules(model):
        for entry in table.get(type(module), ()):
            yield ".".join(str(p) for p in path), module, entry


def fold_sites(model: nnx.Module) -> dict[str, FoldSite]:
    """``{consumer path: FoldSite with absolute paths}`` for every fold site active in `model`."""
    sites = {}
    for prefix, block, site in _blocks(model, FOLD_SITES):
        if site.unless is not None and getattr(block, site.unless):
            continue
        sites[_join(prefix, site.consumer)] = dataclasses.replace(
            site, consumer=_join(prefix, site.consumer), predecessor=_join(prefix, site.predecessor),
            bias=None if site.bias is None else _join(prefix, site.bias), unless=None)
    return sites


def _split_biases(model: nnx.Module) -> dict[str, tuple[tuple[Optional[str], ...], bool]]:
    """``{layer path: (absolute bias path per chunk, keys normalised)}`` for `SPLIT_BIASES` layers."""
    out = {}
    for prefix, block, split in _blocks(model, SPLIT_BIASES):
        parts = tuple(None if p is None else _join(prefix, p) for p in split.chunks)
        out[_join(prefix, split.layer)] = (parts, bool(getattr(block, split.key_norm)))
    return out


def _layers(model: nnx.Module) -> dict[str, QuantizedLayer]:
    return dict(quant_layers(model))


def _variable(model: nnx.Module, dotted: str) -> Optional[nnx.Variable]:
    """The variable at a dotted path (``blocks.0.ada_lin.bias``), or None when there is none."""
    node = model
    for part in dotted.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part, None)
        if node is None:
            return None
    return node if isinstance(node, nnx.Variable) else None


def _shift_problem(layer_path: str, layer, split: Optional[tuple]) -> Optional[str]:
    """Why `layer` cannot take a bias correction (None when it can)."""
    if split is not None:
        parts, keys_normalised = split
        if None in parts and keys_normalised:
            return (f"{layer_path} (its key columns have no bias and the keys are L2-normalised, so a key "
                    f"offset does not cancel)")
        return None
    if layer.bias is None:
        return f"{layer_path} (no bias to take the correction delta @ W)"
    if len(layer.kernel_shape) != 2:
        return f"{layer_path} (a convolution: zero padding makes a shift unfoldable)"
    return None


def shiftable_layers(model: nnx.Module) -> set[str]:
    """The layers whose input may be shifted (``delta``): foldable consumers whose bias can be corrected."""
    layers, splits = _layers(model), _split_biases(model)
    return {path for path in fold_sites(model)
            if _shift_problem(path, layers[path], splits.get(path)) is None}


# ------------------------------------------------------------------------------------------ the fold


class _Work:
    """Dotted parameter path -> rewritten float array, read from the model on first use."""

    def __init__(self, model: nnx.Module):
        self.model = model
        self.arrays: dict[str, jax.Array] = {}

    def get(self, dotted: str) -> Optional[jax.Array]:
        if dotted not in self.arrays:
            variable = _variable(self.model, dotted)
            if variable is None or variable.get_value() is None:
                return None
            self.arrays[dotted] = variable.get_value()
        return self.arrays[dotted]

    def set(self, dotted: str, value: jax.Array) -> None:
        old = self.get(dotted)
        self.arrays[dotted] = value.astype(old.dtype) if old is not None else value


def _check_transform(path: str, layer, t: InputTransform) -> Optional[str]:
    n_in = layer.kernel_shape[-2]
    for name in ("s", "delta"):
        value = getattr(t, name)
        if value is not None and tuple(jnp.shape(value)) != (n_in,):
            return f"{path} ({name} has shape {tuple(jnp.shape(value))}, the layer has {n_in} input channels)"
    if not isinstance(t.s, jax.core.Tracer):
        s = np.asarray(t.s)  # on the host: no device op to compile per shape
        if not np.all((s > 0) & np.isfinite(s)):
            return f"{path} (s has non-positive or non-finite entries)"
    return None


def _correct_bias(work: _Work, path: str, split: Optional[tuple], correction: jax.Array) -> None:
    """Adds ``correction [out]`` to `path`'s bias (or to its per-chunk bias variables)."""
    if split is None:
        work.set(f"{path}.bias", _f32(work.get(f"{path}.bias")) + correction)
        return
    parts, _ = split
    width = correction.shape[0] // len(parts)
    for i, part in enumerate(parts):
        if part is not None:  # None: the key chunk, whose offset cancels in the softmax
            work.set(part, _f32(work.get(part)) + correction[i * width:(i + 1) * width])


def _fold(work: _Work, site: FoldSite, t: InputTransform) -> None:
    """Rewrites `site.predecessor`'s columns (in `work`) so that its consumer reads ``(x - delta) / s``."""
    kernel_path, bias_path = f"{site.predecessor}.kernel", f"{site.predecessor}.bias"
    kernel = work.get(kernel_path)
    if kernel is None:
        raise ValueError(f"cannot fold {site.consumer}'s input transform into {site.predecessor}: it has no float "
                         f"kernel (fold before quantizing)")
    if kernel.ndim != 2 or kernel.shape[-1] != site.chunks * t.s.shape[0]:
        raise ValueError(f"{site.predecessor} has kernel shape {tuple(kernel.shape)}; {site.consumer}'s fold needs "
                         f"[in, {site.chunks} x {t.s.shape[0]}]")
    own_bias = site.bias is None
    bias = work.get(bias_path) if own_bias else None
    if bias is None and own_bias and (site.kind == "modulate" or t.delta is not None):
        raise ValueError(f"cannot fold {site.consumer}'s input transform into {site.predecessor}: it has no bias "
                         f"to take the fold's constant term")
    kernel, bias = fold_columns(kernel, bias, t.s, t.delta if own_bias else None, chunks=site.chunks,
                                shift=site.shift, scale=site.scale)
    work.set(kernel_path, kernel)
    if own_bias:
        if bias is not None:
            work.set(bias_path, bias)
        return
    v_bias = work.get(site.bias)  # a separate bias variable for the shift chunk (VAR's v_bias)
    if v_bias is None:
        raise ValueError(f"{site.consumer}'s fold names the bias {site.bias!r}, which the model does not have")
    shifted = _f32(v_bias) if t.delta is None else _f32(v_bias) - _f32(t.delta)
    work.set(site.bias, shifted / _f32(t.s))  # (b_v - delta) / s, as in fold_shift_columns


def fold_input_transforms(model: nnx.Module, transforms: Mapping[str, tuple],
                          kernels: Optional[Mapping[str, jax.Array]] = None, *,
                          targets: Optional[Collection[str]] = None, fold: bool = True) -> FoldResult:
    """Folds every consumer's input transform into its predecessor where the model has one.

    Args:
        model: The float model (read only; VAR, DiT or any model built from `FOLD_SITES` block types - other
            models simply have no fold sites).
        transforms: ``{layer path: (s [in], delta [in] or None)}`` (`InputTransform` or a plain tuple).
        kernels: ``{layer path: kernel}`` the method already rewrote (``s * W``, possibly clipped); consumers
            missing here get ``s * W`` of their float kernel. Layers without a transform pass through (and
            still receive predecessor folds).
        targets: The layers the method quantizes: their kernels are returned in `FoldResult.kernels`, other
            kernels in `FoldResult.params`. Default: the layers of `transforms` and `kernels`.
        fold: False keeps every divisor as an `InputScale` (shifts are then an error everywhere).

    Returns:
        The `FoldResult`. With quantization off, the model with its kernels, parameters and input scales
        replaced computes the float model's function (up to float rounding).

    Raises:
        ValueError: unknown layers or badly shaped / non-positive ``s``; shifts on layers that cannot take
            them (no fold site, or no bias variable for ``b + delta @ W``), all named in one message.
    """
    layers = _layers(model)
    kernels = dict(kernels or {})
    transforms = {path: InputTransform(*t) for path, t in transforms.items()}
    unknown = sorted((set(transforms) | set(kernels)) - set(layers))
    if unknown:
        raise ValueError(f"fold_input_transforms: {unknown} are not seam layers of the model")
    bad = [p for p in (_check_transform(path, layers[path], t) for path, t in transforms.items()) if p]
    if bad:
        raise ValueError(f"fold_input_transforms: bad input transform(s): {'; '.join(bad)}")
    targets = set(transforms) | set(kernels) if targets is None else set(targets)
    sites = fold_sites(model) if fold else {}
    splits = _split_biases(model)

    unshiftable = []
    for path, t in transforms.items():
        if t.delta is None:
            continue
        if path in sites:
            problem = _shift_problem(path, layers[path], splits.get(path))
        else:
            why = "no preceding op to fold into" if fold else "folding is off"
            problem = f"{path} ({why}: an InputScale only divides)"
        if problem:
            unshiftable.append(problem)
    if unshiftable:
        raise ValueError(f"fold_input_transforms: cannot shift the input of {'; '.join(unshiftable)}; pass "
                         f"delta=None there (see shiftable_layers)")

    work = _Work(model)
    for path, kernel in kernels.items():
        work.set(f"{path}.kernel", kernel)
    for path, t in transforms.items():  # 1. each consumer's own rewrite: rows, and the bias for a shift
        if path not in kernels:
            work.set(f"{path}.kernel", smoothquant_core.smooth(layers[path].kernel[...], t.s))
        if t.delta is not None:
            _correct_bias(work, path, splits.get(path), shift_correction(work.get(f"{path}.kernel"), t.s, t.delta))
    result = FoldResult()
    for path, t in transforms.items():  # 2. predecessor columns (commute with step 1's rows)
        site = sites.get(path)
        if site is None:
            result.input_scales[path] = jnp.asarray(t.s, jnp.float32)
        else:
            _fold(work, site, t)
            result.folded[path] = site.describe()
    for dotted, value in work.arrays.items():
        layer = dotted[:-len(".kernel")] if dotted.endswith(".kernel") else None
        if layer in targets:
            result.kernels[layer] = value
        else:
            result.params[dotted] = value
    return result
