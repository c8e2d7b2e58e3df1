"""Tests of the VAR tokenizer port: resampling operators, phi mapping, quantizer, parity and porting."""

from __future__ import annotations

import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bitlaws.models.vqvae import VQVAE, VectorQuantizer2, area_resize, bicubic_resize, phi_index
from bitlaws.port import recipe
from bitlaws.port.checks import vqvae as vqvae_check
from bitlaws.port.mapping import PortError
from bitlaws.port.tables.vqvae import port_vqvae

jax.config.update("jax_default_matmul_precision", "highest")

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures"


# ----------------------------------------------------------------------------------------------
# Slow loop references.
# ----------------------------------------------------------------------------------------------

def _keys_cubic(x: float, a: float = -0.75) -> float:
    """Keys cubic convolution kernel k(x) with parameter a."""
    x = abs(x)
    if x <= 1:
        return (a + 2) * x ** 3 - (a + 3) * x ** 2 + 1
    if x < 2:
        return a * x ** 3 - 5 * a * x ** 2 + 8 * a * x - 4 * a
    return 0.0


def _bicubic_reference(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Per-pixel bicubic (align_corners=False, a=-0.75, clamped taps) of ``[B, H, W, C]``, float64."""
    b, h, w, c = x.shape
    out = np.zeros((b, out_h, out_w, c))
    for oy in range(out_h):
        sy = (oy + 0.5) * h / out_h - 0.5
        fy = math.floor(sy)
        for ox in range(out_w):
            sx = (ox + 0.5) * w / out_w - 0.5
            fx = math.floor(sx)
            for iy in range(fy - 1, fy + 3):
                for ix in range(fx - 1, fx + 3):
                    weight = _keys_cubic(sy - iy) * _keys_cubic(sx - ix)
                    out[:, oy, ox] += weight * x[:, min(max(iy, 0), h - 1), min(max(ix, 0), w - 1)]
    return out


def _area_reference(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Adaptive average pooling of ``[B, H, W, C]`` with windows [floor(i*In/Out), ceil((i+1)*In/Out))."""
    b, h, w, c = x.shape
    out = np.zeros((b, out_h, out_w, c))
    for oy in range(out_h):
        y0, y1 = math.floor(oy * h / out_h), math.ceil((oy + 1) * h / out_h)
        for ox in range(out_w):
            x0, x1 = math.floor(ox * w / out_w), math.ceil((ox + 1) * w / out_w)
            out[:, oy, ox] = x[:, y0:y1, x0:x1].mean(axis=(1, 2))
    return out


# ----------------------------------------------------------------------------------------------
# Analytic parameter count of upstream's architecture (basic_vae.py / quant.py / vqvae.py).
# ----------------------------------------------------------------------------------------------

def _conv_params(k: int, cin: int, cout: int) -> int:
    return k * k * cin * cout + cout


def _resnet_params(cin: int, cout: int) -> int:
    shortcut = _conv_params(1, cin, cout) if cin != cout else 0
    return 2 * cin + _conv_params(3, cin, cout) + 2 * cout + _conv_params(3, cout, cout) + shortcut


def _attn_params(c: int) -> int:
    return 2 * c + _conv_params(1, c, 3 * c) + _conv_params(1, c, c)


def upstream_param_count(ch: int, vocab: int, z: int, quant_conv_ks: int = 3, num_phi: int = 4) -> int:
    """Parameters of upstream VQVAE (encoder + decoder + codebook + phi convs + quant convs)."""
    mult, blocks = (1, 1, 2, 2, 4), 2
    total, width = _conv_params(3, 3, ch), ch  # encoder conv_in
    for level, m in enumerate(mult):
        for _ in range(blocks):
            total += _resnet_params(width, ch * m)
            width = ch * m
            total += _attn_params(width) if level == len(mult) - 1 else 0
        total += _conv_params(3, width, width) if level != len(mult) - 1 else 0
    total += 2 * _resnet_params(width, width) + _attn_params(width) + 2 * width + _conv_params(3, width, z)
    total += _conv_params(3, z, width) + 2 * _resnet_params(width, width) + _attn_params(width)  # decoder
    for level in reversed(range(len(mult))):
        for _ in range(blocks + 1):
            total += _resnet_params(width, ch * mult[level])
            width = ch * mult[level]
            total += _attn_params(width) if level == len(mult) - 1 else 0
        total += _conv_params(3, width, width) if level != 0 else 0
    total += 2 * width + _conv_params(3, width, 3)
    return total + vocab * z + num_phi * _conv_params(3, z, z) + 2 * _conv_params(quant_conv_ks, z, z)


# ----------------------------------------------------------------------------------------------
# Tests.
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size_in,size_out", [((1, 1), (4, 4)), ((3, 2), (16, 7)), ((4, 5), (4, 5)),
                                              ((13, 10), (16, 16))])
def test_bicubic_matches_per_pixel_formula(size_in, size_out):
    x = np.random.default_rng(0).standard_normal((2, *size_in, 3)).astype(np.float32)
    ours = np.asarray(bicubic_resize(jnp.asarray(x), size_out))
    ref = _bicubic_reference(x.astype(np.float64), *size_out)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-6)


def test_bicubic_is_not_jax_cubic():
    """Guards against a=-0.5 (jax.image.resize): the two differ on non-smooth data."""
    x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 3, 3, 1)), jnp.float32)
    ours = bicubic_resize(x, (8, 8))
    theirs = jax.image.resize(x, (1, 8, 8, 1), "cubic")
    assert float(jnp.max(jnp.abs(ours - theirs))) > 1e-3


@pytest.mark.parametrize("size_in,size_out", [((4, 10), (3, 3)), ((10, 4), (3, 3)), ((16, 16), (13, 5)),
                                              ((6, 6), (3, 2))])
def test_area_matches_loop_reference(size_in, size_out):
    x = np.random.default_rng(2).standard_normal((2, *size_in, 3)).astype(np.float32)
    ours = np.asarray(area_resize(jnp.asarray(x), size_out))
    ref = _area_reference(x.astype(np.float64), *size_out)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-6)


def test_phi_index_mapping():
    assert [phi_index(si, 10, 4) for si in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert [phi_index(si, 4, 4) for si in range(4)] == [0, 1, 2, 3]
    assert [phi_index(si, 5, 1) for si in range(5)] == [0] * 5
    assert [phi_index(si, 3, 0) for si in range(3)] == [0, 1, 2]
    assert [phi_index(si, 5, 2) for si in range(5)] == [0, 0, 0, 1, 1]  # 0.5 ties: float64 picks 0


def _tiny_quantizer(using_znorm: bool) -> VectorQuantizer2:
    return VectorQuantizer2(16, 4, using_znorm=using_znorm, v_patch_nums=(1, 2, 3, 5), quant_resi=0.5,
                            share_quant_resi=4, default_qresi_counts=0, rngs=nnx.Rngs(3))


@nnx.jit
def _quantizer_paths(model: VectorQuantizer2, f: jax.Array) -> dict:
    """Every quantizer path on ``[B, H, W, C]`` features, in one compiled program."""
    b, side, _, c = f.shape
    idx = model.f_to_idx_bl_or_fhat(f, to_fhat=False)
    maps = [model.embed(i).reshape(b, pn, pn, c) for i, pn in zip(idx, model.v_patch_nums)]
    f_hat = jnp.zeros((b, side, side, c), jnp.float32)
    next_inputs = []
    for si, h in enumerate(maps):
        f_hat, nxt = model.get_next_autoregressive_input(si, len(maps), f_hat, h)
        if si < len(maps) - 1:
            next_inputs.append(nxt.reshape(b, -1, c))
    return {"idx": idx, "f_hats": model.f_to_idx_bl_or_fhat(f, to_fhat=True),
            "decoded": model.embed_to_fhat(maps), "autoregressive_f_hat": f_hat,
            "autoregressive_inputs": jnp.concatenate(next_inputs, axis=1),
            "var_input": model.idx_bl_to_var_input(idx)}


@pytest.mark.parametrize("using_znorm", [False, True])
def test_quantizer_paths_agree(using_znorm):
    """Tokenize -> f_hat agrees with the decode-side f_hat, the VAR input and the autoregressive updates."""
    model = _tiny_quantizer(using_znorm)
    f = jnp.asarray(np.random.default_rng(4).standard_normal((2, 5, 5, 4)), jnp.float32)
    out = _quantizer_paths(model, f)
    idx = out["idx"]
    assert [i.shape for i in idx] == [(2, 1), (2, 4), (2, 9), (2, 25)]
    assert all(i.dtype == jnp.int32 for i in idx)

    codebook = np.asarray(model.embedding.embedding[...])
    first = np.asarray(f).mean(axis=(1, 2))  # [B, C]: area pooling to 1x1
    if using_znorm:
        cosine = (first / np.linalg.norm(first, axis=1, keepdims=True)) @ (
            codebook / np.linalg.norm(codebook, axis=1, keepdims=True)).T
        expected = cosine.argmax(axis=1)
    else:
        expected = ((first[:, None] - codebook[None]) ** 2).sum(-1).argmin(axis=1)
    np.testing.assert_array_equal(np.asarray(idx[0])[:, 0], expected)

    for ours, ref in zip(out["decoded"], out["f_hats"]):
        np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=1e-5)
    np.testing.assert_allclose(np.asarray(out["autoregressive_f_hat"]), np.asarray(out["f_hats"][-1]),
                               atol=1e-5)
    assert out["var_input"].shape == (2, 4 + 9 + 25, 4)
    np.testing.assert_allclose(np.asarray(out["var_input"]), np.asarray(out["autoregressive_inputs"]),
                               atol=1e-6)


def test_fixture_parity():
    manifest = json.loads((FIXTURES / "manifest.json").read_text())
    results = vqvae_check.check(FIXTURES, manifest)
    names = {r.name for r in results}
    assert {"enc_f", "fhat_per_scale", "idx_BL", "img_rec_all", "x_BLCv_wo_first_l",
            "img_rec_last_noshape", "idx_Bl.0", "idx_Bl.3"} <= names
    failed = [r.line() for r in results if not r.passed()]
    assert not failed, failed


def test_port_names_missing_and_unexpected_keys():
    manifest = json.loads((FIXTURES / "manifest.json").read_text())
    ctor = manifest["fixtures"]["vqvae"]["ctor"]
    state = recipe.regenerate(FIXTURES / "vqvae_weights_manifest.json", verify=False)
    del state["decoder.up.4.attn.1.qkv.weight"]
    state["encoder.down.0.extra.weight"] = np.zeros((1,), np.float32)
    with pytest.raises(PortError) as info:
        port_vqvae(state, **ctor)
    assert info.value.missing == ["decoder.up.4.attn.1.qkv.kernel"]
    assert info.value.unexpected == ["encoder.down.0.extra.weight"]
    assert "decoder.up.4.attn.1.qkv.kernel" in str(info.value)


def test_param_count_of_release_config():
    """vae_ch160v4096z32: our parameter count equals upstream's, about 108.9M."""
    weights_manifest = json.loads((FIXTURES / "vqvae_weights_manifest.json").read_text())
    fixture_params = sum(math.prod(e["shape"]) for e in weights_manifest["entries"] if e["rule"] != "keep")
    assert upstream_param_count(ch=32, vocab=64, z=8) == fixture_params  # the counter matches upstream

    abstract = nnx.eval_shape(lambda: VQVAE(vocab_size=4096, z_channels=32, ch=160, rngs=nnx.Rngs(0)))
    ours = sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    expected = upstream_param_count(ch=160, vocab=4096, z=32)
    assert ours == expected
    assert abs(expected - 108.9e6) / 108.9e6 < 0.01


@pytest.mark.parametrize("share_quant_resi", [0, 1])
def test_port_other_phi_sharing_modes(share_quant_resi):
    """Upstream names the Phi convs ``quant_resi.{i}`` (no sharing) or ``quant_resi.qresi`` (one shared)."""
    manifest = json.loads((FIXTURES / "manifest.json").read_text())
    ctor = dict(manifest["fixtures"]["vqvae"]["ctor"], share_quant_resi=share_quant_resi)
    state = recipe.regenerate(FIXTURES / "vqvae_weights_manifest.json", verify=False)
    phi_keys = [k for k in state if k.startswith("quantize.quant_resi.qresi_ls.")]
    for key in phi_keys:
        index, leaf = key.split(".")[-2:]
        value = state.pop(key)
        if share_quant_resi == 0:
            state[f"quantize.quant_resi.{index}.{leaf}"] = value
        elif index == "0":
            state[f"quantize.quant_resi.qresi.{leaf}"] = value
    model = port_vqvae(state, **ctor)
    assert len(model.quantize.quant_resi) == (4 if share_quant_resi == 0 else 1)
    np.testing.assert_array_equal(np.asarray(model.quantize.quant_resi[0].conv.bias[...]),
                                  state[f"quantize.quant_resi.{'0' if share_quant_resi == 0 else 'qresi'}.bias"])
