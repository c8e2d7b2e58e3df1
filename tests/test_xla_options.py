"""The samplers' XLA compiler options take effect, and the environment variable restores XLA's defaults."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp

from bitlaws import xla_options


def _attention(q, k):
    return jax.nn.softmax(q @ k.T, axis=-1) @ k  # the pattern XLA:CPU put into one YNNPACK fusion


def test_sampler_options_compile_attention_without_ynn_fusions():
    q, k = jnp.ones((64, 32)), jnp.ones((48, 32))
    compiled = jax.jit(_attention, compiler_options=xla_options.COMPILER_OPTIONS).lower(q, k).compile().as_text()
    assert "__ynn_fusion" not in compiled
    assert xla_options.COMPILER_OPTIONS == {"xla_cpu_experimental_ynn_fusion_type": ""}


def test_the_environment_variable_restores_xla_defaults():
    env = dict(os.environ, **{xla_options.DEFAULTS_ENV: "1"})
    out = subprocess.run([sys.executable, "-c", "from bitlaws import xla_options as x; print(x.COMPILER_OPTIONS)"],
                         env=env, check=True, capture_output=True, text=True).stdout
    assert out.strip() == "{}"


def test_convolutions_compile_to_xla_kernels():
    """Convolutions (decoders, FID Inception) ran 1.4-2x slower in XLA:CPU's YNNPACK fusions (bitlaws.xla_options)."""
    x, w = jnp.ones((2, 32, 32, 32)), jnp.ones((3, 3, 32, 32))

    def conv(x, w):
        dims = ("NHWC", "HWIO", "NHWC")
        return jax.nn.relu(jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dims))

    assert "__ynn_fusion" in jax.jit(conv).lower(x, w).compile().as_text()  # XLA's default here
    compiled = jax.jit(conv, compiler_options=xla_options.COMPILER_OPTIONS).lower(x, w).compile().as_text()
    assert "__ynn_fusion" not in compiled


def test_the_fid_feature_step_compiles_with_the_options():
    from jax.sharding import NamedSharding, PartitionSpec

    from bitlaws.eval import sharded

    mesh = sharded.data_mesh(1)
    w = jnp.ones((3, 3, 32, 32))

    def features(images):
        conv = jax.lax.conv_general_dilated(images, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.mean(jax.nn.relu(conv), axis=(1, 2))

    step = sharded._make_step(features, None, False, NamedSharding(mesh, PartitionSpec(sharded.DATA_AXIS)),
                              NamedSharding(mesh, PartitionSpec()))
    assert "__ynn_fusion" not in step.lower(jnp.ones((2, 32, 32, 32))).compile().as_text()
