"""The contract every registered quantization method keeps (`qjax.methods.names()`).

A new method is tested by being registered: its `quantize` works under `jax.jit` (arguments
traced or closed over), `jax.vmap` and `jax.lax.scan`, with per-tensor, per-neuron, group-wise,
letter-list and stacked (per batch entry) alphabets, on the centered and the integer (signed and
asymmetric) grids; every code is a letter of its input's
alphabet; inputs that are zero in X and X~ (dead) do not move the other codes; and NaN in the
weights or the statistics never becomes a finite letter: an entry either keeps the code of the
clean run or is NaN, and the entry the NaN hit is NaN.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax import alphabets, methods

N0, N1, M = 20, 5, 60
NAMES = methods.names()


def layer(seed=0, n0=N0, n1=N1, m=M):
    """Correlated inputs X, a mismatched X~ = X + noise, and weights W."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(n0, n0)) / np.sqrt(n0) + np.eye(n0)
    x = (rng.normal(size=(m, n0)) @ mixing).astype(np.float32)
    x_tilde = (x + 0.1 * rng.normal(size=(m, n0))).astype(np.float32)
    w = rng.normal(scale=0.5, size=(n0, n1)).astype(np.float32)
    return jnp.asarray(w), jnp.asarray(x), jnp.asarray(x_tilde)


def all_alphabets(w):
    """One alphabet of each form for the weights w (N0, N1)."""
    return {
        "per tensor": alphabets.for_weights(w, c=1.0, bits=2, rule="max"),
        "per neuron": alphabets.for_weights(w, c=1.0, bits=3, rule="max", per_channel=True),
        "group-wise": alphabets.for_weights(w, c=1.0, bits=2, rule="max", group_size=6),
        "letters": alphabets.Alphabet(jnp.asarray([-0.7, -0.2, 0.1, 0.9])),
        **integer_alphabets(w),
    }


def integer_alphabets(w):
    """The integer grids per neuron and group-wise; groups of 4 give ⌈N0/g⌉ = N1 groups, where a
    (G, N1) leaf sliced on the wrong axis keeps its shape."""
    options = dict(c=1.0, bits=3, rule="max")
    return {
        "signed per neuron": alphabets.for_weights(w, **options, per_channel=True, grid="signed"),
        "signed group-wise": alphabets.for_weights(w, **options, group_size=6, grid="signed"),
        "asymmetric per neuron": alphabets.for_weights(
            w, **options, per_channel=True, grid="asymmetric"
        ),
        "asymmetric group-wise": alphabets.for_weights(
            w, **options, group_size=6, grid="asymmetric"
        ),
        "asymmetric G = N1": alphabets.for_weights(w, **options, group_size=4, grid="asymmetric"),
    }


def letters_of(alphabet, n0, n1):
    """The letters of every entry, shape (N0, N1, n)."""
    if isinstance(alphabet, alphabets.UniformAlphabet):
        alphabet = alphabet.per_input(jnp.zeros((n0, n1)))
    return np.broadcast_to(np.asarray(alphabet.letters), (n0, n1, alphabet.size))


def assert_on_alphabet(q, alphabet):
    q = np.asarray(q)
    letters = letters_of(alphabet, *q.shape)
    distance = np.min(np.abs(q[..., None] - letters), axis=-1)
    assert np.all(distance <= 1e-6 * np.max(np.abs(letters))), q


def stacked(trees):
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


@pytest.mark.parametrize("name", NAMES)
def test_codes_on_every_alphabet_form(name):
    method = methods.get(name)
    w, x, x_tilde = layer()
    stats = qjax.gram_stats(x, x_tilde)
    for form, alphabet in all_alphabets(w).items():
        q = method.quantize(w, stats, alphabet)
        assert q.shape == w.shape and q.dtype == w.dtype, form
        assert_on_alphabet(q, alphabet)


@pytest.mark.parametrize("name", NAMES)
def test_jit_traced_or_closed_over_equals_plain_call(name):
    method = methods.get(name)
    w, x, x_tilde = layer(1)
    stats = qjax.gram_stats(x, x_tilde)
    for form in ("group-wise", "asymmetric group-wise"):
        alphabet = all_alphabets(w)[form]
        expected = method.quantize(w, stats, alphabet)
        traced = jax.jit(method.quantize)(w, stats, alphabet)
        closed = jax.jit(lambda alphabet=alphabet: method.quantize(w, stats, alphabet))()
        np.testing.assert_array_equal(traced, expected, err_msg=form)
        np.testing.assert_array_equal(closed, expected, err_msg=form)


@pytest.mark.parametrize("name", NAMES)
def test_vmap_scan_and_batch_axes_over_stacked_layers_equal_a_loop(name):
    """Three layers with their own statistics and stacked per-neuron (or group-wise asymmetric)
    alphabets."""
    method = methods.get(name)
    problems = [layer(seed) for seed in range(3)]
    ws = jnp.stack([w for w, _, _ in problems])
    stats = stacked([qjax.gram_stats(x, xt) for _, x, xt in problems])
    take = lambda tree, i: jax.tree.map(lambda leaf: leaf[i], tree)

    def step(carry, inputs):
        return carry, method.quantize(*inputs)

    for form in ("per neuron", "asymmetric G = N1"):
        alphabet = stacked([all_alphabets(w)[form] for w in ws])
        loop = [method.quantize(ws[i], take(stats, i), take(alphabet, i)) for i in range(3)]
        loop = jnp.stack(loop)
        np.testing.assert_array_equal(jax.vmap(method.quantize)(ws, stats, alphabet), loop)
        _, scanned = jax.lax.scan(step, None, (ws, stats, alphabet))
        np.testing.assert_array_equal(scanned, loop)
        batch = stats._replace(count=stats.count[0])  # leading batch axes: one row count
        np.testing.assert_array_equal(method.quantize(ws, batch, alphabet), loop)


@pytest.mark.parametrize("name", NAMES)
def test_dead_inputs_leave_the_other_codes_alone(name):
    """Inputs zero in X and X~ (ReLU units that never fire) do not change the layer's output, so
    their weights cannot move the other inputs' codes."""
    method = methods.get(name)
    w, x, x_tilde = layer(2)
    dead = np.array([0, 7, N0 - 1])
    x, x_tilde = x.at[:, dead].set(0.0), x_tilde.at[:, dead].set(0.0)
    stats = qjax.gram_stats(x, x_tilde)
    alphabet = all_alphabets(w)["per neuron"]
    q = np.asarray(method.quantize(w, stats, alphabet))
    other = np.asarray(method.quantize(w.at[dead].mul(-3.0), stats, alphabet))
    live = np.setdiff1d(np.arange(N0), dead)
    np.testing.assert_array_equal(other[live], q[live])
    assert_on_alphabet(q, alphabet)


def assert_nan_or_clean(q, clean):
    q, clean = np.asarray(q), np.asarray(clean)
    assert np.all(np.isnan(q) | (q == clean)), "a NaN input became a letter it did not choose"


@pytest.mark.parametrize("name", NAMES)
def test_nan_weight_gives_nan_not_a_letter(name):
    """Under jit (where values are not checked), a NaN weight w_tn gives q_tn = NaN; every other
    entry is NaN or the code of the clean run, and the other neurons are untouched."""
    method = methods.get(name)
    w, x, x_tilde = layer(3)
    stats = qjax.gram_stats(x, x_tilde)
    quantize = jax.jit(method.quantize)
    for alphabet in all_alphabets(w).values():
        clean = np.asarray(quantize(w, stats, alphabet))
        q = np.asarray(quantize(w.at[9, 2].set(jnp.nan), stats, alphabet))
        assert np.isnan(q[9, 2])
        assert_nan_or_clean(q, clean)
        np.testing.assert_array_equal(np.delete(q, 2, axis=1), np.delete(clean, 2, axis=1))


@pytest.mark.parametrize("name", NAMES)
def test_nan_statistics_give_nan_not_a_letter(name):
    """NaN in G_tt (and H_tt): every code is NaN or the clean run's, and input t's codes are NaN
    unless the method does not read the statistics at all."""
    method = methods.get(name)
    w, x, x_tilde = layer(4)
    stats = qjax.gram_stats(x, x_tilde)
    broken = stats._replace(
        gram=stats.gram.at[9, 9].set(jnp.nan), cross=stats.cross.at[9, 9].set(jnp.nan)
    )
    alphabet = all_alphabets(w)["per neuron"]
    quantize = jax.jit(method.quantize)
    clean = np.asarray(quantize(w, stats, alphabet))
    q = np.asarray(quantize(w, broken, alphabet))
    assert_nan_or_clean(q, clean)
    if not np.array_equal(q, clean):
        assert np.all(np.isnan(q[9]))


@pytest.mark.parametrize("name", NAMES)
def test_nan_is_an_error_outside_jit(name):
    method = methods.get(name)
    w, x, x_tilde = layer(5)
    stats = qjax.gram_stats(x, x_tilde)
    alphabet = all_alphabets(w)["per tensor"]
    with pytest.raises(ValueError, match="w contains NaN"):
        method.quantize(w.at[0, 0].set(jnp.nan), stats, alphabet)
    with pytest.raises(ValueError, match=r"stats\.gram contains NaN"):
        method.quantize(w, stats._replace(gram=stats.gram.at[0, 0].set(jnp.nan)), alphabet)
