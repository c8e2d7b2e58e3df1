"""XLA compiler options of bitlaws' compiled programs (`jax.jit(..., compiler_options=COMPILER_OPTIONS)`).

XLA:CPU (jaxlib 0.10) hands dots and convolutions, with the elementwise ops and reductions around them, to
YNNPACK fusions. On the 2-core x86 CPUs this project runs on they are slower than XLA's own kernels (Eigen)
for every workload measured, and they lengthen compilation:

* the VAR transformer: a whole attention (``q k^T``, mask, softmax, ``p v``) became one fusion running at
  ~8 GFLOP/s; demo member var-d4, 500 samples with CFG, one core (``python benchmarks/sampler_xla_options.py``):
  a compiled sampling call 13.8 s -> 6.9 s, the first call (compilation included) 33.5 s -> 22.0 s; the DiT
  DDIM loop of dit-d5 within noise (-3 %);
* convolutions and the full-size models (``python benchmarks/xla_options_ab.py``, 2026-12-01, both cores,
  random weights, default options -> these, min of 2 steady calls): 3x3 conv 160 -> 160 on 8x128x128 0.548 ->
  0.319 s, FID Inception pool3 features of 32 images 5.60 -> 2.84 s, VAR's VQVAE decode of 2 images 7.06 ->
  4.73 s, a 4096^3 float32 matmul 1.118 -> 1.042 s.

Outputs change in the last float bits only (summation order). Every sampler, decoder and the FID feature
extractor compile with these options. They are XLA debug options (one set for every backend); the
``xla_cpu_*`` ones only act in XLA:CPU. Set the environment variable ``BITLAWS_XLA_DEFAULTS=1`` (before
importing bitlaws) to compile with XLA's defaults.
"""

import os

DEFAULTS_ENV = "BITLAWS_XLA_DEFAULTS"
COMPILER_OPTIONS = ({} if os.environ.get(DEFAULTS_ENV) == "1"
                    else {"xla_cpu_experimental_ynn_fusion_type": ""})  # the empty list: no YNNPACK fusions
