"""The quantization core: formats, calibration, specs and rules, packed arrays, the seam, bit accounting.

Public API::

    from bitlaws.quant import (parse_format, QuantSpec, QuantRule, QArray, quantize, dequantize, fake_quant,
                               quantize_model)
"""

from bitlaws.quant.accounting import BitReport, bit_accounting, qarray_nbytes
from bitlaws.quant.formats import FpFormat, IntFormat, MxFormat, QFormat, format_names, parse_format
from bitlaws.quant.layers import QConv, QLinear, QuantizedLayer
from bitlaws.quant.qarray import QArray, dequantize, fake_quant, quantize
from bitlaws.quant.seam import ActStats, LayerQuant, qconv, qdot, register_backend
from bitlaws.quant.spec import QuantRule, QuantSpec
from bitlaws.quant.transform import (UnusedRuleWarning, calibration_stats, match_rules,
                                     bake_fake_weights, quantize_model, register_weight_method, run_calibration,
                                     with_mode)

__all__ = [
    "ActStats", "BitReport", "bake_fake_weights", "FpFormat", "IntFormat", "LayerQuant", "MxFormat", "QArray", "QConv", "QFormat",
    "QLinear", "QuantRule", "QuantSpec", "QuantizedLayer", "UnusedRuleWarning", "bit_accounting",
    "calibration_stats", "dequantize", "fake_quant", "format_names", "match_rules", "parse_format", "qarray_nbytes",
    "qconv", "qdot", "quantize", "quantize_model", "register_backend", "register_weight_method", "run_calibration", "with_mode",
]
