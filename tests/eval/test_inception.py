"""FID Inception-v3: fixture parity, PyTorch bilinear resize, input validation, weight loading and porting."""

from __future__ import annotations

import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bitlaws.eval import inception
from bitlaws.eval.inception import FIDInceptionV3, bilinear_matrix, preprocess_uint8, resize_bilinear
from bitlaws.port import read_state_dict
from bitlaws.port.checks import fid as fid_check
from bitlaws.port.mapping import PortError, to_state_dict
from bitlaws.port.tables.inception import ENV_VAR, WEIGHTS_FILE, load_fid_inception, port_inception
from bitlaws.quant import QuantRule, QuantSpec, quantize_model

jax.config.update("jax_default_matmul_precision", "highest")

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures"
WEIGHTS_MANIFEST = FIXTURES / "fid_inception_weights_manifest.json"


@pytest.fixture(scope="module")
def manifest() -> dict:
    return json.loads((FIXTURES / "manifest.json").read_text())


@pytest.fixture(scope="module")
def weights_manifest() -> dict:
    return json.loads(WEIGHTS_MANIFEST.read_text())


@pytest.fixture(scope="module")
def state_dict(manifest) -> dict[str, np.ndarray]:
    return fid_check.load_state_dict(FIXTURES, manifest)


@pytest.fixture(scope="module")
def model(state_dict) -> FIDInceptionV3:
    return port_inception(state_dict)


@pytest.fixture(scope="module")
def io_arrays() -> dict[str, np.ndarray]:
    return read_state_dict(FIXTURES / "fid_io.safetensors")


# ------------------------------------------------------------------------------------------------ parity

def test_fixture_check_passes(manifest):
    results = fid_check.check(FIXTURES, manifest)
    by_name = {r.name: r for r in results}
    expected = {"resized_crop_0_16", "features", "pool3_raw", "fd.value_f64",
                *(f"block{k}_{kind}" for k in range(4) for kind in ("shape", "spatial_mean"))}
    assert expected <= set(by_name)
    failed = [r.line() for r in results if not r.passed()]
    assert not failed, "\n".join(failed)
    assert by_name["features"].rel_err <= 1e-4
    assert by_name["block3_shape"].integer


def test_logits_are_the_fc_of_pool3(model, state_dict, io_arrays):
    images = np.transpose(io_arrays["images"], (0, 2, 3, 1))  # [B, H, W, 3]
    pool3, logits, _ = fid_check.run_inception(model, images)  # same shapes as the check: compiled once
    assert logits.shape == (images.shape[0], 1008)
    ref_features = io_arrays["features"]
    assert np.abs(np.asarray(pool3) - ref_features).max() <= 1e-4 * np.abs(ref_features).max()
    ref_logits = ref_features.astype(np.float64) @ state_dict["fc.weight"].T.astype(np.float64) + state_dict["fc.bias"]
    assert np.abs(np.asarray(logits) - ref_logits).max() <= 1e-4 * np.abs(ref_logits).max()


# ------------------------------------------------------------------------------------------------ resize

def _torch_bilinear_pixel(image: np.ndarray, oy: int, ox: int, out_h: int, out_w: int) -> np.ndarray:
    """One output pixel of F.interpolate(bilinear, align_corners=False), written from ATen's formula.

    ATen (``area_pixel_compute_scale`` / ``area_pixel_compute_source_index`` in ``UpSample.h``) evaluates
    ``scale = in / out`` and ``src = scale * (dst + 0.5) - 0.5`` in the input's dtype, float32 here; the
    interpolation itself is done in float64. image [H, W, C] float64.
    """
    in_h, in_w = image.shape[:2]
    f32 = np.float32

    def source(dst: int, in_size: int, out_size: int) -> tuple[int, int, float]:
        scale = f32(in_size) / f32(out_size)
        src = float(scale * (f32(dst) + f32(0.5)) - f32(0.5))
        src = max(src, 0.0)
        low = int(math.floor(src))
        high = low + 1 if low < in_size - 1 else low
        return low, high, src - low

    y0, y1, fy = source(oy, in_h, out_h)
    x0, x1, fx = source(ox, in_w, out_w)
    top = (1 - fx) * image[y0, x0] + fx * image[y0, x1]
    bottom = (1 - fx) * image[y1, x0] + fx * image[y1, x1]
    return (1 - fy) * top + fy * bottom


@pytest.mark.parametrize("in_hw", [(64, 48), (512, 400)], ids=["upsample", "downsample"])
def test_resize_matches_pytorch_bilinear_formula(in_hw):
    rng = np.random.default_rng(0)
    image = rng.uniform(0.0, 1.0, size=(1, *in_hw, 2)).astype(np.float32)
    out = np.asarray(resize_bilinear(jnp.asarray(image), 299))
    assert out.shape == (1, 299, 299, 2)
    rows = [*range(0, 6), *range(147, 152), *range(293, 299)]  # both borders (index clamp) and the middle
    ref = np.array([[_torch_bilinear_pixel(image[0].astype(np.float64), y, x, 299, 299) for x in range(299)]
                    for y in rows])  # [len(rows), 299, 2]
    np.testing.assert_allclose(out[0, rows], ref, rtol=0, atol=1e-6)


def test_bilinear_matrix_rows_sum_to_one_and_identity_at_same_size():
    for in_size in (7, 64, 299, 512):
        matrix = bilinear_matrix(in_size, 299)
        np.testing.assert_allclose(matrix.sum(axis=1), 1.0, atol=1e-6)
        assert (matrix >= 0).all()
    np.testing.assert_array_equal(bilinear_matrix(299, 299), np.eye(299, dtype=np.float32))


def test_resize_equals_the_interpolation_matrices():
    images = jnp.asarray(np.random.default_rng(1).uniform(size=(2, 37, 53, 3)).astype(np.float32))
    dense = np.einsum("oh,bhwc->bowc", bilinear_matrix(37, 29), np.asarray(images, np.float64))
    dense = np.einsum("pw,bowc->bopc", bilinear_matrix(53, 29), dense)
    np.testing.assert_allclose(np.asarray(resize_bilinear(images, 29)), dense, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------------ pools and fusions

@pytest.mark.parametrize("shape,window,stride,padding", [
    ((2, 9, 9, 3), 3, 2, 0), ((1, 10, 7, 2), 3, 2, 0), ((2, 5, 5, 4), 3, 1, 1), ((1, 4, 6, 1), 2, 2, 0)])
def test_max_pool_equals_reduce_window(shape, window, stride, padding):
    x = jax.random.normal(jax.random.key(0), shape)
    pads = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    want = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, window, window, 1), (1, stride, stride, 1), pads)
    np.testing.assert_array_equal(inception.max_pool(x, window, stride, padding), want)


@pytest.mark.parametrize("shape", [(2, 6, 5, 3), (1, 1, 1, 2), (1, 2, 3, 1)])
def test_average_pool_excludes_padding(shape):
    x = np.random.default_rng(2).normal(size=shape).astype(np.float32)
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    ones = np.pad(np.ones(shape[1:3]), 1)
    want = np.zeros_like(x)
    for i in range(shape[1]):
        for j in range(shape[2]):
            want[:, i, j] = padded[:, i:i + 3, j:j + 3].sum(axis=(1, 2)) / ones[i:i + 3, j:j + 3].sum()
    np.testing.assert_allclose(inception.avg_pool_3x3_exclude_pad(jnp.asarray(x)), want, rtol=1e-6, atol=1e-6)


def _features(model, images):
    graph, state = nnx.split(model)
    return np.asarray(jax.jit(lambda state, x: nnx.merge(graph, state).features(x))(state, images))


def test_fused_pointwise_branches_equal_the_layer_by_layer_network(model, io_arrays, monkeypatch):
    images = jnp.asarray(np.transpose(io_arrays["images"][:1], (0, 2, 3, 1)))  # [1, H, W, 3]
    assert all(layer.plain for _, layer in nnx.iter_graph(model) if isinstance(layer, inception.BasicConv2d))
    fused = _features(model, images)
    with monkeypatch.context() as patch:  # every conv alone, every pool branch pooled before its conv
        patch.setattr(inception.BasicConv2d, "plain", property(lambda self: False))
        unfused = _features(model, images)
    assert np.abs(fused - unfused).max() <= 1e-5 * np.abs(unfused).max()


def test_quantized_branch_convs_are_not_fused_or_moved(model, io_arrays, monkeypatch):
    """Activation quantization does not commute with the pool: a quantized pool-branch conv sees the pooled input."""
    rules = [QuantRule(module_path=r"Mixed_5b\.branch_pool\.conv", weight=QuantSpec(format="int4"),
                       act=QuantSpec(format="int4", granularity="token"))]
    quantized = quantize_model(model, rules, mode="fake")
    assert not quantized.Mixed_5b.branch_pool.plain and quantized.Mixed_5b.branch1x1.plain
    x = jax.random.normal(jax.random.key(5), (1, 35, 35, 192))
    block = quantized.Mixed_5b
    want = block.branch_pool(inception.avg_pool_3x3_exclude_pad(x))
    got = block(x)[..., -want.shape[-1]:]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    float_branch = model.Mixed_5b(x)[..., -want.shape[-1]:]
    assert np.abs(np.asarray(got) - np.asarray(float_branch)).max() > 1e-3  # the quantization did something


# ------------------------------------------------------------------------------------------------ inputs

@pytest.mark.parametrize("bad, message", [
    (np.zeros((8, 8, 3), np.float32), "rank 3"),
    (np.zeros((1, 3, 8, 8), np.float32), "NCHW"),
    (np.zeros((1, 8, 8, 1), np.float32), "1 channels"),
    (np.full((1, 8, 8, 3), 255.0, np.float32), "outside \\[0, 1\\]"),
    (np.full((1, 8, 8, 3), -0.5, np.float32), "outside \\[0, 1\\]"),
    (np.full((1, 8, 8, 3), np.nan, np.float32), "outside \\[0, 1\\]"),
    (np.zeros((1, 8, 8, 3), np.int32), "neither floating nor uint8"),
])
def test_bad_inputs_raise_value_error(model, bad, message):
    with pytest.raises(ValueError, match=message) as info:
        model.features(bad)
    assert "[batch, height, width, 3]" in str(info.value)


def test_uint8_input_is_divided_by_255(model):
    images = np.random.default_rng(1).integers(0, 256, size=(1, 5, 6, 3), dtype=np.uint8)
    as_float = np.asarray(preprocess_uint8(images))
    assert as_float.dtype == np.float32
    np.testing.assert_allclose(as_float, images / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(model.prepare(images)), np.asarray(model.prepare(as_float)))
    with pytest.raises(ValueError, match="uint8"):
        preprocess_uint8(as_float)


# ------------------------------------------------------------------------------------------------ weights

def test_missing_weights_file_names_file_and_env_var(monkeypatch, tmp_path):
    missing = tmp_path / "nowhere.pth"
    monkeypatch.setenv(ENV_VAR, str(missing))
    with pytest.raises(FileNotFoundError) as info:
        load_fid_inception()
    text = str(info.value)
    assert str(missing) in text and WEIGHTS_FILE in text and ENV_VAR in text and "mseitzer/pytorch-fid" in text

    monkeypatch.delenv(ENV_VAR)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=ENV_VAR) as info:
        load_fid_inception()
    assert str(tmp_path / ".cache" / "bitlaws" / WEIGHTS_FILE) in str(info.value)


def test_param_count_matches_manifest(manifest, weights_manifest):
    """Counts `nnx.Param` values (conv kernels, BN scale/bias, fc) and `nnx.BatchStat` values (BN running stats).

    The manifest's ``n_params`` counts every state-dict value: floats plus one per int64 ``num_batches_tracked``.
    """
    abstract = nnx.eval_shape(lambda: FIDInceptionV3(nnx.Rngs(0)))
    n_param = sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    n_stats = sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(abstract, nnx.BatchStat)))
    entries = weights_manifest["entries"]
    n_running = sum(math.prod(e["shape"]) for e in entries if e["key"].endswith(("running_mean", "running_var")))
    n_counters = sum(1 for e in entries if e["key"].endswith("num_batches_tracked"))
    n_params = manifest["fixtures"]["fid"]["n_params"]
    assert n_params == sum(math.prod(e["shape"]) for e in entries)
    assert n_stats == n_running
    assert n_param == n_params - n_running - n_counters


def test_wrapper_key_names_port_to_the_same_trunk(model, state_dict, weights_manifest):
    wrapper = {e["wrapper_key"]: state_dict[e["key"]] for e in weights_manifest["entries"]
               if e["wrapper_key"] is not None and e["key"] in state_dict}
    assert "blocks.2.0.branch1x1.conv.weight" in wrapper
    trunk = port_inception(wrapper)
    assert trunk.fc is None
    ours, ref = to_state_dict(trunk), to_state_dict(model)
    assert set(ours) == {k for k in ref if not k.startswith("fc.")}
    for key, value in ours.items():
        np.testing.assert_array_equal(value, ref[key], err_msg=key)
    with pytest.raises(ValueError, match="no fc"):
        trunk(np.zeros((1, 8, 8, 3), np.float32))


def test_port_error_names_missing_key(state_dict):
    partial = {k: v for k, v in state_dict.items() if k != "Mixed_7c.branch_pool.bn.running_var"}
    partial["AuxLogits.fc.weight"] = np.zeros((1000, 768), np.float32)  # ignored, like num_batches_tracked
    with pytest.raises(PortError) as info:
        port_inception(partial)
    assert info.value.missing == ["Mixed_7c.branch_pool.bn.var"]
    assert not info.value.unexpected
