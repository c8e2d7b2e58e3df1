"""Bit accounting: MT, CT and exact storage."""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bitlaws.quant import (MethodResult, QuantRule, QuantSpec, apply_method, bit_accounting, quantize_model,
                           register_method)
from bitlaws.quant.layers import QWeight



def test_fp_model_counts_everything_at_16_bits(block):
    report = bit_accounting(block)
    n = report.total_params
    assert n == sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(block, nnx.Param)))
    assert report.mt_bits == 16 * n and report.ct_bits == 256 * n and report.storage_bytes == 2 * n


def test_mt_ct_follow_the_paper(block):
    rules = [QuantRule(module_path="qkv", weight=QuantSpec(format="int4"),
                       act=QuantSpec(format="int8", granularity="token")),
             QuantRule(module_path=r"mlp\.\d+", weight=QuantSpec(format="int3", granularity="group",
                                                                  group_size=32))]
    report = bit_accounting(block, rules)
    qkv = block.qkv.kernel.size
    mlp = block.mlp[0].kernel.size + block.mlp[1].kernel.size
    other = report.total_params - qkv - mlp
    assert report.mt_bits == 4 * qkv + 3 * mlp + 16 * other  # MT = sum b_w N
    assert report.ct_bits == 4 * 8 * qkv + 3 * 16 * mlp + 256 * other  # CT = sum b_w b_a N
    # The same numbers from the quantized model's own settings, and storage equal to the real QArrays.
    packed = quantize_model(block, rules, mode="packed")
    packed_report = bit_accounting(packed)
    assert (packed_report.mt_bits, packed_report.ct_bits) == (report.mt_bits, report.ct_bits)
    qarrays = [v.get_value() for _, v in nnx.to_flat_state(nnx.state(packed, QWeight))]
    real = sum(leaf.nbytes for leaf in jax.tree.leaves(qarrays))
    assert packed_report.storage_bytes == real + 2 * other
    assert packed_report.total_params == report.total_params


def test_accounting_works_on_abstract_models(block):
    abstract = nnx.eval_shape(lambda: type(block)(32, nnx.Rngs(0)))
    rules = [QuantRule(module_path=".*", weight=QuantSpec(format="int4"))]
    assert bit_accounting(abstract, rules) == bit_accounting(block, rules)


def _vqarray(shape, seed):
    """A hand-built GPTVQ `VQArray` of a kernel of `shape`: one 1-D codebook of 16 centroids, 4-bit indices.

    Built in numpy (two 4-bit indices per byte, the even row in the low nibble, as `packing.pack_bits` does).
    """
    from bitlaws.ptq.gptvq_core import VQArray  # pylint: disable=g-import-not-at-top

    rng = np.random.default_rng(seed)
    k, n = math.prod(shape[:-1]), shape[-1]
    codes = np.zeros((k + k % 2, n), np.uint8)
    codes[:k] = rng.integers(0, 16, (k, n))
    codebooks = (rng.standard_normal((1, 1, 16, 1)) * 2**12).astype(np.float16)
    return VQArray(indices=jnp.asarray(codes[0::2] | codes[1::2] << 4), codebooks=jnp.asarray(codebooks),
                   codebook_exp=jnp.full((1, 1), -16, jnp.int16), shape=tuple(shape), dim=1, group_size=k,
                   group_cols=n, index_bits=4)


def _fixed_vq(problem):
    """A method that "quantizes" every target to a fixed hand-built `VQArray` (seeded by its position)."""
    return MethodResult(weights={t.path: _vqarray(t.kernel.shape, i) for i, t in enumerate(problem.targets)})


register_method("fixed-vq-for-test", _fixed_vq, replace=True)


def test_packed_vq_kernels_are_measured_from_the_live_arrays(block, images):
    rules = [QuantRule(module_path="stem", weight=QuantSpec(format="int4")),
             QuantRule(module_path=r"mlp\.\d+", weight=QuantSpec(format="int3", granularity="group", group_size=32),
                       act=QuantSpec(format="int8", granularity="token"))]
    packed = apply_method(block, rules, "fixed-vq-for-test", materialize="packed")
    baked = apply_method(block, rules, "fixed-vq-for-test", materialize="baked")  # dequantized VQ kernels
    vq = {"stem": packed.stem.qkernel.get_value(), "mlp.0": packed.mlp[0].qkernel.get_value(),
          "mlp.1": packed.mlp[1].qkernel.get_value()}
    np.testing.assert_array_equal(np.asarray(baked.stem.kernel[...]), np.asarray(vq["stem"].dequantize()))
    # The seam dequantizes VQ kernels in qconv and qdot (with the A8 quantizer still applied).
    np.testing.assert_array_equal(np.asarray(packed(images)), np.asarray(baked(images)))
    report = bit_accounting(packed)
    by_path = {l.path: l for l in report.layers}
    for path, v in vq.items():
        assert by_path[path].storage_bytes == v.nbytes and by_path[path].model_bits == v.nbytes * 8
        assert by_path[path].bits_w == v.bits_per_weight
    assert vq["stem"].nbytes == 14 * 32 + 16 * 2 + 2  # 27 4-bit indices per column, 16 float16, an exponent
    qkv_proj = block.qkv.kernel.size + block.proj.kernel.size
    other = report.total_params - qkv_proj - sum(v.size for v in vq.values())
    vq_bits = sum(v.nbytes * 8 for v in vq.values())
    assert report.mt_bits == vq_bits + 16 * (qkv_proj + other)
    assert report.ct_bits == vq["stem"].nbytes * 8 * 16 + (vq_bits - vq["stem"].nbytes * 8) * 8 \
        + 256 * (qkv_proj + other)
    assert report.storage_bytes == sum(v.nbytes for v in vq.values()) + 2 * (qkv_proj + other)
    assert bit_accounting(packed, rules) == report  # rules do not describe VQ storage: measured either way
    # Spec-based accounting of the float model is unchanged.
    assert bit_accounting(block, rules).mt_bits == 4 * block.stem.kernel.size + 3 * (
        block.mlp[0].kernel.size + block.mlp[1].kernel.size) + 16 * (qkv_proj + other)
