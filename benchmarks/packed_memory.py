"""Bytes a packed model really holds: random-weight VAR-d16 in packed W4A16 against its bf16 weights.

Counted from the live arrays of the model (`jax.Array.nbytes` of every leaf of its NNX state: packed codes,
scales, the per-tensor scale exponents, and every parameter left in float), not from specs. Two ratios:

* the quantized layers (every linear layer of the transformer, `var_family.QUANT_PATTERN`; ``word_embed``, whose
  K = 32 holds no group of 128, per channel): their packed bytes
  against the same kernels in bf16 - goal ([8/12]) <= 0.27 (int4 + a float16 scale per 128 weights is
  (4 + 0.125) / 16 = 0.258);
* the whole VAR transformer (norm, position and class embeddings, biases kept as they are) against all of its
  parameters in bf16.

Usage::

    python benchmarks/packed_memory.py                  # VAR-d16, int4 g128
    python benchmarks/packed_memory.py --depth 30 --format int3
"""

from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp
from flax import nnx

from bitlaws import configlib
from bitlaws.demo.var_family import QUANT_PATTERN
from bitlaws.models.common import random_model
from bitlaws.models.var import VAR, var_ctor_kwargs
from bitlaws.port.convert import REPO_CONFIGS, model_ctor
from bitlaws.quant import QuantRule, QuantSpec, quantize_model, transform

MIB = 2.0**20


def live_bytes(tree) -> int:
    """Sum of ``nbytes`` over the arrays of a pytree (QArray fields included)."""
    return sum(int(leaf.nbytes) for leaf in jax.tree.leaves(tree) if hasattr(leaf, "nbytes"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=16, choices=(16, 20, 24, 30))
    parser.add_argument("--format", default="int4")
    parser.add_argument("--group-size", type=int, default=128)
    args = parser.parse_args()

    config = configlib.load_config(str(REPO_CONFIGS / f"var_d{args.depth}.py"))
    ctor = var_ctor_kwargs(model_ctor(config.var), model_ctor(config.vqvae))
    model = random_model(lambda: VAR(**ctor, rngs=nnx.Rngs(0)))
    params = sum(math.prod(v.get_value().shape) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    # word_embed (K = 32, the VQVAE's code width) cannot hold groups of 128: one scale per channel there.
    rules = [QuantRule(module_path="word_embed", weight=QuantSpec(format=args.format, granularity="channel")),
             QuantRule(module_path=QUANT_PATTERN,
                       weight=QuantSpec(format=args.format, granularity="group", group_size=args.group_size))]
    layers = [path for path, _ in transform.quant_layers(model) if any(rule.matches(path) for rule in rules)]
    kernel_params = sum(math.prod(dict(transform.quant_layers(model))[p].kernel.get_value().shape) for p in layers)
    qmodel = quantize_model(model, rules, mode="packed")
    jax.block_until_ready(jax.tree.leaves(nnx.state(qmodel)))
    qlayers = dict(transform.quant_layers(qmodel))
    packed_bytes = sum(live_bytes(qlayers[p].qkernel.get_value()) for p in layers)
    total_bytes = live_bytes(nnx.state(qmodel))
    bf16 = jnp.dtype(jnp.bfloat16).itemsize
    print(f"VAR-d{args.depth}: {params / 1e6:.1f}M parameters; {len(layers)} quantized layers holding "
          f"{kernel_params / 1e6:.1f}M weights ({args.format}, group {args.group_size})")
    print(f"quantized layers: packed {packed_bytes / MIB:.1f} MiB vs bf16 {kernel_params * bf16 / MIB:.1f} MiB "
          f"= {packed_bytes / (kernel_params * bf16):.4f} (goal <= 0.27)")
    print(f"whole transformer: {total_bytes / MIB:.1f} MiB live vs {params * bf16 / MIB:.1f} MiB in bf16 "
          f"= {total_bytes / (params * bf16):.4f}")


if __name__ == "__main__":
    main()
