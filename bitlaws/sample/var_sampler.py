"""VAR next-scale sampling with classifier-free guidance (upstream ``VAR.autoregressive_infer_cfg``).

For each scale ``si`` the transformer sees the new scale's tokens of a doubled batch ``[cond; uncond]``
(the unconditional half uses label ``num_classes``) and attends to every earlier token through a KV
cache. The guided logits are ``(1 + t) * cond - t * uncond`` with ``t = cfg * si / (SN - 1)`` (scale 0 is
unguided). Tokens are drawn after top-k / top-p masking; the chosen codes update the tokenizer's f_hat
(`VQVAE.get_next_autoregressive_input`), whose area-downsampled version, ``word_embed``-ed plus the
level/position embedding, is the next scale's input. The final f_hat is decoded to an image in [0, 1].

Compilation is most of a small model's sampling time, so each scale runs two programs: the transformer's
(`_scale_logits`: one compilation per padded scale length and model variant - consecutive scales share a
padded length, `scale_lengths`, and the KV cache has a fixed capacity) and the tokenizer's
(`_scale_tokens`: sampling and the f_hat update, one compilation for *every* scale per sampling setting,
shared by every quantized variant of a model; `bitlaws.sample.var_tokenizer`). Between the two, every scale's
rows are padded to the last scale's ``L = pn**2``: the transformer reads the first ``l`` input rows and writes
``[B, L, V]`` logits.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bitlaws.models.var import VAR, KVCache, scale_bounds
from bitlaws.sample import ahead, var_tokenizer
from bitlaws.sample.perturbation import Perturbation, apply_perturbation
from bitlaws.xla_options import COMPILER_OPTIONS


class VARSamples(NamedTuple):
    """Sampler output with the per-scale details.

    Attributes:
        images: ``[B, H, W, 3]`` float32 in [0, 1].
        tokens: Per scale int32 ``[B, pn*pn]`` sampled token indices (row-major).
        guided_logits: Per scale float32 ``[B, pn*pn, V]`` CFG-combined logits, before masking (after
            `perturb_logits` when one is given).
        f_hats: Per scale float32 ``[B, h, w, Cvae]`` the tokenizer's cumulative features after the scale's codes
            were added (the last one is what gets decoded).
    """

    images: jax.Array
    tokens: list[jax.Array]
    guided_logits: list[jax.Array]
    f_hats: list[jax.Array]


def _guidance_weights(cfg: float, si: int, num_scales: int) -> jax.Array:
    """``[1 + t, t]`` float32 with ``t = cfg * si / (SN - 1)``, evaluated in float64 like upstream."""
    t = cfg * var_tokenizer.scale_ratio(si, num_scales)
    return jnp.asarray(np.array([1.0 + t, t], np.float32))


DEFAULT_PADDING = 0.3
"""Default `scale_lengths` slack: at most 30 % more token rows than the scales hold."""


def scale_lengths(patch_nums: Sequence[int], padding: float = DEFAULT_PADDING) -> tuple[int, ...]:
    """The padded token count each scale runs at: consecutive scales share the largest length of their group.

    Every distinct padded length is one compilation of the transformer's program (per model variant); the
    padding rows cost compute. This picks the fewest groups of consecutive scales whose padded rows total at
    most ``(1 + padding) * sum(pn**2)`` (ties: the fewest rows). The demo's ``(1, 2, 3, 4, 6, 8)`` gives
    ``(9, 9, 9, 36, 36, 64)`` (3 programs instead of 6, 163 rows instead of 130); VAR-d16's 10 scales give
    4 programs (841 rows instead of 680).

    Args:
        patch_nums: Side length of each scale's token map.
        padding: Allowed fraction of extra rows; 0 runs every distinct scale length as its own program.

    Returns:
        Per scale, the padded length (>= ``pn**2``).
    """
    lengths = [int(pn) * int(pn) for pn in patch_nums]
    n, budget = len(lengths), (1.0 + max(float(padding), 0.0)) * sum(lengths)
    # best[g][i]: (rows, cut points) of the cheapest split of scales [0, i) into g groups.
    best = [{0: (0, ())}]
    for groups in range(1, n + 1):
        row = {}
        for i in range(1, n + 1):
            for j, (rows, cuts) in best[groups - 1].items():
                if j < i and (i not in row or rows + (i - j) * lengths[i - 1] < row[i][0]):
                    row[i] = (rows + (i - j) * lengths[i - 1], cuts + (i,))
        best.append(row)
        if n in row and row[n][0] <= budget:
            break
    padded, begin = [], 0
    for end in best[-1][n][1]:
        padded += [lengths[end - 1]] * (end - begin)
        begin = end
    return tuple(padded)


def kv_extents(patch_nums: Sequence[int], lengths: Sequence[int]) -> tuple[int, ...]:
    """Per scale, how many KV-cache rows its attention reads: the end of the last scale padded to its length.

    Scales that share a padded length share a compiled program, so the bound is static per program and covers
    every scale of the group; early scales then score ~100 keys instead of the whole capacity (680 for VAR-d16).
    """
    ends = [end for _, end in scale_bounds(patch_nums)]
    return tuple(max(e for e, other in zip(ends, lengths) if other == length) for length in lengths)


AUTO_PADDING_BLOCK_PARAMS = 20_000_000
"""Transformers whose blocks hold at least this many weights (``12 depth C^2``) pad nothing (`auto_padding`) and
do not compile ahead (`auto_compile_ahead`)."""


def auto_padding(var: VAR) -> float:
    """The `scale_lengths` padding for `var`: `DEFAULT_PADDING` for small models, 0 for large ones.

    Padding trades compute for compilations. For the demo's sub-million-parameter models compiling a program
    costs more than running it, so scales share programs; for a released VAR (VAR-d16: 16 blocks of width 1024,
    0.4 GFLOP per token row) the padding rows cost more on every call than the extra compilations once (d16,
    batch 8, 2-core CPU: 841 padded rows instead of 680; docs/benchmarks.md). Decided from the architecture
    (``12 depth C^2`` block weights >= `AUTO_PADDING_BLOCK_PARAMS`), so float, fake-quantized and packed
    variants of one model pad alike.
    """
    return 0.0 if _large(var) else DEFAULT_PADDING


def _large(var: VAR) -> bool:
    """Whether the transformer's blocks hold at least `AUTO_PADDING_BLOCK_PARAMS` weights (``12 depth C^2``)."""
    return 12 * var.depth * var.embed_dim ** 2 >= AUTO_PADDING_BLOCK_PARAMS


def auto_compile_ahead(var: VAR) -> bool:
    """The `autoregressive_infer_cfg` default of ``compile_ahead``: on for small models, off for large ones.

    A small model's first call is mostly compilation, and compiling the programs concurrently, ahead of use, wins
    (`python benchmarks/var_cold_start.py --tiny --rounds 2`, 2-core CPU: first minus steady 7.3-7.4 s against
    7.8-8.3 s). A large model runs each program for seconds; JAX's asynchronous dispatch already compiles the next
    program while the previous one runs, and two background compile workers beside the sampler's threads
    oversubscribe the cores (VAR-d16, batch 8: 9.6-13.2 s without against 16.5-21.9 s with, three fresh processes
    each; docs/benchmarks.md). Decided like `auto_padding`, from the architecture.
    """
    return not _large(var)


def rows_independent(model: nnx.Module) -> bool:
    """Whether padding rows that repeat a real row leave the real rows' outputs unchanged.

    True unless a layer quantizes its input activations dynamically with one scale for the whole tensor and a
    calibrator other than ``minmax`` (a percentile or MSE search over all rows would see the repeated rows).
    """
    for _, module in nnx.iter_graph(model):
        quant = getattr(module, "quant", None)
        act = getattr(quant, "act", None) if getattr(quant, "quantizes_acts", False) else None
        if act is not None and not act.static and act.granularity == "tensor" and act.calibrator != "minmax":
            return False
    return True


@functools.partial(jax.jit, static_argnames=("var_def", "length", "kv_extent"), donate_argnames=("cache",),
                   compiler_options=COMPILER_OPTIONS)
def _scale_logits(var_state: nnx.State, rows: jax.Array, cond_BD: jax.Array, cache: KVCache, guidance: jax.Array,
                  offset: jax.Array, valid: jax.Array, *, var_def: nnx.GraphDef, length: int,
                  kv_extent: Optional[int] = None) -> tuple[jax.Array, KVCache]:
    """The transformer's part of one scale: input rows -> CFG-combined logits (the only per-model program).

    The scale is given by traced ``(offset, valid)``, so one compilation serves every scale padded to the same
    length ``l`` (`scale_lengths`).

    Args:
        var_def, var_state: The split transformer.
        rows: ``[B, L, Cvae]`` the area-downsampled f_hat of this scale, row-major, padded by repeating the
            last row (zeros at scale 0, which starts from the class embedding); the first ``l`` are read.
        cond_BD: ``[2B, D]`` class embeddings (cond half, then uncond half).
        cache: Fixed-capacity KV buffers (`VAR.empty_cache`), donated.
        guidance: ``[2]`` float32 ``(1 + t, t)``.
        offset: int32 index of the scale's first token in the whole sequence.
        valid: int32 ``pn**2``.
        length: ``l``, the scale's padded length.
        kv_extent: Cache rows attention reads: the last token any scale of this padded length sees
            (`kv_extents`; None: the whole capacity).

    Returns:
        ``(guided logits [B, L, V] float32 (rows past `valid` are padding, past ``l`` zeros), updated cache)``.
    """
    var = nnx.merge(var_def, var_state)
    x_BlC = var.padded_scale_tokens(rows[:, :length], cond_BD, offset, valid)  # [2B, l, C]
    h_BlC, cache = var.forward_cached(x_BlC, cond_BD, cache, cache_at=(offset, valid), kv_extent=kv_extent)
    logits_2BlV = var.get_logits(h_BlC, cond_BD)  # [2B, l, V]
    batch = logits_2BlV.shape[0] // 2
    guided = guidance[0] * logits_2BlV[:batch] - guidance[1] * logits_2BlV[batch:]
    return jnp.pad(guided, ((0, 0), (0, rows.shape[1] - length), (0, 0))), cache


@functools.partial(jax.jit, static_argnames=("vae_def", "top_k", "top_p", "more_smooth", "chunk"),
                   compiler_options=COMPILER_OPTIONS)
def _scale_tokens(vae_state: nnx.State, tables: var_tokenizer.ScaleTables, guided: jax.Array, f_hat: jax.Array,
                  key: jax.Array, *, vae_def: nnx.GraphDef, top_k: int, top_p: float, more_smooth: bool,
                  chunk: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The tokenizer's part of a scale: guided logits -> tokens -> f_hat and the next scale's input rows.

    One compilation serves every scale (the scale is in `tables`, `bitlaws.sample.var_tokenizer`) and every
    quantized variant of a model (it does not read the transformer).

    Args:
        vae_def, vae_state: The split tokenizer.
        tables: The scale's `var_tokenizer.ScaleTables`.
        guided: ``[B, L, V]`` float32 CFG-combined logits; the first ``pn**2`` rows are real.
        f_hat: ``[B, S, S, Cvae]`` cumulative tokenizer features.
        key: PRNG key of this scale.
        top_k, top_p, more_smooth: Sampling settings.
        chunk: Rows per drawn chunk (`var_tokenizer.chunk_rows`).

    Returns:
        ``(tokens [B, L] int32 (the first pn**2 real), f_hat, next rows [B, L, Cvae])``.
    """
    vae = nnx.merge(vae_def, vae_state)
    return var_tokenizer.tokenizer_step(vae, tables, guided, f_hat, key, top_k=top_k, top_p=top_p,
                                       more_smooth=more_smooth, chunk=chunk)


@functools.partial(jax.jit, static_argnames=("var_def", "capacity"), compiler_options=COMPILER_OPTIONS)
def _initial_state(var_def: nnx.GraphDef, var_state: nnx.State, labels_2B: jax.Array, *, capacity: int) -> tuple[jax.Array, jax.Array, KVCache, jax.Array]:
    """``labels [2B]`` -> ``(cond_BD [2B, D], rows [B, L, Cvae] zeros, empty cache, f_hat zeros)``.

    Made by one program so that every array the scale programs receive is a program output (arrays made
    eagerly are uncommitted, and the first call would compile a second, otherwise identical executable).
    """
    var = nnx.merge(var_def, var_state)
    batch = labels_2B.shape[0] // 2
    side = var.patch_nums[-1]
    return (var.class_embedding(labels_2B), jnp.zeros((batch, side * side, var.Cvae), jnp.float32),
            var.empty_cache(2 * batch, capacity), jnp.zeros((batch, side, side, var.Cvae), jnp.float32))


@functools.partial(jax.jit, static_argnames=("vae_def",), compiler_options=COMPILER_OPTIONS)
def decode_f_hat(vae_state: nnx.State, f_hat: jax.Array, *, vae_def: nnx.GraphDef) -> jax.Array:
    """``f_hat [B, h, w, Cvae]`` -> images ``[B, H, W, 3]`` in [0, 1] (the sampler's decode program; ``vae_def,
    vae_state = nnx.split(vae)``)."""
    vae = nnx.merge(vae_def, vae_state)
    return (vae.fhat_to_img(f_hat) + 1.0) * 0.5


def _labels(var: VAR, batch: int, label_B: Union[None, int, Sequence[int], jax.Array],
            key: jax.Array) -> jax.Array:
    """Class labels ``[B]`` int32: given, one class for all (negative: unconditional) or uniform random."""
    if label_B is None:
        return jax.random.randint(key, (batch,), 0, var.num_classes, dtype=jnp.int32)
    if isinstance(label_B, int):
        return jnp.full((batch,), var.num_classes if label_B < 0 else label_B, jnp.int32)
    labels = jnp.asarray(label_B, jnp.int32).reshape(-1)
    if labels.shape[0] != batch:
        raise ValueError(f"label_B has {labels.shape[0]} labels for B={batch}")
    return labels


def autoregressive_infer_cfg(var: VAR, vae: Any, *, B: int, label_B: Union[None, int, Sequence[int], jax.Array],
                             key: jax.Array, cfg: float = 1.5, top_k: int = 0, top_p: float = 0.0,
                             more_smooth: bool = False, return_logits: bool = False,
                             padding: Optional[float] = None,
                             perturb_logits: Optional[Perturbation] = None,
                             compile_ahead: Optional[bool] = None) -> Union[jax.Array, VARSamples]:
    """Generates class-conditional images with VAR (upstream ``autoregressive_infer_cfg``).

    Args:
        var: The transformer.
        vae: The tokenizer (`bitlaws.models.vqvae.VQVAE`); its ``v_patch_nums`` must equal
            ``var.patch_nums``.
        B: Number of images.
        label_B: ``[B]`` int class labels, one int for all (negative: unconditional), or None (uniform
            random classes drawn from `key`).
        key: PRNG key; the output is a deterministic function of it.
        cfg: Guidance strength (ramped linearly over the scales).
        top_k: Top-k sampling (0: off; 1: greedy).
        top_p: Nucleus sampling mass (0: off).
        more_smooth: Feed Gumbel-softmax-weighted code mixtures instead of the sampled codes (upstream's
            visual-quality option, not used for FID).
        return_logits: Also return the per-scale tokens and guided logits.
        padding: Allowed fraction of padding rows when scales share the transformer's compiled program
            (`scale_lengths`; 0: one program per distinct scale length; None: `auto_padding`, by model size).
            Padding changes no real token's
            value beyond float reassociation (rows are independent), except that it is turned off for models
            whose dynamic per-tensor activation calibrator would see the padding (`rows_independent`).
        perturb_logits: Optional `Perturbation` ``(si, guided [B, L, V])`` applied to every scale's padded guided
            logits before sampling
            (the error analyses inject noise there, `bitlaws.analysis`); None draws exactly as without it.
        compile_ahead: Compile every scale's programs concurrently, ahead of use (`bitlaws.sample.ahead`); only
            for eager calls (inside an outer `jit`/`vmap` the programs are traced instead). None:
            `auto_compile_ahead` (on for small models, off for large ones). The same executables either way.

    Returns:
        ``[B, H, W, 3]`` float32 images in [0, 1], or a `VARSamples` (with the per-scale tokens, logits and
        f_hat) when `return_logits`.
    """
    patch_nums = tuple(var.patch_nums)
    if tuple(getattr(vae, "v_patch_nums", patch_nums)) != patch_nums:
        raise ValueError(f"tokenizer patch numbers {tuple(vae.v_patch_nums)} != VAR's {patch_nums}")
    num_scales = len(patch_nums)
    label_key, *scale_keys = jax.random.split(key, num_scales + 1)
    labels = _labels(var, B, label_B, label_key)
    labels_2B = jnp.concatenate([labels, jnp.full_like(labels, var.num_classes)])  # [cond; uncond]

    var_def, var_state = nnx.split(var)
    vae_def, vae_state = nnx.split(vae)
    if padding is None:
        padding = auto_padding(var)
    lengths = scale_lengths(patch_nums, padding if rows_independent(var) else 0.0)
    extents = kv_extents(patch_nums, lengths)
    bounds = scale_bounds(patch_nums)
    capacity = max(begin + length for (begin, _), length in zip(bounds, lengths))
    cond_BD, rows, cache, f_hat = _initial_state(var_def, var_state, labels_2B, capacity=capacity)
    tables = [var_tokenizer.scale_tables(vae, si) for si in range(num_scales)]

    def logits_program(si):
        static = {"var_def": var_def, "length": lengths[si], "kv_extent": extents[si]}
        begin, end = bounds[si]
        return static, (_guidance_weights(cfg, si, num_scales), np.int32(begin), np.int32(end - begin))

    tokens_static = {"vae_def": vae_def, "top_k": int(top_k), "top_p": float(top_p), "more_smooth": bool(more_smooth),
                     "chunk": var_tokenizer.chunk_rows(rows.shape[1], B)}
    programs = None
    if compile_ahead is None:
        compile_ahead = auto_compile_ahead(var)
    if compile_ahead and not ahead.is_traced((var_state, vae_state, cond_BD, scale_keys)):
        programs = ahead.Programs()
        var_spec, vae_spec, cond_spec, rows_spec, cache_spec, f_hat_spec = ahead.abstract(
            (var_state, vae_state, cond_BD, rows, cache, f_hat))
        guided_spec = jax.ShapeDtypeStruct(rows.shape[:2] + (var.vocab_size,), jnp.float32, sharding=rows.sharding)
        jobs = []
        for si in range(num_scales):
            static, scalars = logits_program(si)
            jobs.append((_scale_logits, static, (var_spec, rows_spec, cond_spec, cache_spec) + scalars))
            jobs.append((_scale_tokens, tokens_static, (vae_spec, ahead.abstract(tables[si]), guided_spec, f_hat_spec,
                                                        ahead.abstract(scale_keys[si]))))
        jobs.append((decode_f_hat, {"vae_def": vae_def}, (vae_spec, f_hat_spec)))
        programs.prepare(jobs)
    run = programs.call if programs is not None else (lambda fn, static, dynamic: fn(*dynamic, **static))

    tokens, guided_logits, f_hats = [], [], []
    for si, pn in enumerate(patch_nums):
        static, scalars = logits_program(si)
        guided, cache = run(_scale_logits, static, (var_state, rows, cond_BD, cache) + scalars)
        if perturb_logits is not None:
            guided = apply_perturbation(perturb_logits, si, guided, "perturb_logits")
        idx, f_hat, rows = run(_scale_tokens, tokens_static, (vae_state, tables[si], guided, f_hat, scale_keys[si]))
        if return_logits:
            tokens.append(idx[:, :pn * pn])
            guided_logits.append(guided[:, :pn * pn])
        f_hats.append(f_hat)
    images = run(decode_f_hat, {"vae_def": vae_def}, (vae_state, f_hat))
    if return_logits:
        return VARSamples(images, tokens, guided_logits, f_hats)
    return images
