"""capture: module inputs/outputs recorded through nnx.jit, stacked for block-wise training."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bitlaws.quant import QLinear, capture
from bitlaws.quant.methods import CalibrationData

MASK = np.triu(np.full((5, 5), -1.0, np.float32), 1)  # a numpy constant passed to every block (like VAR's mask)


class Block(nnx.Module):
    """``(x + fc(x) * c + mask-mix, "aux")``: positional, keyword and constant arguments, a tuple output."""

    def __init__(self, dim: int, rngs: nnx.Rngs):
        self.fc = QLinear(dim, dim, rngs=rngs)

    def __call__(self, x, c, *, mask=None):  # x [B, L, D], c [B, D]
        h = x + self.fc(x) * c[:, None]
        if mask is not None:
            h = h + jnp.einsum("lm,bmd->bld", mask, x) * 0.1
        return h, "aux"


class Net(nnx.Module):
    def __init__(self, dim: int = 8):
        rngs = nnx.Rngs(0)
        self.embed = QLinear(3, dim, rngs=rngs)
        self.cond = QLinear(2, dim, rngs=rngs)
        self.blocks = nnx.List([Block(dim, rngs) for _ in range(3)])
        self.head = QLinear(dim, 4, rngs=rngs)

    def __call__(self, x, y):  # x [B, L, 3], y [B, 2]
        h, c = self.embed(x), self.cond(y)
        for block in self.blocks:
            h, _ = block(h, c, mask=MASK)
        return self.head(h)


TRACES = []


@nnx.jit
def _jit_forward(model, batch):
    TRACES.append(1)  # runs at trace time only
    return model(*batch)


def _batches(n: int = 3, b: int = 2):
    keys = jax.random.split(jax.random.key(0), 2 * n)
    return [(jax.random.normal(keys[2 * i], (b, 5, 3)), jax.random.normal(keys[2 * i + 1], (b, 2))) for i in range(n)]


@pytest.fixture(name="net")
def net_fixture():
    return Net()


def test_capture_under_nnx_jit_returns_exactly_the_block_inputs(net):
    batches = _batches()
    data = CalibrationData(_jit_forward, batches)
    calls = capture.capture_calls(net, ["blocks.0", "blocks.2", "head"], data, outputs=True)
    assert [len(calls[p]) for p in ("blocks.0", "blocks.2", "head")] == [3, 3, 3]
    for batch, call0, call2, head in zip(batches, calls["blocks.0"], calls["blocks.2"], calls["head"]):
        x, y = batch
        h0, c = net.embed(x), net.cond(y)  # the manual forward
        h1, _ = net.blocks[0](h0, c, mask=MASK)
        h2, _ = net.blocks[1](h1, c, mask=MASK)
        h3, aux = net.blocks[2](h2, c, mask=MASK)
        np.testing.assert_allclose(call0.args[0], h0, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(call0.args[1], c, rtol=1e-6, atol=1e-6)
        assert call0.kwargs["mask"] is MASK  # a constant is passed through as the object itself
        assert isinstance(call0.args[0], np.ndarray)
        np.testing.assert_allclose(call2.args[0], h2, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(call2.output[0], h3, rtol=1e-5, atol=1e-6)
        assert call2.output[1] == aux == "aux"
        np.testing.assert_allclose(head.args[0], h3, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(head.output, net.head(h3), rtol=1e-5, atol=1e-6)
        assert head.kwargs == {}


def test_capture_eager_and_jit_agree_and_model_is_untouched(net):
    batches = _batches(2)
    eager = capture.capture_calls(net, ["blocks.1"], CalibrationData(lambda m, b: m(*b), batches))
    jitted = capture.capture_calls(net, ["blocks.1"], CalibrationData(_jit_forward, batches))
    for a, b in zip(eager["blocks.1"], jitted["blocks.1"]):
        np.testing.assert_allclose(a.args[0], b.args[0], rtol=1e-6, atol=1e-6)
        assert a.output is None
    assert type(net.blocks[1]) is Block  # the recorders live in a clone


def test_a_second_capture_reuses_the_compiled_forward(net):
    data = CalibrationData(_jit_forward, _batches(2))
    capture.capture_calls(net, ["blocks.0", "blocks.1"], data)
    traces = len(TRACES)
    calls = capture.capture_calls(net, ["blocks.0", "blocks.1"], data)
    assert len(TRACES) == traces  # same recorder graph: no retrace ...
    assert len(calls["blocks.0"]) == 2  # ... and the new recording still receives the calls


def test_nested_paths_and_never_called_modules(net):
    data = CalibrationData(_jit_forward, _batches(1))
    calls = capture.capture_calls(net, ["blocks.0", "blocks.0.fc"], data)
    np.testing.assert_allclose(calls["blocks.0.fc"][0].args[0], calls["blocks.0"][0].args[0])

    class Unused(nnx.Module):
        def __init__(self):
            self.net = Net()
            self.spare = QLinear(3, 3, rngs=nnx.Rngs(1))

        def __call__(self, x, y):
            return self.net(x, y)

    assert capture.capture_calls(Unused(), ["spare"], data)["spare"] == []


def test_stack_calls_batches_arrays_and_shares_constants(net):
    calls = capture.capture_calls(net, ["blocks.1"], CalibrationData(_jit_forward, _batches(3, b=2)))["blocks.1"]
    batch = capture.stack_calls(calls, "blocks.1")
    assert batch.n == 6
    assert batch.signature.kinds == ("batched", "batched", "array")
    assert [a.shape for a in batch.batched] == [(6, 5, 8), (6, 8)]
    args, kwargs = batch.call_args()
    np.testing.assert_array_equal(args[0][2:4], calls[1].args[0])
    np.testing.assert_array_equal(kwargs["mask"], MASK)
    hash(batch.signature)  # usable as a static cache key
    out, _ = net.blocks[1](jnp.asarray(args[0]), jnp.asarray(args[1]), **kwargs)  # all samples in one call
    np.testing.assert_allclose(out[:2], net.blocks[1](jnp.asarray(calls[0].args[0]), jnp.asarray(calls[0].args[1]),
                                                      mask=MASK)[0], rtol=1e-6, atol=1e-6)


def test_stack_calls_errors_name_the_argument():
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match=r"\[1\]\['scale'\].*differs between call 0 and call 1"):
        capture.stack_calls([capture.Call((x,), {"scale": 1.0}), capture.Call((x,), {"scale": 2.0})], "blocks.0")
    with pytest.raises(ValueError, match="blocks.3 was never called"):
        capture.stack_calls([], "blocks.3")
    with pytest.raises(ValueError, match="call 1 of layer has arguments"):
        capture.stack_calls([capture.Call((x,), {}), capture.Call((x, x), {})], "layer")


def test_bad_paths_are_named(net):
    with pytest.raises(ValueError, match=r"no module at path 'blocks\.7'.*blocks\.0"):
        capture.recording(net, ["blocks.7"])
    with pytest.raises(ValueError, match="non-empty"):
        capture.recording(net, [""])
    assert capture.paths_matching(net, r"blocks\.\d+") == ["blocks.0", "blocks.1", "blocks.2"]
    assert capture.natural_sorted(["blocks.10", "blocks.2", "blocks.2.fc"]) == ["blocks.2", "blocks.2.fc", "blocks.10"]
