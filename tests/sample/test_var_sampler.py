"""VAR sampler compilation layout: padded scale lengths, one program per length, padding changes nothing."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bitlaws.quant import QuantRule, QuantSpec, quantize_model
from bitlaws.sample import filtering, var_sampler
from bitlaws.sample.var_sampler import autoregressive_infer_cfg, rows_independent, scale_lengths
from tests.models.test_var import TINY, StubTokenizer, tiny_var


def _brute_force(lengths, padding):
    """(groups, rows) of the best split of consecutive scales by exhaustive search."""
    n, budget = len(lengths), (1 + padding) * sum(lengths)
    best = None
    for cuts in itertools.product((False, True), repeat=n - 1):
        ends = [i + 1 for i, cut in enumerate(cuts) if cut] + [n]
        rows, begin = 0, 0
        for end in ends:
            rows += (end - begin) * lengths[end - 1]
            begin = end
        if rows <= budget and (best is None or (len(ends), rows) < best):
            best = (len(ends), rows)
    return best


@pytest.mark.parametrize("patch_nums", [(1, 2, 3, 4, 6, 8), (1, 2, 3, 4, 5, 6, 8, 10, 13, 16), (1,), (2, 3)])
@pytest.mark.parametrize("padding", [0.0, 0.1, 0.3, 1.0, 10.0])
def test_scale_lengths_fewest_programs_within_budget(patch_nums, padding):
    lengths = [pn * pn for pn in patch_nums]
    padded = scale_lengths(patch_nums, padding)
    assert len(padded) == len(lengths)
    assert all(p >= l for p, l in zip(padded, lengths))
    assert list(padded) == sorted(padded)  # groups are consecutive scales
    assert all(p in lengths for p in padded)  # a group runs at its largest scale's length
    assert (len(set(padded)), sum(padded)) == _brute_force(lengths, padding)


def test_scale_lengths_examples():
    assert scale_lengths((1, 2, 3, 4, 6, 8), 0.0) == (1, 4, 9, 16, 36, 64)
    assert scale_lengths((1, 2, 3, 4, 6, 8)) == (9, 9, 9, 36, 36, 64)
    assert len(set(scale_lengths((1, 2, 3, 4, 5, 6, 8, 10, 13, 16)))) == 4
    assert scale_lengths((1, 2, 3, 4, 6, 8), 100.0) == (64,) * 6


@pytest.fixture(scope="module")
def model_and_tokenizer():
    patch_nums = (1, 2, 3, 4)
    model = tiny_var(depth=2, patch_nums=patch_nums)
    return model, StubTokenizer(TINY["vocab_size"], TINY["Cvae"], patch_nums, rngs=nnx.Rngs(1))


def _sample(model, vae, padding, compile_ahead=True):
    return autoregressive_infer_cfg(model, vae, B=3, label_B=[0, 2, 4], key=jax.random.key(3), cfg=1.5, top_k=8,
                                    top_p=0.9, return_logits=True, padding=padding, compile_ahead=compile_ahead)


def test_padding_changes_no_real_token(model_and_tokenizer):
    model, vae = model_and_tokenizer
    exact, one_program = _sample(model, vae, 0.0), _sample(model, vae, 100.0)
    for a, b in zip(exact.guided_logits, one_program.guided_logits):
        assert a.shape == b.shape
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-5)
    for a, b in zip(exact.tokens, one_program.tokens):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
    np.testing.assert_allclose(np.asarray(one_program.images), np.asarray(exact.images), atol=1e-5)


def test_one_compilation_per_padded_length(model_and_tokenizer):
    model, vae = model_and_tokenizer
    for padding, programs in ((100.0, 1), (0.0, 4)):
        var_sampler._scale_logits.clear_cache()
        var_sampler._scale_tokens.clear_cache()
        _sample(model, vae, padding, compile_ahead=False)
        _sample(model, vae, padding, compile_ahead=False)  # a second call compiles nothing new
        assert var_sampler._scale_logits._cache_size() == programs
        assert var_sampler._scale_tokens._cache_size() == 1  # one tokenizer program for every scale


def test_compiled_ahead_same_samples_same_program_count(model_and_tokenizer):
    """`compile_ahead` (concurrent ahead-of-time compilation) gives bit-identical samples, compiles one transformer
    program per padded length, and a second call compiles nothing."""
    from bitlaws.sample import ahead

    model, vae = model_and_tokenizer
    for padding, programs in ((100.0, 1), (0.0, 4)):
        ahead.clear()
        var_sampler._scale_logits.clear_cache()
        first = _sample(model, vae, padding)
        held = [key for key in ahead._EXECUTABLES if key[0] is var_sampler._scale_logits]
        assert len(held) == programs
        tokens = [key for key in ahead._EXECUTABLES if key[0] is var_sampler._scale_tokens]
        assert len(tokens) == 1  # the tokenizer's program serves every scale
        count = len(ahead._EXECUTABLES)
        assert count == programs + 2  # + tokens + decode
        second = _sample(model, vae, padding)
        assert len(ahead._EXECUTABLES) == count
        assert var_sampler._scale_logits._cache_size() == 0  # every call went to the executables compiled ahead
        plain = _sample(model, vae, padding, compile_ahead=False)
        for out in (second, plain):
            np.testing.assert_array_equal(np.asarray(out.images), np.asarray(first.images))
            for a, b in zip(out.tokens, first.tokens):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_compile_ahead_by_default_for_small_models_only(model_and_tokenizer):
    """Small models compile ahead by default; large ones (VAR-d16's 16 x 1024-wide blocks) rely on async dispatch."""
    import types

    from bitlaws.sample import ahead

    model, vae = model_and_tokenizer
    assert var_sampler.auto_compile_ahead(model)
    assert not var_sampler.auto_compile_ahead(types.SimpleNamespace(depth=16, embed_dim=1024))
    ahead.clear()
    autoregressive_infer_cfg(model, vae, B=3, label_B=[0, 2, 4], key=jax.random.key(3), cfg=1.5, top_k=8)
    assert any(key[0] is var_sampler._scale_tokens for key in ahead._EXECUTABLES)


def test_ahead_falls_back_to_the_jitted_call():
    """A program whose executable is not held, or whose compilation failed, runs (or raises) through `jax.jit`."""
    from bitlaws.sample import ahead

    @jax.jit
    def double(x):
        return 2 * x

    @jax.jit
    def bad(x):
        return x @ x  # a rank-1 input of length 3 works; the spec below (shape (2, 3)) fails to lower

    programs = ahead.Programs()
    assert programs.prepare([(bad, {}, (jax.ShapeDtypeStruct((2, 3), jnp.float32),))]) == 1
    with pytest.raises(TypeError):
        programs.call(bad, {}, (jnp.ones((2, 3)),))
    np.testing.assert_array_equal(np.asarray(programs.call(double, {}, (jnp.arange(3),))), [0, 2, 4])


def test_padding_off_when_a_per_tensor_calibrator_would_see_it(model_and_tokenizer):
    model, _ = model_and_tokenizer
    per_token = QuantRule(module_path=r".*fc1", weight=QuantSpec(format="int8"),
                          act=QuantSpec(format="int8", granularity="token"))
    percentile = QuantRule(module_path=r".*fc1", weight=QuantSpec(format="int8"),
                           act=QuantSpec(format="int8", granularity="tensor", calibrator="percentile"))
    assert rows_independent(model)
    assert rows_independent(quantize_model(model, [per_token], mode="fake"))
    assert not rows_independent(quantize_model(model, [percentile], mode="fake"))



@pytest.mark.parametrize("vocab", [7, 4096])
def test_one_threshold_masking_equals_the_literal_upstream_masking(vocab):
    """`mask_top_k_top_p` (one partial sort) keeps the tokens of the two-sort reference on untied logits;
    at an extreme nucleus (p = 0.999) they may differ only on tokens of negligible probability (float rounding of
    the cumulative sums in the far tail)."""
    rng = np.random.default_rng(vocab)
    for scale in (0.3, 3.0, 10.0):
        logits = jnp.asarray(rng.normal(size=(4, 6, vocab)).astype(np.float32) * scale)
        for top_k in (0, 1, 5, 900, vocab + 3):
            for top_p in (0.0, 0.5, 0.9, 0.96):
                ours = np.isfinite(np.asarray(filtering.mask_top_k_top_p(logits, top_k, top_p)))
                reference = np.isfinite(np.asarray(filtering.mask_top_k_top_p_reference(logits, top_k, top_p)))
                np.testing.assert_array_equal(ours, reference, err_msg=f"top_k={top_k} top_p={top_p} scale={scale}")
            ours = np.isfinite(np.asarray(filtering.mask_top_k_top_p(logits, top_k, 0.999)))
            reference = np.isfinite(np.asarray(filtering.mask_top_k_top_p_reference(logits, top_k, 0.999)))
            probs = np.asarray(jax.nn.softmax(logits, axis=-1))
            assert probs[ours != reference].max(initial=0.0) < 1e-4


def test_ordered_keys_follow_the_float_order():
    values = np.array([-np.inf, -3e38, -1.5, -1e-30, -0.0, 0.0, 1e-45, 1e-30, 2.0, 3e38, np.inf], np.float32)
    keys = np.asarray(filtering.ordered_keys(jnp.asarray(values))).astype(np.int64)
    assert np.all(np.diff(keys) > 0)


def test_bitwise_search_finds_the_kth_largest_exactly():
    """`largest_accepted_key` with a counting predicate returns the k-th largest value of each row, ties included."""
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(5, 300)).astype(np.float32) * np.array([[1e-20], [1.0], [1e3], [1e30], [1.0]],
                                                                     np.float32)
    logits[4, :100] = 0.5  # ties
    keys = filtering.ordered_keys(jnp.asarray(logits))
    for k in (1, 7, 150, 300):
        found = filtering.largest_accepted_key(lambda t: jnp.sum(keys >= t, axis=-1, keepdims=True) >= k,
                                                 (5, 1))
        expected = np.sort(np.asarray(keys), axis=-1)[:, ::-1][:, k - 1:k]
        np.testing.assert_array_equal(np.asarray(found), expected)
