"""Quantization-aware training with distillation (losses, the QAT methods).

Importing this package registers ``qat:mse``, ``qat:js``, ``qat:fkl``, ``qat:rkl`` and ``qat:topkld`` in the one
method registry (`bitlaws.quant.methods`); see `bitlaws.qat.qat`.
"""

from bitlaws.qat import losses, qat  # noqa: F401  (qat registers the methods)
