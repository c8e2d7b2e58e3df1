"""The samplers' XLA compiler options take effect, and the environment variable restores XLA's defaults."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp

from bitlaws.sample import xla_options


def _attention(q, k):
    return jax.nn.softmax(q @ k.T, axis=-1) @ k  # the pattern XLA:CPU put into one YNNPACK fusion


def test_sampler_options_compile_attention_without_ynn_fusions():
    q, k = jnp.ones((64, 32)), jnp.ones((48, 32))
    compiled = jax.jit(_attention, compiler_options=xla_options.SAMPLER_OPTIONS).lower(q, k).compile().as_text()
    assert "__ynn_fusion" not in compiled
    assert xla_options.SAMPLER_OPTIONS == {"xla_cpu_experimental_ynn_fusion_type": ""}


def test_the_environment_variable_restores_xla_defaults():
    env = dict(os.environ, **{xla_options.DEFAULTS_ENV: "1"})
    out = subprocess.run([sys.executable, "-c", "from bitlaws.sample import xla_options as x; print(x.SAMPLER_OPTIONS)"],
                         env=env, check=True, capture_output=True, text=True).stdout
    assert out.strip() == "{}"
