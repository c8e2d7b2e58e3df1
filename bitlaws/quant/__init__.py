"""The quantization core: formats, calibration, specs and rules, packed arrays, the seam, methods, accounting.

Public API::

    from bitlaws.quant import (parse_format, QuantSpec, QuantRule, QArray, quantize, dequantize, fake_quant,
                               quantize_model, register_method)
"""

from bitlaws.quant.accounting import BitReport, bit_accounting, qarray_nbytes
from bitlaws.quant.calibrate import register_calibrator
from bitlaws.quant.formats import (FpFormat, IntFormat, LutFormat, MxFormat, QFormat, format_names, parse_format,
                                   register_format)
from bitlaws.quant.layers import QConv, QLinear, QuantizedLayer
from bitlaws.quant.methods import (CalibrationData, MethodProblem, MethodResult, QuantMethod, Target,
                                   cached_calibration, calibrate_on, get_method,
                                   method_names, register_method, register_weight_method)
from bitlaws.quant.qarray import QArray, dequantize, fake_quant, quantize
from bitlaws.quant.seam import ActStats, LayerQuant, qconv, qdot, register_backend
from bitlaws.quant.spec import QuantRule, QuantSpec
from bitlaws.quant.transform import (MethodRun, UnusedRuleWarning, apply_method, bake_fake_weights,
                                     calibration_stats, check_rules, match_rules, materialize_result, quantize_model,
                                     run_calibration, run_method, set_compute_dtype,
                                     with_mode)

__all__ = [
    "ActStats", "BitReport", "CalibrationData", "FpFormat", "IntFormat", "LayerQuant", "LutFormat",
    "MethodProblem", "MethodResult", "MethodRun",
    "MxFormat", "QArray", "QConv", "QFormat", "QLinear", "QuantMethod", "QuantRule", "QuantSpec", "QuantizedLayer",
    "Target", "UnusedRuleWarning", "apply_method", "bake_fake_weights", "bit_accounting", "cached_calibration",
    "calibrate_on",
    "calibration_stats", "check_rules", "dequantize", "fake_quant", "format_names", "get_method", "match_rules",
    "materialize_result", "method_names", "parse_format", "qarray_nbytes", "qconv", "qdot", "quantize", "quantize_model",
    "register_backend", "register_calibrator", "register_format", "register_method", "register_weight_method",
    "run_calibration", "run_method", "set_compute_dtype", "with_mode",
]
