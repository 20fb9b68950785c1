"""Tests of qjax.gpfq against the NumPy transcription of the paper's loop, plus properties."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax import alphabets
from qjax.reference import gpfq_reference


def correlated_inputs(rng, m, n0, *, noise=0.1, dtype=np.float64):
    """X with correlated columns and X~ a perturbed copy (a quantized network's inputs)."""
    mixing = rng.normal(size=(n0, n0)) / np.sqrt(n0) + np.eye(n0)
    x = rng.normal(size=(m, n0)) @ mixing
    x_tilde = x + noise * rng.normal(size=(m, n0))
    return x.astype(dtype), x_tilde.astype(dtype)


def layer_error(w, q, x, x_tilde):
    return np.linalg.norm(x @ w - x_tilde @ np.asarray(q)) / np.linalg.norm(x @ w)


def make_alphabet(kind, w):
    if kind == "ternary":
        return alphabets.for_weights(w, c=2.0, num_letters=3)
    if kind == "binary":
        return alphabets.binary(float(np.mean(np.abs(w))))
    if kind == "4bit-per-channel":
        return alphabets.for_weights(w, c=1.0, bits=4, rule="max", per_channel=True)
    if kind == "midrise":
        return alphabets.midrise(2, 2.0 * float(np.median(np.abs(w))))
    if kind == "letters":
        return alphabets.from_letters(np.array([-0.5, -0.1, 0.0, 0.05, 0.3]))
    raise AssertionError(kind)


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("method", ["gram", "residual"])
@pytest.mark.parametrize(
    ("m", "n0", "n1", "kind"),
    [
        (40, 17, 5, "ternary"),
        (100, 64, 3, "binary"),
        (30, 70, 4, "4bit-per-channel"),  # m < N0: X~ᵀX~ is singular
        (60, 9, 6, "midrise"),
        (50, 33, 2, "letters"),
    ],
)
def test_codes_equal_numpy_reference(method, m, n0, n1, kind):
    rng = np.random.default_rng(n0 * 100 + n1)
    x, x_tilde = correlated_inputs(rng, m, n0)
    w = rng.normal(scale=0.3, size=(n0, n1))
    alphabet = make_alphabet(kind, w)
    expected = gpfq_reference(w, x, x_tilde, np.asarray(alphabet.letters))
    q = qjax.gpfq_layer(w, x, x_tilde, alphabet, form=method, block_size=8)
    np.testing.assert_array_equal(np.asarray(q), expected)


def test_letters_belong_to_the_alphabet_in_float32():
    rng = np.random.default_rng(0)
    x, x_tilde = correlated_inputs(rng, 300, 50, dtype=np.float32)
    w = rng.normal(size=(50, 12)).astype(np.float32)
    alphabet = alphabets.for_weights(w, c=1.0, bits=3, per_channel=True)
    q = np.asarray(qjax.gpfq_layer(w, x, x_tilde, alphabet))
    letters = np.asarray(alphabet.letters, np.float32)
    assert q.dtype == np.float32
    for neuron in range(12):
        assert np.all(np.isin(q[:, neuron], letters[neuron]))


def test_float32_agrees_with_float64_reference():
    rng = np.random.default_rng(1)
    x, x_tilde = correlated_inputs(rng, 500, 120)
    w = rng.normal(scale=0.2, size=(120, 20))
    alphabet = alphabets.for_weights(w, c=2.0, bits=2)
    expected = gpfq_reference(w, x, x_tilde, np.asarray(alphabet.letters))
    for method in ("gram", "residual"):
        q = qjax.gpfq_layer(
            w.astype(np.float32),
            x.astype(np.float32),
            x_tilde.astype(np.float32),
            alphabet,
            form=method,
        )
        assert np.mean(np.asarray(q) == expected) > 0.98
        np.testing.assert_allclose(
            layer_error(w, q, x, x_tilde), layer_error(w, expected, x, x_tilde), rtol=0.02
        )


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("block_size", [1, 4, 7, 64, 1000])
def test_block_size_does_not_change_codes(block_size):
    rng = np.random.default_rng(2)
    x, x_tilde = correlated_inputs(rng, 80, 45)
    w = rng.normal(size=(45, 6))
    alphabet = alphabets.for_weights(w, c=1.5, bits=3)
    reference = qjax.gpfq_layer(w, x, x_tilde, alphabet, form="residual")
    q = qjax.gpfq_layer(w, x, x_tilde, alphabet, block_size=block_size)
    np.testing.assert_array_equal(q, reference)


@pytest.mark.usefixtures("x64")
def test_streamed_statistics_equal_one_shot():
    rng = np.random.default_rng(3)
    x, x_tilde = correlated_inputs(rng, 103, 20)
    w = rng.normal(size=(20, 4))
    alphabet = alphabets.symmetric(2, 0.3)
    stats = qjax.gram_stats_init(20, dtype=jnp.float64)
    for start in range(0, 103, 25):
        stats = qjax.gram_stats_update(stats, x[start : start + 25], x_tilde[start : start + 25])
    assert int(stats.count) == 103
    np.testing.assert_allclose(stats.gram, x_tilde.T @ x_tilde, rtol=1e-12)
    np.testing.assert_allclose(stats.cross, x_tilde.T @ x, rtol=1e-12)
    np.testing.assert_array_equal(
        qjax.gpfq_from_stats(w, stats, alphabet), qjax.gpfq_layer(w, x, x_tilde, alphabet)
    )


def test_gpfq_beats_msq_on_correlated_data():
    rng = np.random.default_rng(4)
    x, x_tilde = correlated_inputs(rng, 400, 100, dtype=np.float32)
    w = rng.normal(scale=0.1, size=(100, 30)).astype(np.float32)
    for bits in (1, 2, 3):
        alphabet = alphabets.for_weights(w, c=2.0 if bits > 1 else 1.0, bits=bits)
        gpfq_error = layer_error(w, qjax.gpfq_layer(w, x, x_tilde, alphabet), x, x_tilde)
        msq_error = layer_error(w, qjax.msq(w, alphabet), x, x_tilde)
        assert gpfq_error < 0.9 * msq_error, (bits, gpfq_error, msq_error)


def test_fine_alphabet_recovers_weights():
    rng = np.random.default_rng(5)
    x, _ = correlated_inputs(rng, 200, 40, dtype=np.float32)
    w = rng.uniform(-1, 1, size=(40, 8)).astype(np.float32)
    delta = 1e-3
    alphabet = alphabets.symmetric(1000, delta)
    q = np.asarray(qjax.gpfq_layer(w, x, x, alphabet))
    assert np.max(np.abs(q - w)) < 5 * delta
    assert layer_error(w, q, x, x) < 1e-3


@pytest.mark.usefixtures("x64")
def test_dead_inputs_get_q_of_zero():
    rng = np.random.default_rng(6)
    x, x_tilde = correlated_inputs(rng, 60, 12)
    dead = [0, 5, 11]
    x_tilde[:, dead] = 0.0  # e.g. ReLU units that never fire in the quantized network
    w = rng.normal(size=(12, 5))
    for alphabet, dead_letter in [
        (alphabets.symmetric(1, 0.5), 0.0),
        (alphabets.binary(0.5), -0.5),
    ]:
        for method in ("gram", "residual"):
            q = np.asarray(qjax.gpfq_layer(w, x, x_tilde, alphabet, form=method))
            np.testing.assert_array_equal(q[dead], dead_letter)
            np.testing.assert_array_equal(
                q, gpfq_reference(w, x, x_tilde, np.asarray(alphabet.letters))
            )


def test_all_inputs_dead_gives_q_of_zero():
    x = np.ones((10, 4), np.float32)
    q = qjax.gpfq_layer(
        np.ones((4, 3), np.float32), x, np.zeros_like(x), alphabets.symmetric(1, 1.0)
    )
    np.testing.assert_array_equal(q, 0.0)


def test_pure_under_jit_and_vmap_and_no_recompilation():
    rng = np.random.default_rng(7)
    x, x_tilde = correlated_inputs(rng, 64, 16, dtype=np.float32)
    w = rng.normal(size=(16, 4)).astype(np.float32)
    alphabet = alphabets.symmetric(2, 0.4)
    stats = qjax.gram_stats(x, x_tilde)
    eager = qjax.gpfq_from_stats(w, stats, alphabet)

    quantize = jax.jit(qjax.gpfq_from_stats)
    np.testing.assert_array_equal(quantize(w, stats, alphabet), eager)
    # A second call with new values of the same shapes reuses the compiled program.
    quantize(w + 0.01, stats, alphabets.symmetric(2, 0.5))
    assert quantize._cache_size() == 1

    # vmap over a stack of layers: each equals its own call.
    layers = jax.vmap(qjax.gpfq_from_stats, in_axes=(0, None, None))(
        jnp.stack([w, 2 * w]), stats, alphabet
    )
    np.testing.assert_array_equal(layers[0], eager)
    np.testing.assert_array_equal(layers[1], qjax.gpfq_from_stats(2 * w, stats, alphabet))


def test_batched_layers_with_per_group_alphabets():
    rng = np.random.default_rng(8)
    xs, xts = zip(
        *(correlated_inputs(rng, 50, 10, dtype=np.float32) for _ in range(3)), strict=True
    )
    x, x_tilde = np.stack(xs), np.stack(xts)
    w = rng.normal(size=(3, 10, 4)).astype(np.float32)
    alphabet = alphabets.symmetric(1, jnp.asarray(rng.uniform(0.3, 1.0, size=(3, 4)), jnp.float32))
    q = qjax.gpfq_from_stats(w, qjax.gram_stats(x, x_tilde), alphabet)
    for g in range(3):
        single = alphabets.symmetric(1, alphabet.step[g])
        np.testing.assert_array_equal(q[g], qjax.gpfq_layer(w[g], x[g], x_tilde[g], single))


def test_relative_error_matches_direct_computation():
    rng = np.random.default_rng(9)
    x, x_tilde = correlated_inputs(rng, 300, 30, dtype=np.float32)
    w = rng.normal(size=(30, 7)).astype(np.float32)
    alphabet = alphabets.for_weights(w, c=2.0, bits=2)
    q = qjax.gpfq_layer(w, x, x_tilde, alphabet)
    stats = qjax.gram_stats(x, x_tilde, track_error=True)
    np.testing.assert_allclose(
        qjax.relative_error(w, q, stats), layer_error(w, q, x, x_tilde), rtol=1e-3
    )
    with pytest.raises(ValueError, match="track_error"):
        qjax.relative_error(w, q, qjax.gram_stats(x, x_tilde))


def test_float32_statistics_stable_for_1e5_rows():
    rng = np.random.default_rng(10)
    m, n0 = 100_000, 32
    x = (rng.normal(size=(m, n0)) + 0.5).astype(np.float32)  # non-zero mean: large sums
    x_tilde = (x + 0.05 * rng.normal(size=(m, n0))).astype(np.float32)
    stats = qjax.gram_stats(x, x_tilde, batch_size=10_000)
    exact = x_tilde.astype(np.float64).T @ x_tilde.astype(np.float64)
    np.testing.assert_allclose(stats.gram, exact, rtol=1e-5)
    w = rng.normal(size=(n0, 16)).astype(np.float32)
    alphabet = alphabets.for_weights(w, c=2.0, bits=3)
    q = qjax.gpfq_from_stats(w, stats, alphabet)
    with jax.enable_x64(True):
        q64 = qjax.gpfq_layer(
            w.astype(np.float64), x.astype(np.float64), x_tilde.astype(np.float64), alphabet
        )
    assert np.mean(np.asarray(q) == np.asarray(q64)) > 0.99


def test_error_decays_with_width_for_gaussian_data():
    """The paper's theory: for Gaussian X (m fixed), GPFQ's relative error falls as N0 grows
    (like sqrt(m log N0 / N0)), while MSQ's stays put."""
    rng = np.random.default_rng(11)
    m = 64
    gpfq_errors, msq_errors = [], []
    alphabet = alphabets.symmetric(1, 1.0)
    for n0 in (64, 256, 1024):
        x = rng.normal(size=(m, n0)).astype(np.float32)
        w = rng.uniform(-1, 1, size=(n0, 8)).astype(np.float32)
        gpfq_errors.append(layer_error(w, qjax.gpfq_layer(w, x, x, alphabet), x, x))
        msq_errors.append(layer_error(w, qjax.msq(w, alphabet), x, x))
    assert gpfq_errors[0] > 1.5 * gpfq_errors[1] > 1.5 * 1.5 * gpfq_errors[2]
    assert max(msq_errors) < 1.3 * min(msq_errors)


valid = dict(w=np.ones((4, 3), np.float32), x=np.ones((5, 4), np.float32))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(w=np.ones(4, np.float32)), "w must have 2 dimensions"),
        (dict(x=np.ones((5, 3), np.float32)), "x has 3 columns but w has N0 = 4"),
        (dict(x_tilde=np.ones((6, 4), np.float32)), "same shape"),
        (dict(x=np.ones((0, 4), np.float32)), "no rows"),
        (dict(w=np.full((4, 3), np.nan, np.float32)), "w contains NaN or Inf"),
        (dict(x_tilde=np.full((5, 4), np.inf, np.float32)), "x_tilde contains NaN or Inf"),
        (dict(x=np.ones((5, 4), np.int32)), "x must be a floating-point array"),
        (dict(form="greedy"), "unknown form"),
        (dict(alphabet=np.array([-1.0, 1.0])), "alphabet must be a qjax.alphabets alphabet"),
    ],
)
def test_bad_input_raises_value_error(kwargs, message):
    args = dict(valid, x_tilde=valid["x"], alphabet=alphabets.symmetric(1, 1.0), form="gram")
    args.update(kwargs)
    if "x" in kwargs and "x_tilde" not in kwargs:
        args["x_tilde"] = args["x"]
    call = functools.partial(qjax.gpfq_layer, args["w"], args["x"], args["x_tilde"])
    with pytest.raises(ValueError, match=message):
        call(args["alphabet"], form=args["form"])


def test_statistics_shape_mismatch_raises():
    stats = qjax.gram_stats_init(5)
    with pytest.raises(ValueError, match="batch_shape"):
        qjax.gram_stats_update(stats, np.ones((3, 4), np.float32), np.ones((3, 4), np.float32))
    with pytest.raises(ValueError, match="statistics are for"):
        qjax.gpfq_from_stats(np.ones((4, 2), np.float32), stats, alphabets.binary(1.0))
