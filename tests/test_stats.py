"""Tests of qjax.stats: one summation scheme (plain float32) for statistics on one device and on a
mesh, and the per-device layout. The multi-device cases are in tests/test_sharding.py."""

import jax
import numpy as np
import pytest

from qjax.stats import (
    GramStats,
    accumulate,
    combined,
    gram_stats,
    gram_stats_init,
    make_mesh,
)


def test_a_million_rows_in_plain_float32_stay_near_float64_on_one_device_and_on_a_mesh():
    """10⁶ rows in 1000 batches: plain float32 sums stay within 2·10⁻⁶ (Frobenius) of float64 —
    the measurement behind the scheme is in qjax.stats's docstring — and a mesh sums the same
    way: on one device its per-device sums are the unsharded ones, bit for bit."""
    rng = np.random.default_rng(3)
    m, n0, rows = 1_000_000, 16, 1000
    x = (rng.normal(size=(m, n0)) + 0.5).astype(np.float32)  # non-zero mean: large sums
    x_tilde = (x + 0.05 * rng.normal(size=(m, n0))).astype(np.float32)
    plain = gram_stats(x, x_tilde, batch_size=rows)
    on_mesh = combined(gram_stats(x, x_tilde, batch_size=rows, mesh=make_mesh()))
    x64, xt64 = x.astype(np.float64), x_tilde.astype(np.float64)
    for name, exact in (("gram", xt64.T @ xt64), ("cross", xt64.T @ x64)):
        got = np.asarray(getattr(plain, name), np.float64)
        assert np.linalg.norm(got - exact) / np.linalg.norm(exact) < 2e-6, name
        assert np.max(np.abs(got - exact) / np.abs(exact)) < 5e-6, name
        np.testing.assert_array_equal(getattr(on_mesh, name), getattr(plain, name))
    assert int(on_mesh.count) == int(plain.count) == m


def test_per_device_layout_and_combined():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 30, 5)).astype(np.float32)  # batch_shape (2,)
    plain = gram_stats(x, x, track_error=True)
    assert not plain.per_device
    assert combined(plain) is plain
    mesh = make_mesh()
    partial = gram_stats(x, x, track_error=True, mesh=mesh)
    assert partial.per_device
    assert partial.gram.shape == partial.float_gram.shape == (mesh.size, 2, 5, 5)
    assert partial.count.shape == (mesh.size,)
    total = combined(partial)
    assert isinstance(total, GramStats) and not total.per_device
    assert total.gram.shape == (2, 5, 5) and int(total.count) == 30
    np.testing.assert_allclose(total.float_gram, plain.float_gram, rtol=1e-6)
    traced = jax.jit(combined)(partial)  # pure: the same under jit
    np.testing.assert_array_equal(traced.cross, total.cross)
    assert gram_stats_init(5, mesh=mesh).float_gram is None


def test_zero_rows_raise():
    with pytest.raises(ValueError, match="x has no rows"):
        gram_stats(np.zeros((0, 4), np.float32), np.zeros((0, 4), np.float32))


def test_first_layer_statistics_take_one_product():
    """X~ = X (the same array): one X~ᵀX~ product serves G, H and XᵀX, equal to float64 sums."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 7)).astype(np.float32)
    init = gram_stats_init(7, track_error=True)

    def products(fn):
        text = str(jax.make_jaxpr(fn)(init, x, x))
        return text.count("dot_general")

    assert products(lambda s, a, b: accumulate(s, a, a)) == 1
    assert products(lambda s, a, b: accumulate(s, a, b)) == 3
    stats = gram_stats(x, x, batch_size=128, track_error=True)
    exact = x.astype(np.float64).T @ x.astype(np.float64)
    tolerance = len(x) * np.finfo(np.float32).eps * np.max(x * x)  # float32 sums of m products
    for matrix in (stats.gram, stats.cross, stats.float_gram):
        np.testing.assert_allclose(matrix, exact, rtol=0, atol=tolerance)
    np.testing.assert_array_equal(stats.cross, stats.gram)


def test_gram_from_its_upper_block_triangle_is_symmetric_and_exact():
    """N0 = 1100 splits X~ᵀX~ into 4 × 4 column blocks (10 products); batch axes pass through."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 40, 1100)).astype(np.float32)
    stats = gram_stats(x, x + 0.1, track_error=True)
    for matrix, (a, b) in ((stats.gram, (x + 0.1, x + 0.1)), (stats.float_gram, (x, x))):
        exact = np.einsum("gmi,gmj->gij", a.astype(np.float64), b.astype(np.float64))
        tolerance = x.shape[1] * np.finfo(np.float32).eps * np.max(a * a)
        np.testing.assert_allclose(matrix, exact, rtol=0, atol=tolerance)
        np.testing.assert_array_equal(matrix, np.swapaxes(matrix, -1, -2))
