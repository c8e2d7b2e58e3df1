"""VAR transformer, sampler and port: fixture parity, KV cache, top-k/top-p, determinism, port errors."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bitlaws.models.var import VAR, scale_bounds, scale_layout
from bitlaws.port.checks import var as var_check
from bitlaws.port.mapping import PortError
from bitlaws.port.safetensors_io import read_safetensors
from bitlaws.port.tables.var import port_var
from bitlaws.quant.layers import QLinear
from bitlaws.sample.filtering import mask_top_k_top_p, sample_top_k_top_p
from bitlaws.sample.var_sampler import autoregressive_infer_cfg

jax.config.update("jax_default_matmul_precision", "highest")

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures"
TINY = dict(vocab_size=16, Cvae=4, num_classes=5, depth=2, embed_dim=32, num_heads=2, patch_nums=(1, 2, 3),
            cond_drop_rate=0.0)


class StubTokenizer(nnx.Module):
    """A cheap stand-in with the VQVAE sampling interface (random codebook, no convs)."""

    def __init__(self, vocab_size: int, cvae: int, v_patch_nums, *, rngs: nnx.Rngs):
        self.vocab_size, self.Cvae, self.v_patch_nums = vocab_size, cvae, tuple(v_patch_nums)
        self.codebook = nnx.Param(jax.random.normal(rngs.params(), (vocab_size, cvae)))
        self.to_rgb = nnx.Param(jax.random.normal(rngs.params(), (cvae, 3)))

    def embed(self, idx):
        return jnp.take(self.codebook[...], idx, axis=0)

    def phi_index(self, si):
        return si % 2

    def phi_at(self, index, h):  # two "Phi" maps chosen by a traced index
        return jnp.where(index == 0, h, 0.5 * h)

    def fhat_to_img(self, f_hat):
        return jnp.tanh(f_hat @ self.to_rgb[...])


@pytest.fixture(scope="module")
def manifest():
    return json.loads((FIXTURES / "manifest.json").read_text())


def tiny_var(seed: int = 0, **overrides) -> VAR:
    """A random tiny VAR, filled with numpy draws (no per-op initialiser compilation on the slow CPU)."""
    kwargs = {**TINY, **overrides}
    graphdef, state = nnx.split(nnx.eval_shape(lambda: VAR(**kwargs, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)
    for _, variable in nnx.to_flat_state(state):
        shape = variable.get_value().shape
        fan_in = shape[0] if len(shape) == 2 else 1
        variable.set_value(jnp.asarray(rng.standard_normal(shape) / np.sqrt(fan_in), jnp.float32))
    return nnx.merge(graphdef, state)


# ------------------------------------------------------------------------------------ fixture parity


def test_fixture_parity(manifest):
    results = var_check.check(FIXTURES, manifest)
    names = {r.name for r in results}
    failed = [r.line() for r in results if not r.passed()]
    assert not failed, "\n".join(failed)
    assert "logits_tf" in names
    if var_check.tokenizer_available():
        expected = {f"{g}.{a}" for g in ("infer_cfg1p5", "infer_cfg1")
                    for a in ("idx_BL", "guided_logits_BLV", "img")}
        assert expected <= names, f"missing comparisons: {expected - names}"
    else:  # teacher forcing only until the tokenizer exists
        assert names == {"logits_tf"}


def test_port_rejects_misshapen_key(manifest):
    state = read_safetensors(FIXTURES / "var_weights.safetensors")
    state["blocks.1.ffn.fc1.weight"] = state["blocks.1.ffn.fc1.weight"][:, :-1]
    with pytest.raises(PortError) as info:
        port_var(state, **manifest["fixtures"]["var"]["ctor"])
    assert any(m.startswith("blocks.1.ffn.fc1.kernel") for m in info.value.misshapen), info.value
    assert not info.value.missing and not info.value.unexpected


def test_port_rejects_nonzero_k_bias_and_reports_missing(manifest):
    state = read_safetensors(FIXTURES / "var_weights.safetensors")
    ctor = manifest["fixtures"]["var"]["ctor"]
    bad = dict(state)
    bad["blocks.0.attn.zero_k_bias"] = np.ones_like(state["blocks.0.attn.zero_k_bias"])
    with pytest.raises(PortError, match="zero_k_bias"):
        port_var(bad, **ctor)
    del state["blocks.0.attn.v_bias"]
    with pytest.raises(PortError) as info:
        port_var(state, **ctor)
    assert info.value.missing == ["blocks.0.attn.v_bias"]


# ------------------------------------------------------------------------------------ model structure


def test_state_is_transformer_only_and_linears_are_qlinear():
    vae = StubTokenizer(16, 4, (1, 2, 3), rngs=nnx.Rngs(1))
    kwargs = {k: v for k, v in TINY.items() if k not in ("vocab_size", "Cvae")}
    model = nnx.eval_shape(lambda: VAR(vae=vae, **kwargs, rngs=nnx.Rngs(0)))
    shapes = {".".join(map(str, path)): v.get_value().shape for path, v in nnx.to_flat_state(nnx.state(model))}
    assert not any("codebook" in k or "to_rgb" in k for k in shapes)
    assert {"class_emb", "pos_start", "pos_1LC", "lvl_embed", "word_embed.kernel", "head.kernel"} <= set(shapes)
    assert shapes["class_emb"] == (TINY["num_classes"] + 1, TINY["embed_dim"])
    assert shapes["head.kernel"] == (TINY["embed_dim"], TINY["vocab_size"])
    linears = [m for _, m in nnx.iter_graph(model) if isinstance(m, (nnx.Linear, QLinear))]
    assert linears and all(isinstance(m, QLinear) for m in linears)
    assert len(linears) == 1 + 2 * (4 + 1) + 1 + 1  # word_embed, per block qkv/proj/fc1/fc2/ada_lin, head_nm, head


def test_block_causal_mask():
    level, bias = scale_layout((1, 2))
    np.testing.assert_array_equal(level, [0, 1, 1, 1, 1])
    assert np.all(bias[0, 1:] == -np.inf) and bias[0, 0] == 0
    assert np.all(bias[1:, :] == 0)


# ------------------------------------------------------------------------------------ KV cache


@nnx.jit
def _teacher_and_incremental(model: VAR, labels: jax.Array, x_1LCv: jax.Array):
    """Teacher-forced logits and the same logits computed scale by scale with the sampler's fixed-capacity KV
    cache (`VAR.padded_scale_tokens` + ``forward_cached(cache_at=...)``), for one feature row shared by the
    ``[2]`` labels (the sampler's CFG layout)."""
    x_BLCv = jnp.concatenate([x_1LCv, x_1LCv], axis=0)  # [2, L - 1, Cvae]
    teacher = model(labels, x_BLCv)  # [2, L, V]
    cond_BD = model.class_embedding(labels)
    bounds = scale_bounds(model.patch_nums)
    cache, logits = model.empty_cache(2, bounds[-1][1]), []
    for begin, end in bounds:
        rows = x_1LCv[:, begin - 1:end - 1] if begin else jnp.zeros((1, end, x_1LCv.shape[-1]))
        x_BlC = model.padded_scale_tokens(rows, cond_BD, jnp.int32(begin), jnp.int32(end - begin))
        h_BlC, cache = model.forward_cached(x_BlC, cond_BD, cache, cache_at=(jnp.int32(begin), jnp.int32(end - begin)))
        logits.append(model.get_logits(h_BlC, cond_BD))
    return teacher, jnp.concatenate(logits, axis=1), cache


@pytest.mark.parametrize("shared_aln", [False, True])
def test_kv_cache_matches_teacher_forcing(shared_aln):
    model = tiny_var(shared_aln=shared_aln)
    batch, length = 2, sum(p * p for p in TINY["patch_nums"])
    rng = np.random.default_rng(3)
    x_1LCv = jnp.asarray(rng.standard_normal((1, length - 1, TINY["Cvae"])), jnp.float32)
    labels = jnp.array([2, TINY["num_classes"]])
    teacher, incremental, cache = _teacher_and_incremental(model, labels, x_1LCv)
    assert teacher.shape == (batch, length, TINY["vocab_size"])
    assert len(cache) == TINY["depth"]
    assert cache[0][0].shape == (batch, TINY["num_heads"], length, TINY["embed_dim"] // TINY["num_heads"])
    assert float(jnp.std(teacher)) > 1e-2
    np.testing.assert_allclose(incremental, teacher, rtol=1e-5, atol=1e-5 * float(jnp.abs(teacher).max()))


def test_label_dropout_only_with_key():
    model = tiny_var(cond_drop_rate=1.0)
    x_BLCv = jnp.asarray(np.random.default_rng(0).standard_normal((2, 13, TINY["Cvae"])), jnp.float32)

    @nnx.jit
    def run(model, labels, x):
        null = jnp.full_like(labels, model.num_classes)
        return model(labels, x, key=jax.random.key(1)), model(null, x), model(labels, x)

    dropped, uncond, cond = run(model, jnp.array([0, 1]), x_BLCv)
    np.testing.assert_allclose(dropped, uncond, rtol=1e-6, atol=1e-6)
    assert not np.allclose(cond, uncond, atol=1e-3)


# ------------------------------------------------------------------------------------ top-k / top-p


def test_top_k_keeps_k_largest_and_ties():
    logits = jnp.array([[1.0, 3.0, 2.0, 0.0], [2.0, 2.0, 1.0, 0.0]])
    masked = np.asarray(mask_top_k_top_p(logits, top_k=2))
    np.testing.assert_array_equal(np.isfinite(masked), [[False, True, True, False], [True, True, False, False]])
    np.testing.assert_array_equal(masked[0, 1:3], [3.0, 2.0])
    assert np.isfinite(np.asarray(mask_top_k_top_p(logits, top_k=100))).all()


def test_top_p_nucleus():
    logits = jnp.log(jnp.array([[0.15, 0.5, 0.05, 0.3]]))
    keep = np.isfinite(np.asarray(mask_top_k_top_p(logits, top_p=0.75)))  # drops cumulative mass <= 0.25
    np.testing.assert_array_equal(keep, [[False, True, False, True]])
    keep = np.isfinite(np.asarray(mask_top_k_top_p(logits, top_p=0.01)))  # the largest always survives
    np.testing.assert_array_equal(keep, [[False, True, False, False]])
    keep = np.isfinite(np.asarray(mask_top_k_top_p(logits, top_k=3, top_p=0.6)))  # top-k first, renormalised
    np.testing.assert_array_equal(keep, [[False, True, False, True]])


def test_top_k_one_is_argmax_and_samples_stay_in_support():
    logits = jax.random.normal(jax.random.key(0), (3, 7, 32))
    keys = jax.random.split(jax.random.key(1), 8)

    @jax.jit
    def draw(keys, logits):
        greedy = jax.vmap(lambda k: sample_top_k_top_p(k, logits, top_k=1)[0])(keys)  # [8, 3, 7]
        tokens = jax.vmap(lambda k: sample_top_k_top_p(k, logits, top_k=5, top_p=0.9)[0])(keys)
        return greedy, tokens, mask_top_k_top_p(logits, top_k=5, top_p=0.9)

    greedy, tokens, masked = draw(keys, logits)
    np.testing.assert_array_equal(greedy, np.broadcast_to(np.argmax(logits, -1), greedy.shape))
    allowed = np.isfinite(np.asarray(masked))
    picked = np.take_along_axis(np.broadcast_to(allowed, (8, *allowed.shape)), np.asarray(tokens)[..., None], -1)
    assert picked.all()
    assert len(np.unique(np.asarray(tokens))) > 1


# ------------------------------------------------------------------------------------ sampler


def test_sampler_deterministic_given_key():
    patch_nums = (1, 2)
    model = tiny_var(depth=1, patch_nums=patch_nums)
    vae = StubTokenizer(TINY["vocab_size"], TINY["Cvae"], patch_nums, rngs=nnx.Rngs(1))
    kwargs = dict(B=2, label_B=[1, 4], cfg=2.0, top_k=0, top_p=0.9, more_smooth=True, return_logits=True)
    first = autoregressive_infer_cfg(model, vae, key=jax.random.key(5), **kwargs)
    again = autoregressive_infer_cfg(model, vae, key=jax.random.key(5), **kwargs)
    other = autoregressive_infer_cfg(model, vae, key=jax.random.key(6), **kwargs)
    assert first.images.shape == (2, 2, 2, 3)
    assert float(first.images.min()) >= 0.0 and float(first.images.max()) <= 1.0
    np.testing.assert_array_equal(first.images, again.images)
    assert len(first.tokens) == len(patch_nums)
    for a, b, pn in zip(first.tokens, again.tokens, patch_nums):
        assert a.shape == (2, pn * pn)
        np.testing.assert_array_equal(a, b)
    assert first.guided_logits[0].shape == (2, 1, TINY["vocab_size"])
    tokens = np.concatenate([np.asarray(t) for t in first.tokens], 1)
    other_tokens = np.concatenate([np.asarray(t) for t in other.tokens], 1)
    assert not np.array_equal(tokens, other_tokens)


def test_a_kv_cache_needs_its_write_position():
    model = tiny_var()
    x = jnp.zeros((2, 1, TINY["embed_dim"]))
    with pytest.raises(ValueError, match="cache and cache_at go together"):
        model.blocks[0].attn(x, cache=model.empty_cache(2, 4)[0])
