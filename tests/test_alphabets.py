"""Tests of qjax.alphabets: letters, nearest-letter projection, scale rules, pytree behaviour."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qjax import alphabets
from qjax.reference import gptq_reference, nearest_letter


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


# --- Integer grids: signed {-2^(b-1)..2^(b-1)-1}·s and asymmetric (k - z)·s. -------------------


def test_signed_grid_is_the_int_b_range():
    w = jnp.array([[1.5, -0.3], [-3.0, 0.7], [0.25, -1.4]])
    alphabet = alphabets.for_weights(w, c=1.0, bits=4, rule="max", grid="signed")
    assert alphabet.grid == "signed" and alphabet.size == 16
    step = 3.0 / 7.5  # absmax / ((2^b - 1)/2): GPTQ's and compressed-tensors' symmetric scale
    np.testing.assert_allclose(alphabet.letters, np.arange(-8, 8) * step, rtol=1e-6)
    np.testing.assert_array_equal(alphabet.codes(w) - 8, np.clip(np.round(w / step), -8, 7))


def test_asymmetric_grid_is_min_max_with_a_zero_point():
    w = jnp.array([[0.3, -2.0], [1.1, -1.0], [2.4, -0.5], [0.6, 0.1]])
    alphabet = alphabets.for_weights(
        w, c=1.0, bits=3, rule="max", per_channel=True, grid="asymmetric"
    )
    # Column 0 is ≥ 0: the range [0, 2.4]; column 1: [-2, 0.1]. s = (max - min) / 7.
    scale = np.array([2.4 / 7, 2.1 / 7])
    zero = np.round(-np.array([0.0, -2.0]) / scale)
    np.testing.assert_allclose(alphabet.step, scale, rtol=1e-6)
    np.testing.assert_array_equal(alphabet.zero_point, zero)
    np.testing.assert_allclose(
        alphabet.letters, (np.arange(8) - zero[:, None]) * scale[:, None], rtol=1e-6
    )
    codes = np.clip(np.round(np.asarray(w) / scale + zero), 0, 7)  # no .5 ties in w
    np.testing.assert_array_equal(alphabet.codes(w), codes)
    np.testing.assert_allclose(alphabet.project(w), (codes - zero) * scale, rtol=1e-6)
    with pytest.raises(ValueError, match="asymmetric grid takes rule='max'"):
        alphabets.for_weights(w, c=1.0, bits=3, rule="median", grid="asymmetric")


@pytest.mark.parametrize("grid", ["signed", "asymmetric"])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
def test_integer_grid_codes_decode_and_mse_search(grid, granularity):
    w = jax.random.normal(jax.random.key(1), (20, 6)) + 0.4  # off-centre: zero points differ
    options = {"tensor": {}, "channel": {"per_channel": True}, "group": {"group_size": 8}}
    fixed = alphabets.for_weights(w, c=1.0, bits=3, rule="max", grid=grid, **options[granularity])
    searched = alphabets.for_weights(
        w, c=None, bits=3, rule="max", grid=grid, **options[granularity]
    )
    for alphabet in (fixed, searched):
        assert alphabet.grid == grid
        codes = alphabet.codes(w)
        assert codes.min() >= 0 and codes.max() <= 7
        np.testing.assert_array_equal(alphabet.decode(codes), alphabet.project(w))
        assert np.all(np.isin(np.asarray(alphabet.project(w[:1])), np.asarray(alphabet.letters)))
    error = lambda a: float(jnp.sum((w - a.project(w)) ** 2))
    assert error(searched) <= error(fixed) * (1 + 1e-6)  # C = 1 is among the candidates


def _entry_letters(alphabet, n0, n1):
    """The letters of each weight, (N0, N1, n)."""
    letters = np.asarray(alphabet.letters, np.float64)
    if alphabet.group_size is not None:
        letters = np.repeat(letters, alphabet.group_size, axis=0)[:n0]
    return np.broadcast_to(letters, (n0, n1, alphabet.size))


# 18 inputs, 5 neurons: groups of 8 leave a short last group; groups of 4 give ⌈N0/g⌉ = N1 = 5
# groups, the shape where a (G, N1) leaf sliced on the wrong axis still has the right shape.
GRANULARITIES = {
    "channel": {"per_channel": True},
    "group": {"group_size": 8},
    "square": {"group_size": 4},
}


@pytest.mark.parametrize("grid", ["signed", "asymmetric"])
@pytest.mark.parametrize("granularity", list(GRANULARITIES))
@pytest.mark.parametrize(
    "method", ["gpfq", "gpfq-residual", "gptq", "gptq-act", "qronos", "qronos-act", "msq"]
)
def test_every_method_on_integer_grids_equals_numpy_reference(method, granularity, grid):
    import qjax
    from qjax.reference import gpfq_reference, qronos_reference

    with jax.enable_x64(True):
        rng = np.random.default_rng(7)
        n0, n1, m = 18, 5, 60
        mixing = rng.normal(size=(n0, n0)) / np.sqrt(n0) + np.eye(n0)
        x = rng.normal(size=(m, n0)) @ mixing
        x_tilde = x + 0.1 * rng.normal(size=(m, n0))
        w = rng.normal(scale=0.3, size=(n0, n1)) + np.linspace(-0.2, 0.3, n1)
        options = GRANULARITIES[granularity]
        alphabet = alphabets.for_weights(w, c=0.9, bits=3, rule="max", grid=grid, **options)
        if grid == "asymmetric":  # the zero points differ between groups and neurons
            assert len(np.unique(np.asarray(alphabet.zero_point))) > 1
        letters = _entry_letters(alphabet, n0, n1)
        stats = qjax.gram_stats(x, x_tilde)
        act_order = method.endswith("-act")
        if method == "gpfq":
            expected = gpfq_reference(w, x, x_tilde, letters)
            q = qjax.GPFQ(block_size=4).quantize(w, stats, alphabet)
        elif method == "gpfq-residual":  # one scan per neuron: the alphabet sliced per neuron
            expected = gpfq_reference(w, x, x_tilde, letters)
            q = qjax.gpfq_layer(w, x, x_tilde, alphabet, form="residual")
        elif method.startswith("gptq"):
            gram = qjax.gram_stats(x, x)
            expected = gptq_reference(w, gram.gram, letters, damping=0.01, act_order=act_order)
            gptq = qjax.GPTQ(damping=0.01, block_size=4, act_order=act_order)
            q = gptq.quantize(w, gram, alphabet)
        elif method.startswith("qronos"):
            expected = qronos_reference(w, x, x_tilde, letters, damping=1e-4, act_order=act_order)
            qronos = qjax.Qronos(damping=1e-4, block_size=4, act_order=act_order)
            q = qronos.quantize(w, stats, alphabet)
        else:
            expected = np.vectorize(nearest_letter, signature="(),(n)->()")(w, letters)
            q = qjax.MSQ().quantize(w, stats, alphabet)
        np.testing.assert_allclose(np.asarray(q), expected, rtol=0, atol=1e-12)
