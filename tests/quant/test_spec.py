"""QuantSpec / QuantRule validation: every error names the offending field."""

import pytest

from bitlaws.quant import QuantRule, QuantSpec, parse_format


def test_group_size_not_dividing_a_4096_axis_names_group_size():
    spec = QuantSpec(format="int4", granularity="group", group_size=100)
    with pytest.raises(ValueError, match="group_size=100") as e:
        spec.check_axis(4096, "w")
    assert "4096" in str(e.value)


@pytest.mark.parametrize("kwargs,field", [
    (dict(format="int17"), "int4"),  # the format parser lists valid names
    (dict(format="int4", granularity="row"), "granularity"),
    (dict(format="int4", granularity="group"), "group_size"),
    (dict(format="int4", granularity="group", group_size=0), "group_size"),
    (dict(format="int4", granularity="channel", group_size=128), "group_size"),
    (dict(format="int4", calibrator="entropy"), "calibrator"),
    (dict(format="int4", percentile=40.0), "percentile"),
    (dict(format="int4", mse_candidates=0), "mse_candidates"),
    (dict(format="int4", scale_dtype="float64"), "scale_dtype"),
    (dict(format="int8", granularity="token", static=True), "static"),
    (dict(format="mxfp4", granularity="channel"), "granularity"),
    (dict(format="mxfp4", group_size=16), "group_size"),
])
def test_invalid_specs(kwargs, field):
    with pytest.raises(ValueError, match=field):
        QuantSpec(**kwargs)


def test_defaults_and_parsing():
    spec = QuantSpec(format="int4")
    assert spec.format == parse_format("int4") and spec.granularity == "channel" and spec.bits == 4
    mx = QuantSpec(format="mxfp4")
    assert mx.granularity == "group" and mx.group_size == 32
    assert QuantSpec(format="int4", granularity="group", group_size=128).short() == "int4/g128/minmax"


def test_specs_are_hashable_and_frozen():
    spec = QuantSpec(format="fp8_e4m3")
    assert hash(spec) == hash(QuantSpec(format="fp8_e4m3"))
    with pytest.raises(AttributeError):
        spec.group_size = 4  # type: ignore[misc]


def test_rule_validation():
    with pytest.raises(ValueError, match="module_path"):
        QuantRule(module_path="blocks[")
    with pytest.raises(ValueError, match="token"):
        QuantRule(module_path=".*", weight=QuantSpec(format="int4", granularity="token"))
    with pytest.raises(ValueError, match="channel"):
        QuantRule(module_path=".*", act=QuantSpec(format="int8", granularity="channel"))
    with pytest.raises(TypeError, match="QuantSpec"):
        QuantRule(module_path=".*", weight="int4")  # type: ignore[arg-type]
    rule = QuantRule(module_path=r"blocks\.\d+\.fc1")
    assert rule.matches("blocks.3.fc1") and not rule.matches("blocks.3.fc1x") and not rule.matches("xblocks.3.fc1")
