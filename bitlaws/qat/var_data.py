"""Training data of a ported released VAR: teacher-forced token maps of the teacher's own samples.

`own_samples` is a ``calibration.data_fn`` of ``bitlaws ptq`` (`bitlaws.ptq.run.calibration_data` calls
``fn(model, options)``)::

    bitlaws ptq --config configs/qat/var.py:d16,W3A16,topkld --out ckpt/var_d16-w3-qat
    bitlaws ptq --config configs/ptq/demo.py:ckpt/var_d16,W4A16,gptq --out ckpt/var_d16-w4-gptq \\
        --set calibration.data_fn=bitlaws.qat.var_data:own_samples   # PTQ calibration on the same data

It follows the paper's protocol, as the demo VAR family does for its members
(`bitlaws.demo.var_family.VarMember.calibration_batches` with ``source="samples"``): labels spread evenly over
the classes, one class-conditional sample per label drawn by the float model with the release's sampling
settings (cfg 1.5, top-k 900, top-p 0.96: ``configs/models/_var_common.py``), its token maps turned into the
teacher-forcing inputs by the tokenizer (``idx_bl_to_var_input``), and about half of each batch relabelled as the
null class (CFG runs the network on both halves). A batch is ``(labels [B] int32, inputs [B, L - 1, Cvae]
float32)``; `forward` / ``apply`` return the teacher-forced logits ``model(labels, inputs)`` ``[B, L, V]``.

**The tokenizer.** A ``bitlaws port var`` folder holds the transformer only; sampling and the teacher-forcing
inputs need the multi-scale VQ tokenizer, which ``bitlaws port vqvae`` writes to a folder of its own (the
README's commands: ``ckpt/var_d16`` and ``ckpt/vqvae``). A data function receives the transformer and the
calibration options, so the tokenizer is an option: ``options["tokenizer"]`` is that folder (``configs/qat/var.py``
sets ``calibration.tokenizer``, default ``ckpt/vqvae``; ``--set calibration.tokenizer=DIR``) or a tokenizer
module already in memory (notebooks, tests). It is checked against the transformer (vocabulary, code width,
patch numbers) before anything is sampled.

Differences from the demo family: the batches are sampled one calibration batch at a time (batch ``i`` from
``fold_in(key(seed), i)``; one compilation, bounded memory at the released size) instead of in one call; the
labels, their spread and the null relabelling are the same functions of the seed (`spread_labels`,
`with_null_labels` equal those of `bitlaws.demo.family`, which this package does not import: the demo sits
above the sweep, which imports QAT).

Options (unknown names are refused, naming them):

=================  ============================================================================================
``tokenizer``      the ``bitlaws port vqvae`` folder, or a tokenizer module (required)
``num_batches``    batches (8)
``batch_size``     rows per batch (32)
``seed``           labels, sampling keys and null relabelling (0)
``cfg``            guidance of the teacher's samples (1.5)
``top_k``          top-k of the teacher's samples (900; 0: off)
``top_p``          top-p of the teacher's samples (0.96; 0: off)
``null_fraction``  share of each batch relabelled as the null class (0.5)
``source``         only ``samples`` (accepted so calibration blocks built for demo members fit)
=================  ============================================================================================
"""

from __future__ import annotations

import pathlib
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bitlaws.quant.methods import CalibrationData
from bitlaws.sample.var_sampler import autoregressive_infer_cfg

RELEASE_SAMPLING = {"cfg": 1.5, "top_k": 900, "top_p": 0.96}
"""The released VAR's FID sampling settings (``configs/models/_var_common.py``, ``sampling_config``)."""

DEFAULTS: dict[str, Any] = {"tokenizer": None, "num_batches": 8, "batch_size": 32, "seed": 0, **RELEASE_SAMPLING,
                            "null_fraction": 0.5, "source": "samples"}
TOKENIZER_KIND = "vqvae"


def spread_labels(n: int, num_classes: int, seed: int) -> np.ndarray:
    """``[n]`` int32 labels covering the classes as evenly as possible (counts differ by at most one), shuffled.

    The same function of its arguments as `bitlaws.demo.family.spread_labels`.
    """
    labels = np.arange(n, dtype=np.int32) % num_classes
    return np.random.default_rng([seed, 1]).permutation(labels).astype(np.int32)


def with_null_labels(labels: np.ndarray, null_class: int, rng: np.random.Generator,
                     null_fraction: float = 0.5) -> np.ndarray:
    """`labels` with a share `null_fraction` replaced by `null_class` (as `bitlaws.demo.family.with_null_labels`)."""
    return np.where(rng.random(labels.shape[0]) < null_fraction, null_class, labels).astype(np.int32)


def _teacher_forced_logits(model: nnx.Module, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
    """``model(labels [B], inputs [B, L - 1, Cvae])`` -> logits ``[B, L, V]`` (plain: traceable inside a step)."""
    labels, inputs = batch
    return model(labels, inputs)


_teacher_forced_logits_jit = nnx.jit(_teacher_forced_logits)


def teacher_forced_logits(model: nnx.Module, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
    """`CalibrationData.forward`: the teacher-forced logits ``[B, L, V]``, `nnx.jit`-compiled."""
    return _teacher_forced_logits_jit(model, batch)


@nnx.jit
def _var_inputs(tokenizer: nnx.Module, tokens: list[jax.Array]) -> jax.Array:
    """Per scale ``[B, pn*pn]`` tokens -> teacher-forcing inputs ``[B, L - 1, Cvae]``."""
    return tokenizer.idx_bl_to_var_input(tokens)


def _options(options: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    options = dict(options or {})
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"own_samples: unknown option(s) {unknown}; valid: {sorted(DEFAULTS)}")
    out = {**DEFAULTS, **options}
    if out["source"] != "samples":
        raise ValueError(f"own_samples: source must be 'samples' (the teacher's own samples), got {out['source']!r}")
    for name in ("num_batches", "batch_size"):
        value = out[name]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"own_samples: {name} must be an integer >= 1, got {value!r}")
        out[name] = int(value)
    for name, low in (("seed", None), ("top_k", 0)):
        value = out[name]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or (low is not None and value < low):
            raise ValueError(f"own_samples: {name} must be an integer{'' if low is None else f' >= {low}'}, "
                             f"got {value!r}")
        out[name] = int(value)
    for name, low, high in (("cfg", 0.0, None), ("top_p", 0.0, 1.0), ("null_fraction", 0.0, 1.0)):
        value = out[name]
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not low <= value \
                or (high is not None and value > high):
            raise ValueError(f"own_samples: {name} must be a number in [{low}, {high if high is not None else 'inf'}]"
                             f", got {value!r}")
        out[name] = float(value)
    return out


def load_tokenizer(tokenizer: Any) -> tuple[nnx.Module, str]:
    """The tokenizer module named by ``options["tokenizer"]`` and a description of where it came from.

    Raises:
        ValueError: no tokenizer named, a folder that holds no ``bitlaws port vqvae`` output.
    """
    if tokenizer is None or tokenizer == "":
        raise ValueError("own_samples needs the VAR tokenizer: set options['tokenizer'] (configs: "
                         "--set calibration.tokenizer=DIR) to the folder 'bitlaws port vqvae --ckpt "
                         "vae_ch160v4096z32.pth --config configs/models/var_d16.py --out DIR' wrote")
    if isinstance(tokenizer, nnx.Module):
        return tokenizer, f"in-memory {type(tokenizer).__name__}"
    from bitlaws import checkpoint  # pylint: disable=g-import-not-at-top
    from bitlaws.port.convert import load_ported  # pylint: disable=g-import-not-at-top

    directory = pathlib.Path(tokenizer)
    if not directory.is_dir():
        raise ValueError(f"own_samples: tokenizer folder {str(directory)!r} not found (port it with 'bitlaws port "
                         f"vqvae ... --out {directory}', or --set calibration.tokenizer=DIR)")
    kind = checkpoint.load_metadata(directory).get("kind")
    if kind != TOKENIZER_KIND:
        raise ValueError(f"own_samples: {directory} holds a ported {kind!r}, not the VAR tokenizer "
                         f"({TOKENIZER_KIND!r}, written by 'bitlaws port vqvae')")
    return load_ported(directory), str(directory.resolve())


def check_pair(model: nnx.Module, tokenizer: nnx.Module) -> None:
    """Refuses a transformer that is no VAR and a tokenizer that does not fit it (naming the mismatch)."""
    missing = [name for name in ("patch_nums", "num_classes", "vocab_size", "Cvae") if not hasattr(model, name)]
    if missing:
        raise ValueError(f"own_samples needs a VAR transformer; {type(model).__name__} has no {missing}")
    mine = {"vocabulary": int(model.vocab_size), "code width": int(model.Cvae),
            "patch numbers": tuple(int(p) for p in model.patch_nums)}
    theirs = {"vocabulary": getattr(tokenizer, "vocab_size", None), "code width": getattr(tokenizer, "cvae", None),
              "patch numbers": tuple(getattr(tokenizer, "v_patch_nums", ()))}
    bad = [f"{name} {theirs[name]} != {mine[name]}" for name in mine if theirs[name] != mine[name]]
    if bad:
        raise ValueError(f"own_samples: the tokenizer does not fit the VAR transformer: {'; '.join(bad)}")


def protocol(options: Mapping[str, Any]) -> str:
    """One sentence saying what the batches are (for records)."""
    return (f"teacher-forced on token maps of the float model's own samples (cfg {options['cfg']}, top-k "
            f"{options['top_k']}, top-p {options['top_p']}), labels spread evenly over the classes, about "
            f"{options['null_fraction']:.0%} of each batch relabelled as the null class")


def own_samples(model: nnx.Module, options: Optional[Mapping[str, Any]] = None) -> CalibrationData:
    """The teacher's own samples as `CalibrationData` (QAT training data, PTQ calibration data).

    Args:
        model: The float VAR transformer (``bitlaws port var`` output, or any `bitlaws.models.var.VAR`).
        options: See the module docstring (``tokenizer`` is required).

    Returns:
        ``CalibrationData`` with ``num_batches`` batches ``(labels [B] int32, inputs [B, L - 1, Cvae] float32)``
        (numpy), `forward` (teacher-forced logits ``[B, L, V]``, `nnx.jit`) and ``apply`` (the same, plain), and a
        JSON description (source, sizes, seed, sampling settings, tokenizer, protocol).

    Raises:
        ValueError: unknown or bad options, a missing or unfitting tokenizer, a model that is no VAR.
    """
    options = _options(options)
    tokenizer, where = load_tokenizer(options["tokenizer"])
    check_pair(model, tokenizer)
    num_batches, batch_size, seed = options["num_batches"], options["batch_size"], options["seed"]
    labels = spread_labels(num_batches * batch_size, model.num_classes, seed)  # [n]
    key = jax.random.key(seed)
    batches = []
    for index in range(num_batches):
        rows = labels[index * batch_size:(index + 1) * batch_size]  # [B]
        drawn = autoregressive_infer_cfg(model, tokenizer, B=batch_size, label_B=rows,
                                         key=jax.random.fold_in(key, index), cfg=options["cfg"],
                                         top_k=options["top_k"], top_p=options["top_p"], return_logits=True)
        inputs = np.asarray(_var_inputs(tokenizer, [jnp.asarray(t) for t in drawn.tokens]), np.float32)
        batch_labels = with_null_labels(rows, model.num_classes, np.random.default_rng([seed, index]),
                                        options["null_fraction"])
        batches.append((batch_labels, inputs))
    description = {"source": "samples", "num_batches": num_batches, "batch_size": batch_size, "seed": seed,
                   "cfg": options["cfg"], "top_k": options["top_k"], "top_p": options["top_p"],
                   "null_fraction": options["null_fraction"], "tokenizer": where, "protocol": protocol(options)}
    return CalibrationData(teacher_forced_logits, batches, description, apply=_teacher_forced_logits)
