"""Tests of the ProxQuant prox operators and hard quantizers against their formulas."""

import itertools

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qjax import export, prox

FLOATS = hnp.arrays(
    np.float32,
    hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=6),
    elements=st.floats(-3, 3, width=32, allow_subnormal=False),
)


def numpy_binary_prox(theta, lam, alpha=1.0):
    """argmin_x ½(x − θ)² + λ·min|x ± α|, by brute force over a fine grid."""
    grid = np.linspace(-4, 4, 80001)
    objective = 0.5 * (grid[None] - theta.reshape(-1, 1)) ** 2 + lam * np.minimum(
        np.abs(grid[None] - alpha), np.abs(grid[None] + alpha)
    )
    return grid[np.argmin(objective, axis=1)].reshape(theta.shape)


def numpy_ternarize(theta):
    delta = 0.7 * np.mean(np.abs(theta))
    out = np.zeros_like(theta)
    if np.any(theta > delta):
        out[theta > delta] = theta[theta > delta].mean()
    if np.any(theta < -delta):
        out[theta < -delta] = theta[theta < -delta].mean()
    return out


@pytest.mark.parametrize("lam", [0.0, 0.05, 0.3, 1.5])
@pytest.mark.parametrize("alpha", [1.0, 0.4])
def test_binary_prox_is_the_minimizer_of_the_w_shaped_objective(lam, alpha):
    theta = np.random.default_rng(0).uniform(-2, 2, size=200).astype(np.float32)
    np.testing.assert_allclose(
        prox.binary_prox(theta, lam, alpha), numpy_binary_prox(theta, lam, alpha), atol=2e-4
    )


@given(FLOATS, st.floats(0, 5))
@settings(max_examples=30, deadline=None)
def test_binary_prox_attains_the_minimum_of_the_w_shaped_objective(theta, lam):
    """f(x) = ½(x − θ)² + λ·min|x ± 1| at the prox is no larger than its minimum over a grid
    (which is at least the true minimum), up to the float32 error of x: |f'(x)|·|Δx| with
    |Δx| ≤ 2u·(|θ| + λ + 1) (one rounding of θ − q, one of the shrink, one of the sum)."""
    theta64 = theta.astype(np.float64).reshape(-1, 1)
    x = np.asarray(prox.binary_prox(theta, lam), np.float64).reshape(-1, 1)

    def objective(v):
        return 0.5 * (v - theta64) ** 2 + lam * np.minimum(np.abs(v - 1), np.abs(v + 1))

    grid = np.linspace(-4, 4, 8001)[None]
    slope = np.abs(x - theta64) + lam
    error = slope * 2 * 2.0**-24 * (np.abs(theta64) + lam + 1)
    assert np.all(objective(x) <= objective(grid).min(axis=1, keepdims=True) + error)


QUANTIZERS = {
    "binary": prox.binary_quantizer(),
    "binary_one": prox.binary_quantizer("one"),
    "binary_channel": prox.binary_quantizer("channel"),
    "ternary": prox.ternary_quantizer(),
    "ternary_symmetric": prox.ternary_quantizer(symmetric=True),
    "multibit2": prox.multibit_quantizer(2),
    "multibit3": prox.multibit_quantizer(3, channel_axis=None),
    "uniform3": prox.multibit_quantizer(3, uniform=True, iterations=10),
}


@pytest.mark.parametrize("name", QUANTIZERS)
def test_zero_strength_is_identity(name):
    theta = jax.random.normal(jax.random.key(1), (8, 5))
    np.testing.assert_allclose(QUANTIZERS[name].prox(theta, 0.0), theta, rtol=1e-6)


@pytest.mark.parametrize("name", QUANTIZERS)
def test_infinite_strength_is_the_hard_quantizer(name):
    quantizer = QUANTIZERS[name]
    theta = jax.random.normal(jax.random.key(2), (8, 5))
    np.testing.assert_allclose(quantizer.prox(theta, 1e7), quantizer.project(theta), atol=1e-5)


# Alternating minimization is a local method: for b >= 3 bits, refitting an already quantized
# tensor can land in another local minimum, so only the exact projections are checked here.
@pytest.mark.parametrize(
    "name",
    [
        "binary",
        "binary_one",
        "binary_channel",
        "ternary",
        "ternary_symmetric",
        "multibit2",
        "uniform3",
    ],
)
@pytest.mark.parametrize("lam", [0.01, 1.0])
def test_quantized_points_are_fixed_points(name, lam):
    quantizer = QUANTIZERS[name]
    q = quantizer.project(jax.random.normal(jax.random.key(3), (8, 5)))
    np.testing.assert_allclose(quantizer.project(q), q, atol=1e-5)
    np.testing.assert_allclose(quantizer.prox(q, lam), q, atol=1e-5)


@pytest.mark.parametrize("name", QUANTIZERS)
def test_prox_moves_toward_the_quantized_set(name):
    quantizer = QUANTIZERS[name]
    theta = jax.random.normal(jax.random.key(4), (16, 6))
    moved = quantizer.prox(theta, 0.2)
    assert jnp.linalg.norm(moved - quantizer.project(theta)) < jnp.linalg.norm(
        theta - quantizer.project(theta)
    )


def test_ternarize_matches_numpy_reference():
    theta = np.random.default_rng(5).normal(size=(7, 9)).astype(np.float32)
    theta[0, 0] = 4.0  # asymmetric values above / below
    np.testing.assert_allclose(prox.ternarize(theta), numpy_ternarize(theta), rtol=1e-6)
    np.testing.assert_allclose(
        prox.ternary_prox(theta, 0.5), (theta + 0.5 * numpy_ternarize(theta)) / 1.5, rtol=1e-6
    )


def test_ternarize_of_zeros_is_zero():
    np.testing.assert_array_equal(prox.ternarize(jnp.zeros((3, 3))), 0)
    np.testing.assert_array_equal(prox.ternarize(jnp.zeros((3, 3)), symmetric=True), 0)


def test_symmetric_ternarize_takes_the_mean_magnitude_for_both_signs():
    theta = np.array([4.0, 1.0, -2.0, 0.1, -0.1, 0.0], np.float32)  # Δ = 0.7·7.2/6 = 0.84
    np.testing.assert_allclose(
        prox.ternarize(theta, symmetric=True), [7 / 3, 7 / 3, -7 / 3, 0, 0, 0], rtol=1e-6
    )
    np.testing.assert_allclose(prox.ternarize(theta), [2.5, 2.5, -2.0, 0, 0, 0], rtol=1e-6)


@pytest.mark.parametrize(
    ("quantizer", "exportable"),
    [
        (prox.ternary_quantizer(), False),  # {v₋, 0, v₊}: no zero-centred grid
        (prox.ternary_quantizer(symmetric=True), True),
        (prox.multibit_quantizer(2, channel_axis=None), False),  # α₁ ± α₂: uneven levels
        (prox.multibit_quantizer(2, channel_axis=None, uniform=True), True),
        (prox.multibit_quantizer(3, uniform=True), True),  # one δ per output channel
        (prox.binary_quantizer("channel"), True),
    ],
)
def test_which_hard_quantizations_export(quantizer, exportable):
    theta = jax.random.normal(jax.random.key(11), (32, 5)) + 0.3
    q = np.asarray(quantizer.project(theta))
    if exportable:
        packed = export.quantize_array(q, name="kernel")
        np.testing.assert_allclose(packed.dequantize(), q, rtol=1e-5, atol=1e-6)
    else:
        with pytest.raises(ValueError, match="off the alphabet"):
            export.quantize_array(q, name="kernel")


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_uniform_multibit_levels_are_odd_multiples_of_one_step(bits):
    w = jax.random.normal(jax.random.key(bits), (200, 3))
    q = np.asarray(prox.multibit_quantize(w, bits, uniform=True, iterations=10), np.float64)
    for j in range(3):
        levels = np.unique(np.round(q[:, j], 5))
        step = np.min(np.abs(levels))
        multiples = levels / step
        odd = np.round(multiples)
        np.testing.assert_allclose(multiples, odd, atol=1e-3)
        assert np.all(odd % 2 == 1) and np.max(np.abs(odd)) <= 2**bits - 1
    # Tied α cost some error against free α, but not much (at most 15 % more here).
    free = prox.multibit_quantize(w, bits, iterations=10)
    assert np.linalg.norm(w - q) <= 1.15 * float(jnp.linalg.norm(w - free))
    np.testing.assert_allclose(
        prox.multibit_quantize(w, 1, uniform=True), prox.multibit_quantize(w, 1), rtol=1e-5
    )


def numpy_alternating(w, bits, iterations):
    residual, alphas, codes = w.copy(), [], []
    for _ in range(bits):
        alphas.append(np.abs(residual).mean())
        codes.append(np.where(residual >= 0, 1.0, -1.0))
        residual = residual - alphas[-1] * codes[-1]
    alpha, b = np.array(alphas), np.stack(codes, 1)
    book = np.array(list(itertools.product((-1.0, 1.0), repeat=bits)))
    for _ in range(iterations):
        alpha = np.linalg.solve(b.T @ b + 1e-6 * len(w) * np.eye(bits), b.T @ w)
        b = book[np.argmin(np.abs(w[:, None] - (book @ alpha)[None]), axis=1)]
    return b @ alpha


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_multibit_matches_numpy_alternating_minimization(bits):
    w = np.random.default_rng(bits).normal(size=(64, 3))
    got = prox.multibit_quantize(jnp.asarray(w, jnp.float32), bits, channel_axis=-1)
    expected = np.stack([numpy_alternating(w[:, j], bits, 3) for j in range(3)], axis=1)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert all(len(np.unique(np.round(np.asarray(got[:, j]), 5))) <= 2**bits for j in range(3))


def test_multibit_error_decreases_with_bits():
    w = jax.random.normal(jax.random.key(6), (256, 4))
    errors = [float(jnp.linalg.norm(w - prox.multibit_quantize(w, b))) for b in (1, 2, 3, 4)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.25 * errors[0]


def test_multibit_one_bit_is_mean_abs_sign_per_channel():
    w = jax.random.normal(jax.random.key(7), (10, 3))
    expected = jnp.mean(jnp.abs(w), axis=0) * jnp.where(w >= 0, 1.0, -1.0)
    np.testing.assert_allclose(prox.multibit_quantize(w, 1), expected, rtol=1e-5)
    rows = prox.multibit_quantize(w, 1, channel_axis=0)
    np.testing.assert_allclose(rows, jnp.mean(jnp.abs(w), 1, keepdims=True) * jnp.sign(w), 1e-5)


def test_binary_scale_rules():
    w = jnp.array([[1.0, -4.0], [-3.0, 2.0]])
    assert prox.binary_scale(w, "one") == 1.0
    assert prox.binary_scale(w, "tensor") == 2.5
    # "binary" without a scale is mean|θ| per tensor, not α = 1.
    np.testing.assert_allclose(prox.get_quantizer("binary").project(w), [[2.5, -2.5], [-2.5, 2.5]])
    np.testing.assert_allclose(prox.binary_scale(w, "channel"), [[2.0, 3.0]])
    np.testing.assert_allclose(prox.binary_quantizer("channel").project(w), [[2, -3], [-2, 3]])


def test_jit_and_vmap():
    theta = jax.random.normal(jax.random.key(8), (4, 6, 5))
    for quantizer in QUANTIZERS.values():
        batched = jax.jit(jax.vmap(quantizer.prox, in_axes=(0, None)))(theta, 0.3)
        one_by_one = jnp.stack([quantizer.prox(t, 0.3) for t in theta])
        np.testing.assert_allclose(batched, one_by_one, atol=1e-5)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: prox.binary_prox(jnp.ones(3, jnp.int32), 0.1), "floating dtype"),
        (lambda: prox.binary_prox(jnp.ones(3), -0.1), "non-negative"),
        (lambda: prox.binary_prox(jnp.ones(3), jnp.nan), "non-negative"),
        (lambda: prox.binary_prox(jnp.ones(3), jnp.ones(2)), "scalar"),
        (lambda: prox.multibit_quantize(jnp.ones((3, 2)), 5), "bits"),
        (lambda: prox.multibit_quantize(jnp.ones((3, 2)), 2, channel_axis=2), "channel_axis"),
        (lambda: prox.binary_scale(jnp.ones(3), "channel"), "rank"),
        (lambda: prox.binary_quantizer("row"), "rule"),
        (lambda: prox.get_quantizer("quaternary"), "quantizer"),
    ],
)
def test_bad_input_raises(call, message):
    with pytest.raises(ValueError, match=message):
        call()
