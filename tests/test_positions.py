"""Decay schedules and the xPos-style rotation match torchscale's formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from retnet_jax import positions


def test_torchscale_schedule():
    np.testing.assert_allclose(positions.decay_gammas(4),
                               [1 - 1 / 32, 1 - 1 / 64, 1 - 1 / 128, 1 - 1 / 256])
    np.testing.assert_allclose(positions.decay_log_gammas(3),
                               np.log([1 - 1 / 32, 1 - 1 / 64, 1 - 1 / 128]), rtol=1e-6)
    assert positions.decay_log_gammas(3).dtype == jnp.float32


def test_other_schedules():
    paper = positions.decay_gammas(8, "paper")
    np.testing.assert_allclose([paper[0], paper[-1]], [1 - 1 / 32, 1 - 1 / 512])
    assert np.all(np.diff(paper) > 0)
    np.testing.assert_allclose(positions.decay_gammas(3, "single", gamma=0.9), [0.9] * 3)
    np.testing.assert_array_equal(positions.decay_log_gammas(2, "none"), [0.0, 0.0])


@pytest.mark.parametrize("bad", [dict(schedule="cosine"), dict(schedule="single", gamma=1.5)])
def test_bad_schedule(bad):
    with pytest.raises(ValueError, match="schedule|gamma"):
        positions.decay_gammas(4, **bad)


def torchscale_theta_shift(x, start):
    """numpy float64 transcription of torchscale's RetNetRelPos angle + theta_shift."""
    dim = x.shape[-1]
    angle = 1.0 / (10000 ** np.linspace(0, 1, dim // 2))
    angle = np.repeat(angle[:, None], 2, axis=1).reshape(-1)           # [a0, a0, a1, a1, ...]
    index = np.arange(start, start + x.shape[1], dtype=np.float64)
    sin = np.sin(index[:, None] * angle)[None, :, None, :]
    cos = np.cos(index[:, None] * angle)[None, :, None, :]
    x1, x2 = x[..., ::2], x[..., 1::2]
    rotated = np.stack((-x2, x1), axis=-1).reshape(x.shape)
    return x * cos + rotated * sin


@pytest.mark.parametrize("offset", [0, 5, 1000])
def test_rotation_matches_torchscale(offset):
    x = np.random.default_rng(0).normal(size=(2, 7, 3, 16))
    ours = positions.rotate(jnp.asarray(x, jnp.float32), offset)
    # Angles n * theta are float32 (as in torchscale): rounding grows like n * 2^-23 radians.
    atol = 1e-5 + (offset + x.shape[1]) * 2.0 ** -23 * np.abs(x).max()
    np.testing.assert_allclose(ours, torchscale_theta_shift(x, offset), rtol=1e-5, atol=atol)


def test_rotation_offset_per_sequence_equals_slicing():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 12, 2, 8))
    full = positions.rotate(x, 0)
    part = positions.rotate(x[:, 4:7], jnp.array([4, 4]))
    np.testing.assert_allclose(part, full[:, 4:7], rtol=1e-6, atol=1e-6)
    mixed = positions.rotate(x[:, :3], jnp.array([0, 9]))
    np.testing.assert_allclose(mixed[1], positions.rotate(x[1:, :3], 9)[0], rtol=1e-6, atol=1e-6)


def test_rotation_scores_depend_only_on_distance():
    q = jax.random.normal(jax.random.PRNGKey(1), (1, 1, 1, 8))
    k = jax.random.normal(jax.random.PRNGKey(2), (1, 1, 1, 8))
    def score(n, m):
        return jnp.sum(positions.rotate(q, n) * positions.rotate(k, m))
    np.testing.assert_allclose(score(10, 3), score(107, 100), rtol=1e-4)


def test_rotation_bad_input():
    with pytest.raises(ValueError, match="head_dim"):
        positions.rotate(jnp.ones((1, 2, 1, 5)))
    with pytest.raises(ValueError, match="offset"):
        positions.rotate(jnp.ones((2, 2, 1, 4)), jnp.array([1, 2, 3]))
    with pytest.raises(ValueError, match=r"x must be \[batch, time, heads, dim\]"):
        positions.rotate(jnp.ones((2, 4)))
