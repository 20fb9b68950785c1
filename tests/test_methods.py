"""The method objects (GPFQ, GPTQ, MSQ) and their composition with JAX transforms.

Every layer-level function must work under `jax.jit`, `jax.vmap` and `jax.lax.scan` with any
argument traced or closed over, and give the codes of a plain call.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax import alphabets, methods, prox
from qjax.reference import gpfq_reference
from tests.test_method_contract import layer


def _problem(seed=0, n0=24, n1=6):
    """The contract test's layer (correlated X, X~ = X + noise, W) at this module's sizes."""
    return layer(seed, n0=n0, n1=n1, m=64)


def test_methods_are_registered_by_name():
    assert {"gpfq", "gptq", "msq"} <= set(methods.names())
    assert methods.get("gptq") == qjax.GPTQ()
    assert methods.get(qjax.GPFQ(block_size=8)).block_size == 8
    with pytest.raises(ValueError, match="block_size must be a positive integer"):
        qjax.GPFQ(block_size=0)
    with pytest.raises(ValueError, match="damping must be positive"):
        qjax.GPTQ(damping=0.0)


def test_jit_with_everything_closed_over_equals_plain_call():
    w, x, x_tilde = _problem()
    alphabet = alphabets.for_weights(w, c=1.0, bits=2, rule="max", per_channel=True)
    stats = qjax.gram_stats(x, x_tilde)
    expected = {
        "gpfq_layer": qjax.gpfq_layer(w, x, x_tilde, alphabet),
        "gpfq_from_stats": qjax.gpfq_from_stats(w, stats, alphabet),
        "gptq_from_stats": qjax.gptq_from_stats(w, stats, alphabet),
        "msq": qjax.msq(w, alphabet),
    }
    closed = {
        "gpfq_layer": jax.jit(lambda w: qjax.gpfq_layer(w, x, x_tilde, alphabet)),
        "gpfq_from_stats": jax.jit(lambda w: qjax.gpfq_from_stats(w, stats, alphabet)),
        "gptq_from_stats": jax.jit(lambda w: qjax.gptq_from_stats(w, stats, alphabet)),
        "msq": jax.jit(lambda w: qjax.msq(w, alphabet)),
    }
    for name, fn in closed.items():
        np.testing.assert_array_equal(fn(w), expected[name], err_msg=name)
    # Everything traced, nothing closed over.
    traced = jax.jit(lambda w, x, xt, a: qjax.gpfq_layer(w, x, xt, a))(w, x, x_tilde, alphabet)
    np.testing.assert_array_equal(traced, expected["gpfq_layer"])


def test_prox_operators_under_jit_with_closed_over_arrays():
    theta = jnp.linspace(-1.5, 1.5, 11)
    strength = jnp.asarray(0.3)
    for op in (
        lambda t: prox.binary_prox(t, strength),
        lambda t: prox.ternary_prox(t, strength),
        lambda t: prox.multibit_prox(t, strength, bits=2),
    ):
        np.testing.assert_allclose(jax.jit(op)(theta), op(theta), rtol=1e-6)


@pytest.mark.parametrize("method", [qjax.GPFQ(), qjax.GPTQ(), qjax.MSQ()])
def test_vmap_and_scan_over_stacked_kernels_equal_a_loop(method):
    """A stack of L layers (L, N0, N1) with their own statistics and alphabets."""
    problems = [_problem(seed) for seed in range(3)]
    ws = jnp.stack([w for w, _, _ in problems])
    layers = [qjax.gram_stats(x, xt) for _, x, xt in problems]
    stats = qjax.GramStats(  # a batch of statistics: stacked matrices, one row count
        gram=jnp.stack([s.gram for s in layers]),
        cross=jnp.stack([s.cross for s in layers]),
        count=layers[0].count,
    )
    alphabet = jax.vmap(lambda w: alphabets.for_weights(w, c=1.0, bits=3, per_channel=True))(ws)
    take = lambda tree, i: jax.tree.map(lambda leaf: leaf[i], tree)
    loop = jnp.stack([method.quantize(ws[i], layers[i], take(alphabet, i)) for i in range(3)])
    stats_axes = qjax.GramStats(gram=0, cross=0, count=None)
    vmapped = jax.vmap(method.quantize_matrix, in_axes=(0, stats_axes, 0))(ws, stats, alphabet)
    np.testing.assert_array_equal(vmapped, loop)

    def step(carry, layer):
        w, gram, cross, a = layer
        return carry, method.quantize_matrix(w, qjax.GramStats(gram, cross, stats.count), a)

    _, scanned = jax.lax.scan(step, None, (ws, stats.gram, stats.cross, alphabet))
    np.testing.assert_array_equal(scanned, loop)
    # The batched entry point does the same for leading batch axes.
    np.testing.assert_array_equal(method.quantize(ws, stats, alphabet), loop)


def test_nan_is_an_error_for_concrete_inputs_even_under_jit():
    w, x, x_tilde = _problem()
    alphabet = alphabets.for_weights(w, c=1.0, bits=2)
    bad = x.at[0, 0].set(jnp.nan)
    with pytest.raises(ValueError, match="x contains NaN or Inf"):
        qjax.gpfq_layer(w, bad, x_tilde, alphabet)
    with pytest.raises(ValueError, match="x contains NaN or Inf"):
        jax.jit(lambda w: qjax.gpfq_layer(w, bad, x_tilde, alphabet))(w)


@pytest.mark.parametrize("num_letters", [2, 3, 4, 8, 16])
def test_dead_inputs_get_the_letter_nearest_zero(num_letters):
    """||X~_t|| = 0: q_t = Q(0), the letter nearest 0, ties to the lower one (-δ/2 when even),
    as `qjax.reference` does, for every alphabet size."""
    w, x, x_tilde = _problem(n0=10, n1=4)
    x_tilde = x_tilde.at[:, 3].set(0.0)
    alphabet = alphabets.uniform(num_letters, 1.0)
    letters = np.asarray(alphabet.letters)
    nearest_zero = letters[np.argmin(np.abs(letters))]
    assert nearest_zero == (0.0 if num_letters % 2 else -float(alphabet.step) / 2)
    expected = gpfq_reference(np.asarray(w), np.asarray(x), np.asarray(x_tilde), letters)
    for method in ("gram", "residual"):
        q = np.asarray(qjax.gpfq_layer(w, x, x_tilde, alphabet, form=method))
        np.testing.assert_array_equal(q[3], nearest_zero)
        np.testing.assert_array_equal(q, expected)


@pytest.mark.parametrize("group_size", [4, 5, 24])
def test_group_wise_gpfq_equals_reference(group_size):
    with jax.enable_x64(True):
        w, x, x_tilde = (a.astype(np.float64) for a in _problem(seed=3))
        alphabet = alphabets.for_weights(w, c=1.0, bits=2, rule="max", group_size=group_size)
        assert alphabet.step.shape == (-(-24 // group_size), 6)
        rows = jnp.repeat(alphabet.step, group_size, axis=0)[:24]
        letters = (np.arange(4) - 1.5) * np.asarray(rows)[..., None]  # (N0, N1, n)
        expected = gpfq_reference(np.asarray(w), np.asarray(x), np.asarray(x_tilde), letters)
        for method in ("gram", "residual"):
            q = qjax.gpfq_layer(w, x, x_tilde, alphabet, form=method, block_size=4)
            np.testing.assert_array_equal(np.asarray(q), expected)
        # GPTQ and MSQ give letters of each input's own group too.
        stats = qjax.gram_stats(x, x_tilde)
        for q in (qjax.gptq_from_stats(w, stats, alphabet), qjax.msq(w, alphabet)):
            codes = np.round(np.asarray(q) / rows + 1.5)
            np.testing.assert_allclose((codes - 1.5) * rows, q, rtol=1e-12)
            assert codes.min() >= 0 and codes.max() <= 3


def test_gptq_act_order_changes_the_visit_order_not_the_letters():
    w, x, _x_tilde = _problem(seed=5)
    x = x * jnp.linspace(0.2, 3.0, x.shape[1])  # inputs of very different energies
    stats = qjax.gram_stats(x, x)
    alphabet = alphabets.for_weights(w, c=1.0, bits=2, per_channel=True)
    plain = qjax.gptq_from_stats(w, stats, alphabet)
    ordered = qjax.gptq_from_stats(w, stats, alphabet, act_order=True)
    assert not np.array_equal(plain, ordered)
    assert np.all(np.isin(np.asarray(ordered), np.asarray(alphabet.letters)))
    error = lambda q: float(qjax.relative_error(w, q, qjax.gram_stats(x, x, track_error=True)))
    assert error(ordered) < error(qjax.msq(w, alphabet))
