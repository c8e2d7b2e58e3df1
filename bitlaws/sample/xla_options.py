"""XLA compiler options of the samplers' compiled programs (`jax.jit(..., compiler_options=SAMPLER_OPTIONS)`).

XLA:CPU (jaxlib 0.10) groups dots with the elementwise ops and reductions around them into YNNPACK fusions. In
the VAR transformer this puts a whole attention (``q k^T``, mask, softmax, ``p v``) into one fusion that ran at
~8 GFLOP/s, and it lengthens compilation. Turning these fusions off for the sampling programs (dots go to XLA's
own kernels) measured, on this 2-core CPU, one core, demo member var-d4, 500 samples with CFG
(``python benchmarks/sampler_xla_options.py``): a compiled sampling call 13.8 s -> 6.9 s and the first call
(compilation included) 33.5 s -> 22.0 s; the DiT DDIM loop of dit-d5 is within noise (-3 %). Outputs change
in the last float bits only (summation order).

The options are XLA debug options (one set for every backend); the ``xla_cpu_*`` ones only act in XLA:CPU (not
yet run on a GPU or TPU in this project: no device was lent when this was written). Set the
environment variable ``BITLAWS_XLA_DEFAULTS=1`` (before importing bitlaws) to compile with XLA's defaults.
"""

import os

DEFAULTS_ENV = "BITLAWS_XLA_DEFAULTS"
SAMPLER_OPTIONS = ({} if os.environ.get(DEFAULTS_ENV) == "1"
                   else {"xla_cpu_experimental_ynn_fusion_type": ""})  # the empty list: no YNNPACK fusions
