"""Post-training quantization methods: each a pure ``*_core.py`` algorithm plus a thin integration.

Cores work on plain arrays (a kernel ``[in, out]``, a Hessian ``[in, in]``, activation statistics) and return
`bitlaws.quant.QArray`s (GPTVQ: `gptvq_core.VQArray`s), or rewritten arrays; they know nothing about models.
Importing this package registers the integrated methods in the one method registry (`bitlaws.quant.methods`):
``gptq``, ``gptvq``, ``smoothquant``, ``awq`` and ``omniquant``.
"""

from bitlaws.ptq import gptq, gptvq, omniquant, smoothing  # noqa: F401  (register the methods)
