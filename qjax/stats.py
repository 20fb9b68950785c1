"""Streamed second-moment statistics of a layer's calibration inputs: the data every method reads.

For a layer with weights W (N0 × N1), float-network inputs X (m × N0) and quantized-network
inputs X~ (m × N0), GPFQ, GPTQ and their successors need only

    G = X~ᵀX~,    H = X~ᵀX    (and XᵀX, to report ||XW - X~Q|| / ||XW||),

N0 × N0 matrices summed over calibration batches, so memory does not grow with m. Each batch's
products run at full float32 precision (`Precision.HIGHEST`: no TF32/bfloat16 passes on GPUs);
batches are added in float32 (float64 with `jax_enable_x64` and float64 inputs).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from qjax.checks import check_matrix, check_positive_int

__all__ = [
    "GramStats",
    "accumulate",
    "gram_stats",
    "gram_stats_init",
    "gram_stats_update",
    "relative_error",
]

_HIGHEST = jax.lax.Precision.HIGHEST


class GramStats(NamedTuple):
    """Second-moment statistics of a layer's calibration inputs, summed over rows.

    Attributes:
      gram: G = X~ᵀX~, shape batch_shape + (N0, N0).
      cross: H = X~ᵀX, shape batch_shape + (N0, N0).
      count: the number of rows m summed so far (int32 scalar).
      float_gram: XᵀX, shape batch_shape + (N0, N0), kept only when error tracking was asked for
        (`gram_stats_init(..., track_error=True)`); needed by `relative_error`. Otherwise None.
    """

    gram: jax.Array
    cross: jax.Array
    count: jax.Array
    float_gram: jax.Array | None = None


def gram_stats_init(
    n0: int,
    *,
    batch_shape: tuple[int, ...] = (),
    track_error: bool = False,
    dtype: jnp.dtype = jnp.float32,
) -> GramStats:
    """Zero statistics for a layer with `n0` inputs.

    Args:
      n0: the number of inputs N0.
      batch_shape: leading dimensions, e.g. (groups,) for a grouped convolution.
      track_error: also accumulate XᵀX, so that `relative_error` can be computed.
      dtype: accumulation dtype (float32 by default; float64 needs `jax_enable_x64`).

    Returns:
      `GramStats` of zeros.
    """
    check_positive_int("n0", n0)
    shape = (*batch_shape, n0, n0)
    return GramStats(
        gram=jnp.zeros(shape, dtype),
        cross=jnp.zeros(shape, dtype),
        count=jnp.zeros((), jnp.int32),
        float_gram=jnp.zeros(shape, dtype) if track_error else None,
    )


def accumulate(stats: GramStats, x: jax.Array, x_tilde: jax.Array) -> GramStats:
    """Adds X~ᵀX~, X~ᵀX (and XᵀX) of one batch of rows: the pure, traceable update.

    Args:
      stats: the running `GramStats`.
      x: rows of X, shape batch_shape + (m, N0).
      x_tilde: rows of X~, the same shape.

    Returns:
      The updated `GramStats`.
    """
    dtype = stats.gram.dtype
    x, x_tilde = x.astype(dtype), x_tilde.astype(dtype)
    # Contract the row axis: (..., m, N0)ᵀ(..., m, N0) -> (..., N0, N0), in full float32 precision
    # (on GPUs the default float32 matmul precision would use TF32 and lose the small residuals).
    xt_t = jnp.swapaxes(x_tilde, -1, -2)
    gram = stats.gram + jnp.matmul(xt_t, x_tilde, precision=_HIGHEST)
    cross = stats.cross + jnp.matmul(xt_t, x, precision=_HIGHEST)
    float_gram = stats.float_gram
    if float_gram is not None:
        float_gram = float_gram + jnp.matmul(jnp.swapaxes(x, -1, -2), x, precision=_HIGHEST)
    return GramStats(gram, cross, stats.count + x.shape[-2], float_gram)


_accumulate_jit = jax.jit(accumulate, donate_argnums=0)


def gram_stats_update(stats: GramStats, x: ArrayLike, x_tilde: ArrayLike) -> GramStats:
    """Adds one calibration batch to the statistics (streaming accumulation).

    Args:
      stats: the running `GramStats` (their buffers are donated: do not reuse `stats`).
      x: the batch's inputs to the layer in the float network, shape batch_shape + (m, N0).
      x_tilde: the same batch's inputs in the partly quantized network, same shape.

    Returns:
      The updated `GramStats`.
    """
    x = check_matrix("x", x, batch_ndim=stats.gram.ndim - 2)
    x_tilde = check_matrix("x_tilde", x_tilde, batch_ndim=stats.gram.ndim - 2)
    if x.shape != x_tilde.shape:
        raise ValueError(
            f"x and x_tilde must have the same shape, got {x.shape} and {x_tilde.shape}"
        )
    expected = (*stats.gram.shape[:-2], x.shape[-2], stats.gram.shape[-1])
    if x.shape != expected:
        raise ValueError(
            f"x has shape {x.shape}, but the statistics expect batch_shape + (m, N0) = "
            f"{stats.gram.shape[:-2]} + (m, {stats.gram.shape[-1]})"
        )
    return _accumulate_jit(stats, x, x_tilde)


def gram_stats(
    x: ArrayLike,
    x_tilde: ArrayLike,
    *,
    batch_size: int | None = None,
    track_error: bool = False,
) -> GramStats:
    """G = X~ᵀX~ and H = X~ᵀX of whole calibration matrices, summed `batch_size` rows at a time.

    Args:
      x: float-network inputs, shape (..., m, N0).
      x_tilde: quantized-network inputs, same shape.
      batch_size: rows per accumulation step (default: all rows at once).
      track_error: also accumulate XᵀX for `relative_error`.

    Returns:
      `GramStats`.
    """
    x = check_matrix("x", x)
    x_tilde = jnp.asarray(x_tilde)  # once, not per batch
    dtype = jnp.result_type(x.dtype, jnp.float32)  # float64 inputs keep float64 (with x64)
    stats = gram_stats_init(
        x.shape[-1], batch_shape=x.shape[:-2], track_error=track_error, dtype=dtype
    )
    m = x.shape[-2]
    if batch_size is not None:
        check_positive_int("batch_size", batch_size)
    step = m if batch_size is None else batch_size
    for start in range(0, m, step):
        rows = slice(start, start + step)
        stats = gram_stats_update(stats, x[..., rows, :], x_tilde[..., rows, :])
    return stats


def relative_error(w: ArrayLike, q: ArrayLike, stats: GramStats) -> jax.Array:
    """||XW - X~Q||_F / ||XW||_F from statistics accumulated with `track_error=True`.

    Uses ||XW - X~Q||² = tr(WᵀXᵀXW) - 2 tr(WᵀHᵀQ) + tr(QᵀGQ), H = X~ᵀX, G = X~ᵀX~.

    Args:
      w: the float weights, shape batch_shape + (N0, N1).
      q: the quantized weights, same shape.
      stats: `GramStats` with `float_gram`.

    Returns:
      The relative error, a scalar (summed over batch_shape).
    """
    if stats.float_gram is None:
        raise ValueError("relative_error needs XᵀX: accumulate with gram_stats(track_error=True)")
    w = jnp.asarray(w, stats.gram.dtype)
    q = jnp.asarray(q, stats.gram.dtype)
    if w.shape != q.shape:
        raise ValueError(f"w and q must have the same shape, got {w.shape} and {q.shape}")

    def quad(a, m, b):
        return jnp.sum(a * jnp.matmul(m, b, precision=_HIGHEST))

    reference = quad(w, stats.float_gram, w)
    error_sq = reference - 2 * quad(q, stats.cross, w) + quad(q, stats.gram, q)
    return jnp.sqrt(jnp.maximum(error_sq, 0.0) / reference)
