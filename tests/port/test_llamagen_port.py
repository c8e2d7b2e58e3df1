"""LlamaGen port: fixture parity through the verify checks, `bitlaws port llamagen` from the .pth, port errors."""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import pytest

from bitlaws.port import convert, read_safetensors, verify
from bitlaws.port.mapping import PortError
from bitlaws.port.tables.llamagen import port_llamagen
from bitlaws.port.tables.llamagen_vq import port_llamagen_vq

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture(scope="module")
def manifest():
    return json.loads((FIXTURES / "manifest.json").read_text())


EXPECTED = {
    "llamagen_vq": ("enc_h", "enc_z", "codebook_l2n", "idx", "idx_flat", "quant_code", "dec_code", "rec"),
    "llamagen_gpt": ("tf.logits", "tf.logits_null", "tf.guided", "tf.loss", "rope.freqs_cis", "greedy.tokens",
                     "greedy.guided_logits", "greedy.img", "gen.cond_logits", "gen.uncond_logits",
                     "gen.guided_logits", "gen.probs", "gen.tokens", "gen.img"),
    "llamagen_gpt_gqa": ("tf.logits", "tf.logits_null"),
}


@pytest.mark.parametrize("fixture", [
    "llamagen_vq",
    pytest.param("llamagen_gpt", marks=pytest.mark.slow),  # ~15 s; its sampled run is also checked fast below
    "llamagen_gpt_gqa",
])
def test_fixture_parity_through_the_verify_checks(fixture):
    results = verify.run_checks(FIXTURES, only=[fixture], log=print)
    assert set(EXPECTED[fixture]) <= {r.name for r in results if r.fixture == fixture}
    failed = [r.line() for r in results if not r.passed()]
    assert not failed, failed


def _write_config(path: pathlib.Path, section: str, body: dict) -> str:
    path.write_text("import ml_collections\n\n\ndef get_config(arg=None):\n"
                    f"    return ml_collections.ConfigDict({{{section!r}: {body!r}}})\n")
    return str(path)


def test_port_llamagen_from_the_pth_and_load_back(tmp_path, manifest):
    jax.config.update("jax_default_matmul_precision", "highest")
    ctor = manifest["fixtures"]["llamagen_gpt"]["ctor"]["ModelArgs"]
    config = _write_config(tmp_path / "gpt.py", "gpt", ctor)
    out = convert.convert("llamagen", FIXTURES / "llamagen_gpt_weights.pth", tmp_path / "gpt", config=config,
                          key="model")
    model = convert.load_ported(out)
    io = read_safetensors(FIXTURES / "llamagen_gpt_io.safetensors")
    logits = np.asarray(jax.jit(lambda t, y: model(t, y))(io["tf.tokens"], io["labels"]))
    assert np.abs(logits - io["tf.logits"]).max() / np.abs(io["tf.logits"]).max() < 1e-4
    meta = json.loads((out / "bitlaws.json").read_text())
    assert meta["kind"] == "llamagen" and meta["source"]["key"] == "model" and meta["ctor"]["n_head"] == 4
    with pytest.raises(ValueError, match="porting 'llamagen' needs --config"):
        convert.convert("llamagen", FIXTURES / "llamagen_gpt_weights.pth", tmp_path / "other")
    with pytest.raises(ValueError, match="has no 'gpt' section"):
        convert.convert("llamagen", FIXTURES / "llamagen_gpt_weights.pth", tmp_path / "other",
                        config=_write_config(tmp_path / "wrong.py", "model", ctor))


def test_port_errors_name_the_keys_and_buffers_are_ignored(manifest):
    ctor = manifest["fixtures"]["llamagen_gpt"]["ctor"]
    sd = read_safetensors(FIXTURES / "llamagen_gpt_weights.safetensors")
    extra = dict(sd, freqs_cis=np.zeros((17, 8, 2), np.float32),
                 **{"layers.0.attention.kv_cache.k_cache": np.zeros((4, 4, 24, 16), np.float32)})
    port_llamagen(extra, **ctor)  # recomputed / allocated buffers are dropped
    broken = dict(sd)
    del broken["layers.1.feed_forward.w3.weight"]
    broken["layers.0.attention.wqkv.weight"] = np.zeros((160, 64), np.float32)  # a GQA-shaped wqkv
    broken["layers.0.attention.bias"] = np.zeros((4,), np.float32)
    with pytest.raises(PortError) as error:
        port_llamagen(broken, **ctor)
    message = str(error.value)
    assert "layers.1.feed_forward.w3.kernel" in message
    assert "layers.0.attention.wqkv.kernel (checkpoint (64, 160), model (64, 192))" in message
    assert "layers.0.attention.bias" in message


def test_vq_port_error_names_the_key(manifest):
    fixture = manifest["fixtures"]["llamagen_vq"]
    from bitlaws.port import recipe  # pylint: disable=g-import-not-at-top

    sd = recipe.regenerate(FIXTURES / "llamagen_vq_weights_manifest.json")
    del sd["decoder.conv_blocks.0.attn.2.k.weight"]
    with pytest.raises(PortError) as error:
        port_llamagen_vq(sd, **fixture["ctor"])
    # The q/k/v triple is incomplete: its partners are reported unexpected and the fused kernel missing.
    assert "decoder.up.3.attn.2.qkv.kernel" in error.value.missing
    assert "decoder.conv_blocks.0.attn.2.q.weight" in error.value.unexpected
