"""The README's python code blocks run as written (the five-line example on both VAR and DiT)."""

import pathlib
import re
import warnings

import pytest
from flax import nnx

from bitlaws import configlib
from bitlaws.models.dit import DiT
from bitlaws.models.var import VAR
from bitlaws.quant import QArray, check_rules

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FIVE_LINE_MARKER = "report = bit_accounting(qmodel)"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def _five_line_example() -> str:
    blocks = [b for b in _python_blocks() if FIVE_LINE_MARKER in b]
    assert len(blocks) == 1, "the README should have exactly one five-line quantize_model example"
    return blocks[0]


def _small_var():  # embed_dim 128: the group size 128 of the example divides every block linear
    return VAR(vocab_size=64, Cvae=8, depth=2, embed_dim=128, num_heads=4, num_classes=10, patch_nums=(1, 2),
               rngs=nnx.Rngs(0))


def _small_dit():
    return DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=128, depth=2, num_heads=4, num_classes=10,
               rngs=nnx.Rngs(0))


@pytest.mark.parametrize("build", [_small_var, _small_dit], ids=["var", "dit"])
def test_five_line_example_runs_on_var_and_dit(build):
    model = build()
    namespace = {"model": model}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an unused rule (e.g. a regex that misses VAR's layer names) fails
        exec(compile(_five_line_example(), str(README), "exec"), namespace)  # pylint: disable=exec-used
    qmodel, report = namespace["qmodel"], namespace["report"]
    packed = [path for path, m in nnx.iter_modules(qmodel) if getattr(m, "qkernel", None) is not None]
    assert len(packed) == 8  # qkv, proj, fc1, fc2 of two blocks; nothing outside the blocks
    assert all(re.fullmatch(r"blocks\.\d+\.(attn|mlp|ffn)\..*", ".".join(map(str, p))) for p in packed)
    assert isinstance(qmodel.blocks[0].attn.proj.qkernel.get_value(), QArray)
    assert 0 < report.storage_bytes and report.mt_bits < 16 * report.total_params


def _released(path: str):
    return configlib.load_config(str(ROOT / "configs" / "models" / path))


def test_five_line_rules_fit_the_released_model_sizes():
    """The example's rules take every released VAR and DiT-XL/2 (abstract models: shapes only)."""
    namespace = {}
    source = _five_line_example().split("qmodel =")[0]  # imports and rules only
    exec(compile(source, str(README), "exec"), namespace)  # pylint: disable=exec-used
    rules = namespace["rules"]
    for depth in (16, 20, 24, 30):
        config = _released(f"var_d{depth}.py")
        model = nnx.eval_shape(lambda: VAR(vocab_size=config.vqvae.vocab_size, Cvae=config.vqvae.z_channels,
                                           **dict(config.var), rngs=nnx.Rngs(0)))
        check_rules(model, rules)
    config = _released("dit_xl2.py")
    ctor = {k: v for k, v in config.model.to_dict().items() if k != "cls"}
    model = nnx.eval_shape(lambda: DiT(**ctor, rngs=nnx.Rngs(0)))
    check_rules(model, rules)


def test_other_python_blocks_run():
    blocks = [b for b in _python_blocks() if FIVE_LINE_MARKER not in b]
    assert blocks, "the README's custom quantizer example is missing"
    for block in blocks:
        namespace = {}
        exec(compile(block, str(README), "exec"), namespace)  # pylint: disable=exec-used
