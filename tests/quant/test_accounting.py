"""Bit accounting: MT, CT and exact storage."""

import math

import jax
from flax import nnx

from bitlaws.quant import QuantRule, QuantSpec, bit_accounting, quantize_model
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
