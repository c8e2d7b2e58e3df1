"""LlamaGen VQ tokenizer: the l2-normalised nearest-code rule, straight-through codes, decode_code, ctor, size."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bitlaws import configlib
from bitlaws.models.common import random_model
from bitlaws.models.llamagen_vq import LlamaGenVQ, vq_ctor_kwargs
from bitlaws.quant.layers import QConv, QLinear

jax.config.update("jax_default_matmul_precision", "highest")

CONFIG = pathlib.Path(__file__).resolve().parents[2] / "configs" / "models" / "llamagen_vq16.py"
TINY = dict(codebook_size=16, codebook_embed_dim=4, encoder_ch_mult=(1, 2), decoder_ch_mult=(1, 2),
            z_channels=32, ch=32, num_res_blocks=1)


@pytest.fixture(scope="module")
def tiny() -> LlamaGenVQ:
    return random_model(lambda: LlamaGenVQ(**TINY, rngs=nnx.Rngs(0)), 5)


@nnx.jit
def _run(model, img):
    z = model.encode_features(img)
    quant, idx = model.encode(img)
    shape = quant.shape
    return z, quant, idx, model.quantize.get_codebook_entry(idx, shape), model.decode_code(idx, shape), model(img)


def test_encode_decode(tiny):
    img = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 3)), jnp.float32)
    z, quant, idx, code, dec_code, rec = (np.asarray(a) for a in _run(tiny, img))
    assert z.shape == (2, 4, 4, 4) and idx.shape == (2, 16) and idx.dtype == np.int32
    assert dec_code.shape == rec.shape == (2, 8, 8, 3)
    z_n = z / np.linalg.norm(z, axis=-1, keepdims=True)
    table = np.asarray(tiny.quantize.embedding.embedding[...])
    e_n = table / np.linalg.norm(table, axis=-1, keepdims=True)
    # Nearest normalised code = highest cosine similarity; raster order (b, h, w).
    np.testing.assert_array_equal(idx, np.argmax(z_n.reshape(2, 16, 4) @ e_n.T, -1))
    np.testing.assert_allclose(code, e_n[idx].reshape(2, 4, 4, 4), atol=1e-6)
    np.testing.assert_allclose(quant, code, atol=1e-6)  # straight-through: the code up to rounding
    np.testing.assert_allclose(rec, dec_code, atol=1e-4)


def test_raw_codebook_without_l2_norm():
    model = random_model(lambda: LlamaGenVQ(**TINY, codebook_l2_norm=False, rngs=nnx.Rngs(0)), 6)
    z = jnp.asarray(np.random.default_rng(1).normal(size=(1, 2, 2, 4)), jnp.float32)
    quant, idx = model.quantize(z)
    table = np.asarray(model.quantize.embedding.embedding[...])
    distance = ((np.asarray(z).reshape(4, 1, 4) - table[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(np.asarray(idx).reshape(-1), distance.argmin(-1))
    np.testing.assert_allclose(np.asarray(quant).reshape(4, 4), table[distance.argmin(-1)], atol=1e-6)


def test_every_conv_and_linear_is_a_seam_layer(tiny):
    layers = [m for _, m in nnx.iter_graph(tiny) if isinstance(m, (QConv, QLinear))]
    others = [m for _, m in nnx.iter_graph(tiny) if isinstance(m, (nnx.Conv, nnx.Linear))]
    assert len(layers) > 20 and not others


def test_ctor_kwargs_from_the_upstream_nesting():
    nested = {"cls": "VQModel", "ModelArgs": {"codebook_size": 64, "z_channels": 32, "encoder_ch_mult": [1, 2]},
              "encoder": {"kwargs": {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "in_channels": 3}},
              "decoder": {"kwargs": {"ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1, "out_channels": 3}}}
    kwargs = vq_ctor_kwargs(nested)
    assert kwargs == dict(codebook_size=64, z_channels=32, encoder_ch_mult=(1, 2), decoder_ch_mult=(1, 2), ch=32,
                          num_res_blocks=1, in_channels=3, out_channels=3)
    nested["decoder"]["kwargs"]["ch"] = 64
    with pytest.raises(ValueError, match="encoder and decoder ch differ"):
        vq_ctor_kwargs(nested)
    nested["decoder"]["kwargs"].update(ch=32, norm_type="batch")
    with pytest.raises(ValueError, match="decoder norm_type='batch'"):
        vq_ctor_kwargs(nested)
    with pytest.raises(ValueError, match="ch=48 must be a multiple of 32"):
        LlamaGenVQ(ch=48, rngs=nnx.Rngs(0))


def test_bad_code_shape(tiny):
    with pytest.raises(ValueError, match=r"shape must be \(B, h, w, E=4\)"):
        tiny.decode_code(jnp.zeros((1, 4), jnp.int32), (1, 4, 2, 2))


def test_vq16_size():
    """Released VQ-16 ("72M"): 71,883,403 parameters here, from eval_shape only."""
    config = configlib.load_config(str(CONFIG))
    model = nnx.eval_shape(lambda: LlamaGenVQ(**config.vq.to_dict(), rngs=nnx.Rngs(0)))
    count = int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))))
    assert count == config.exact_params == 71_883_403
    assert abs(count - 72e6) <= 0.005 * 72e6
    assert model.downsample_factor == config.downsample == 16
