"""Tests for qjax.gptq against a NumPy reference of GPTQ's (OBQ-style) update rule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax import alphabets
from qjax.methods import hessian
from qjax.methods.base import _quantize_batched
from qjax.methods.gptq import gptq_from_stats
from qjax.reference import gptq_reference


def correlated_inputs(key, m, n0):
    k1, k2 = jax.random.split(key)
    mix = jax.random.normal(k1, (n0, n0)) / np.sqrt(n0) + jnp.eye(n0)
    return jax.random.normal(k2, (m, n0)) @ mix


@pytest.mark.parametrize("block_size", [1, 5, 64])
def test_matches_reference(block_size):
    jax.config.update("jax_enable_x64", True)
    try:
        x = correlated_inputs(jax.random.key(0), 200, 13).astype(jnp.float64)
        w = jax.random.normal(jax.random.key(1), (13, 5), jnp.float64)
        alphabet = alphabets.symmetric(3, jnp.float64(0.4))
        stats = qjax.gram_stats(x, x)
        q = gptq_from_stats(w, stats, alphabet, damping=0.01, block_size=block_size)
        expected = gptq_reference(w, stats.gram, np.asarray(alphabet.letters), damping=0.01)
        np.testing.assert_allclose(q, expected, atol=1e-9)
    finally:
        jax.config.update("jax_enable_x64", False)


def test_diagonal_hessian_is_rounding():
    x = jnp.diag(jnp.arange(1.0, 7.0))  # orthogonal inputs: no error to spread
    w = jax.random.normal(jax.random.key(2), (6, 4))
    alphabet = alphabets.symmetric(2, 0.3)
    q = gptq_from_stats(w, qjax.gram_stats(x, x), alphabet)
    np.testing.assert_array_equal(q, qjax.msq(w, alphabet))


def test_beats_rounding_on_correlated_inputs():
    x = correlated_inputs(jax.random.key(3), 500, 32)
    w = jax.random.normal(jax.random.key(4), (32, 16))
    alphabet = alphabets.for_weights(w, c=1.0, num_letters=7, rule="max")
    stats = qjax.gram_stats(x, x, track_error=True)
    q = gptq_from_stats(w, stats, alphabet)
    assert qjax.relative_error(w, q, stats) < qjax.relative_error(w, qjax.msq(w, alphabet), stats)
    assert set(np.unique(np.asarray(q))) <= set(np.asarray(alphabet.letters).tolist())


def test_per_neuron_and_grouped():
    x = correlated_inputs(jax.random.key(5), 100, 8)
    x2 = jnp.stack([x, 2 * x])  # two groups, batch_shape (2,)
    w = jax.random.normal(jax.random.key(6), (2, 8, 3))
    steps = jnp.array([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    q = gptq_from_stats(w, qjax.gram_stats(x2, x2), alphabets.symmetric(1, steps))
    for g in range(2):
        alone = gptq_from_stats(
            w[g], qjax.gram_stats(x2[g], x2[g]), alphabets.symmetric(1, steps[g])
        )
        np.testing.assert_allclose(q[g], alone, atol=1e-6)


def test_dead_inputs_get_zero():
    x = correlated_inputs(jax.random.key(7), 50, 6).at[:, 2].set(0.0)
    w = jax.random.normal(jax.random.key(8), (6, 3))
    q = gptq_from_stats(w, qjax.gram_stats(x, x), alphabets.symmetric(2, 0.5))
    np.testing.assert_array_equal(q[2], 0.0)
    assert np.all(np.isfinite(q))


def test_bad_input():
    x = jnp.ones((4, 3))
    stats = qjax.gram_stats(x, x)
    alphabet = alphabets.symmetric(1, 1.0)
    with pytest.raises(ValueError, match="shape"):
        gptq_from_stats(jnp.ones((4, 2)), stats, alphabet)
    with pytest.raises(ValueError, match="NaN"):
        gptq_from_stats(jnp.full((3, 2), jnp.nan), stats, alphabet)
    with pytest.raises(ValueError, match="damping"):
        gptq_from_stats(jnp.ones((3, 2)), stats, alphabet, damping=0.0)
    with pytest.raises(ValueError, match="alphabet"):
        gptq_from_stats(jnp.ones((3, 2)), stats, [0.0, 1.0])


def test_second_call_does_not_recompile():
    x = correlated_inputs(jax.random.key(9), 40, 5)
    stats = qjax.gram_stats(x, x)
    alphabet = alphabets.symmetric(1, 0.5)
    gptq_from_stats(jnp.ones((5, 2)), stats, alphabet)
    size = _quantize_batched._cache_size()
    gptq_from_stats(jnp.zeros((5, 2)), stats, alphabets.symmetric(1, 0.7))
    assert _quantize_batched._cache_size() == size


def collinear_and_dead_inputs(rng, m=40):
    """Six random inputs, five combinations of them (collinear) and two dead ones."""
    base = rng.normal(size=(m, 6)).astype(np.float32)
    combos = np.concatenate([2.0 * base[:, :3], base[:, :2] @ np.ones((2, 2), np.float32)], axis=1)
    return np.concatenate([base, combos, np.zeros((m, 2), np.float32)], axis=1)


def test_damping_rises_on_collinear_and_dead_inputs():
    """G is singular: in float32, G + λI cannot be factored at damping 1e-9 (JAX's Cholesky gives
    NaN); λ rises tenfold until it can, and the codes are those of that damping from the start."""
    x = collinear_and_dead_inputs(np.random.default_rng(0))
    w = jax.random.normal(jax.random.key(10), (x.shape[1], 4))
    stats = qjax.gram_stats(x, x)
    alphabet = alphabets.symmetric(3, 0.3)
    base = stats.gram + jnp.diag((jnp.diagonal(stats.gram) <= 0).astype(jnp.float32))
    first = 1e-9 * jnp.mean(jnp.diagonal(base))
    assert not np.all(np.isfinite(hessian.reversed_cholesky(base + first * jnp.eye(len(base)))))
    lam, _ = hessian.damped_factor(base, first)
    raised = float(lam / first)
    assert raised >= 10
    q = gptq_from_stats(w, stats, alphabet, damping=1e-9)
    np.testing.assert_array_equal(q, gptq_from_stats(w, stats, alphabet, damping=1e-9 * raised))
    np.testing.assert_array_equal(q[-2:], 0.0)  # the dead inputs
    assert set(np.unique(np.asarray(q)).tolist()) <= set(np.asarray(alphabet.letters).tolist())


@pytest.mark.parametrize("method", [qjax.GPTQ(), qjax.Qronos()])
def test_indefinite_statistics_raise_a_clear_error(method):
    """A G no damping can repair (an eigenvalue of -1e7·||G||₂): an error naming the shape, the
    damping tried and what to do, never NaN or made-up codes."""
    x = collinear_and_dead_inputs(np.random.default_rng(1))
    stats = qjax.gram_stats(x, x)
    eigenvalues, vectors = np.linalg.eigh(np.asarray(stats.gram, np.float64))
    eigenvalues[0] = -1e7 * eigenvalues[-1]
    broken = stats._replace(gram=jnp.asarray((vectors * eigenvalues) @ vectors.T, jnp.float32))
    w = jnp.ones((x.shape[1], 3))
    with pytest.raises(ValueError, match=r"shape \(13, 3\).*could not be factored.*raised tenfold"):
        method.quantize(w, broken, alphabets.symmetric(1, 1.0))
