"""Shared checks of the demo tests."""

import jax
import numpy as np
import pytest


def sample_twice_and_once_more(member, labels: np.ndarray, key: int, other_key: int) -> tuple[np.ndarray, np.ndarray]:
    """Samples `labels` with `key` twice and with `other_key` once; checks what every demo member must satisfy.

    Asserts the ``[B, 16, 16, 3]`` float32 shape, the [-1, 1] range and that the same key gives the same images.

    Returns:
        ``(samples with key, samples with other_key)``.
    """
    first = member.sample(member.model, labels, jax.random.key(key))
    again = member.sample(member.model, labels, jax.random.key(key))
    other = member.sample(member.model, labels, jax.random.key(other_key))
    assert first.shape == (len(labels), 16, 16, 3) and first.dtype == np.float32
    assert first.min() >= -1.0 and first.max() <= 1.0
    np.testing.assert_array_equal(first, again)
    return first, other


@pytest.fixture(name="sample_twice_and_once_more")
def sample_twice_and_once_more_fixture():
    """`sample_twice_and_once_more` for tests (conftest helpers are shared as fixtures, not imports)."""
    return sample_twice_and_once_more
