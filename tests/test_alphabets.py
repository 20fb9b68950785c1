"""Tests of qjax.alphabets: letters, nearest-letter projection, scale rules, pytree behaviour."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qjax import alphabets
from qjax.reference import nearest_letter


def test_symmetric_letters():
    np.testing.assert_allclose(alphabets.symmetric(2, 0.5).letters, [-1, -0.5, 0, 0.5, 1])
    np.testing.assert_allclose(alphabets.symmetric(1, 3.0).letters, [-3, 0, 3])


def test_binary_letters():
    np.testing.assert_allclose(alphabets.binary(0.25).letters, [-0.25, 0.25])


@pytest.mark.parametrize(
    ("bits", "expected"),
    [(1, [-0.5, 0.5]), (2, [-1.5, -0.5, 0.5, 1.5]), (3, np.arange(8) - 3.5)],
)
def test_bits_means_two_to_the_bits_letters(bits, expected):
    alphabet = alphabets.by_bits(bits, 1.0)
    np.testing.assert_allclose(alphabet.letters, expected)
    assert alphabet.size == 2**bits == alphabets.num_letters_for_bits(bits)
    w = jnp.linspace(-1.0, 1.0, 7)
    assert alphabets.for_weights(w, c=1.0, bits=bits).size == 2**bits


def test_midrise_is_reference_linspace():
    np.testing.assert_allclose(alphabets.midrise(2, 3.0).letters, 3.0 * np.linspace(-1, 1, 4))


def test_from_letters_sorts_and_deduplicates():
    np.testing.assert_allclose(alphabets.from_letters([1.0, -2.0, 1.0, 0.5]).letters, [-2, 0.5, 1])


alphabet_cases = [
    alphabets.symmetric(1, 0.3),
    alphabets.symmetric(4, 0.1),
    alphabets.binary(0.7),
    alphabets.midrise(3, 1.2),
    alphabets.from_letters([-1.0, -0.1, 0.2, 2.0]),
]


@pytest.mark.parametrize("alphabet", alphabet_cases)
@settings(max_examples=25, deadline=None)
@given(x=hnp.arrays(np.float32, 12, elements=st.floats(-5, 5, width=32)))
def test_project_is_nearest_letter(alphabet, x):
    letters = np.asarray(alphabet.letters)
    projected = np.asarray(alphabets.project(alphabet, x))
    distance = np.abs(projected - x)
    best = np.array([abs(nearest_letter(v, letters) - v) for v in x])
    np.testing.assert_allclose(distance, best, atol=1e-6)
    assert np.all(np.isin(projected, letters.astype(np.float32)))


@pytest.mark.parametrize("alphabet", alphabet_cases)
def test_codes_decode_round_trip(alphabet):
    codes = jnp.arange(alphabet.size)
    np.testing.assert_allclose(alphabet.decode(codes), alphabet.letters)
    np.testing.assert_array_equal(alphabet.codes(alphabet.letters), codes)


def test_per_channel_alphabet_broadcasts_over_kernel_last_axis():
    w = jnp.array([[0.1, 0.9], [-0.4, -3.0], [0.2, 2.2]])
    alphabet = alphabets.symmetric(1, jnp.array([0.1, 2.0]))
    np.testing.assert_allclose(alphabet.project(w), [[0.1, 0.0], [-0.1, -2.0], [0.1, 2.0]])
    letters = alphabets.from_letters([[-1.0, 0.0, 1.0], [-5.0, 0.0, 5.0]])
    np.testing.assert_allclose(letters.project(w), [[0.0, 0.0], [0.0, -5.0], [0.0, 0.0]])


def test_alphabet_is_a_pytree_under_jit_and_vmap():
    alphabet = alphabets.symmetric(1, jnp.array([0.5, 1.0, 2.0]))
    leaves, treedef = jax.tree.flatten(alphabet)
    assert len(leaves) == 1
    assert jax.tree.unflatten(treedef, leaves).size == 3

    projected = jax.jit(lambda a, x: a.project(x))(alphabet, jnp.full((4, 3), 0.8))
    np.testing.assert_allclose(projected[0], [0.5, 1.0, 0.0])

    one_per_row = jax.vmap(lambda a, x: a.project(x))(alphabet, jnp.array([0.3, 0.3, 0.3]))
    np.testing.assert_allclose(one_per_row, [0.5, 0.0, 0.0])


def test_scale_rules():
    w = jnp.array([[1.0, -4.0], [-2.0, 8.0], [3.0, 0.5]])
    np.testing.assert_allclose(alphabets.scale_radius(w, 2.0, rule="median"), 2 * 2.5)
    np.testing.assert_allclose(alphabets.scale_radius(w, 0.5, rule="max"), 4.0)
    np.testing.assert_allclose(
        alphabets.scale_radius(w, 1.0, rule="median", per_channel=True), [2.0, 4.0]
    )
    np.testing.assert_allclose(
        alphabets.scale_radius(w, 1.0, rule="max", per_channel=True), [3.0, 8.0]
    )


def test_for_weights_largest_letter_is_radius():
    w = jax.random.normal(jax.random.key(0), (3, 3, 8, 16))
    ternary = alphabets.for_weights(w, c=3.0, num_letters=3)
    np.testing.assert_allclose(ternary.letters[-1], 3.0 * jnp.median(jnp.abs(w)), rtol=1e-6)
    per_channel = alphabets.for_weights(w, c=1.0, bits=4, rule="max", per_channel=True)
    assert per_channel.size == 16
    np.testing.assert_allclose(
        per_channel.letters[:, -1], jnp.abs(w).max(axis=(0, 1, 2)), rtol=1e-6
    )


def test_zero_channel_gets_a_positive_radius():
    w = jnp.array([[0.0, 1.0], [0.0, -2.0]])
    radius = alphabets.scale_radius(w, 1.0, rule="max", per_channel=True)
    assert np.all(np.asarray(radius) > 0)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: alphabets.symmetric(0, 1.0), "K must be"),
        (lambda: alphabets.symmetric(1, -1.0), "delta must be positive"),
        (lambda: alphabets.binary(float("nan")), "delta must be finite"),
        (lambda: alphabets.by_bits(0, 1.0), "bits must be"),
        (lambda: alphabets.from_letters([]), "non-empty"),
        (lambda: alphabets.from_letters([0.0, np.inf]), "finite"),
        (lambda: alphabets.uniform(1, 1.0), "num_letters"),
        (lambda: alphabets.scale_radius(jnp.ones(3), 1.0, rule="mean"), "unknown scale rule"),
        (lambda: alphabets.for_weights(jnp.ones(3), c=1.0), "exactly one of"),
        (lambda: alphabets.for_weights(jnp.ones(3), c=-1.0, bits=2), "must be positive"),
    ],
)
def test_bad_input_raises(make, message):
    with pytest.raises(ValueError, match=message):
        make()
