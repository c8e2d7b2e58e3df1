"""Step-by-step sampling: the same samples as the library's samplers, perturbations where (and only where) asked."""

import math

import jax
import numpy as np
import pytest

from bitlaws.analysis import subjects
from bitlaws.demo import family

LABELS = np.array([0, 3, 7, 9], np.int32)


def test_var_trajectory_is_the_sampler(var_subject):
    member = family.load_member("var-d1")
    expected = member.sample(member.model, LABELS, jax.random.key(5))
    run = var_subject.trajectory(LABELS, jax.random.key(5))
    np.testing.assert_array_equal(run.images, expected)
    assert run.num_steps == var_subject.num_steps == len(member.model.patch_nums)
    for pn, logits, f_hat in zip(member.model.patch_nums, run.features, run.representations):
        assert logits.shape == (4, pn * pn, member.model.vocab_size)
        assert f_hat.shape[0] == 4
    # f_hat accumulates: the last one is what gets decoded, and every scale adds something
    assert all(not np.array_equal(a, b) for a, b in zip(run.representations, run.representations[1:]))


def test_dit_trajectory_matches_the_scanned_sampler(dit_subject):
    from bitlaws.demo import dit_family

    member = family.load_member("dit-d2")
    expected = dit_family.sample_digits(member.model, LABELS, jax.random.key(5), cfg_scale=member.cfg_scale,
                                        respacing="ddim5")
    run = dit_subject.trajectory(LABELS, jax.random.key(5))
    np.testing.assert_allclose(run.images, expected, atol=2e-5)
    assert run.num_steps == 5 and dit_subject.step_names[0] == "t=800" and dit_subject.step_names[-1] == "t=0"
    assert all(f.shape == (4, 16, 16, 3) for f in run.features)
    np.testing.assert_array_equal(np.clip(run.representations[-1], -1, 1), run.images)


@pytest.mark.parametrize("which", ["var", "dit"])
def test_infinite_snr_reproduces_the_float_samples_exactly(which, var_subject, dit_subject):
    subject = var_subject if which == "var" else dit_subject
    clean = subject.trajectory(LABELS, jax.random.key(2))
    noisy = subject.trajectory(LABELS, jax.random.key(2), perturb=subject.noise(math.inf, None, jax.random.key(1)))
    np.testing.assert_array_equal(noisy.images, clean.images)
    for a, b in zip(noisy.representations, clean.representations):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("which", ["var", "dit"])
def test_noise_changes_only_the_chosen_step_and_what_follows(which, var_subject, dit_subject):
    subject = var_subject if which == "var" else dit_subject
    step = 2
    clean = subject.trajectory(LABELS, jax.random.key(2))
    noisy = subject.trajectory(LABELS, jax.random.key(2), perturb=subject.noise(-10.0, [step], jax.random.key(1)))
    for s in range(step):
        np.testing.assert_array_equal(noisy.features[s], clean.features[s])
        np.testing.assert_array_equal(noisy.representations[s], clean.representations[s])
    assert not np.array_equal(noisy.features[step], clean.features[step])
    assert not np.array_equal(noisy.images, clean.images)


def test_dit_noise_spares_the_variance_channels_and_hits_the_snr(dit_subject):
    perturb = dit_subject.noise(10.0, None, jax.random.key(0))
    output = jax.random.normal(jax.random.key(3), (4, 16, 16, 6)) * 3.0
    noisy = perturb(0, output)
    np.testing.assert_array_equal(np.asarray(noisy[..., 3:]), np.asarray(output[..., 3:]))
    signal = np.mean(np.asarray(output[..., :3]) ** 2, axis=(1, 2, 3))
    draws = np.asarray(noisy[..., :3] - output[..., :3])
    assert draws.std() > 0
    # per sample the noise std is sqrt(signal / 10); the realised power matches within sampling error
    np.testing.assert_allclose(np.mean(draws ** 2, axis=(1, 2, 3)), signal / 10, rtol=0.1)


def test_perturbation_must_keep_the_shape(var_subject):
    with pytest.raises(ValueError, match="perturb"):
        var_subject.trajectory(LABELS, jax.random.key(0), perturb=lambda step, x: x[:, :1])


def test_clamp_blocks():
    assert subjects.clamp_blocks([4, 14], 2) == [1]
    assert subjects.clamp_blocks([0, -1, 30], 6) == [0, 5]
    assert subjects.clamp_blocks([2, 1], 28) == [2, 1]


def test_demo_subject_errors():
    with pytest.raises(ValueError, match="respacing applies to DiT"):
        subjects.demo_subject("var-d1", respacing="ddim5")
    with pytest.raises(ValueError, match="unknown"):
        subjects.demo_subject("vit-d1")
