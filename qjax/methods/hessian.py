"""The damped Hessian factor that GPTQ and Qronos share: one reversed Cholesky factorization.

Both methods quantize the inputs t = 1..N0 of a layer in order and, after each, let the inputs not
yet quantized absorb the rounding error by least squares in a damped Hessian M = G + λI
(G = X~ᵀX~). With the reversed Cholesky factor M = RRᵀ (R upper triangular), the weight that
input t is rounded from, once q_1..q_{t-1} are fixed, is Babai's nearest-plane recursion

    w^(t-1)_t = (T_t - Σ_{s<t} S_ts q_s) / S_tt,      S_ts = R_tt R_st (s ≤ t),

where T holds the method's targets (GPTQ: T = Sw restricted to s ≤ t; Qronos: T = diag(R)·R⁻¹b).
This is the greedy recursion of GPFQ's "gram" form with S in place of G, so both run
`qjax.methods.gpfq_core`'s blocked scan. One factorization replaces GPTQ's inverse followed by a
second factorization.

JAX's Cholesky does not raise on a matrix that is not positive definite in floating point (G is
singular up to rounding when inputs are collinear, or a few rows are fewer than N0): it returns
NaN. `damped_factor` then raises λ tenfold, `MAX_DAMPING_RAISES` times at most; if the factor is
still NaN the codes come out NaN, and `QuantizationMethod.quantize` raises a clear error.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qjax.alphabets import AnyAlphabet, UniformAlphabet

__all__ = [
    "MAX_DAMPING_RAISES",
    "damped_factor",
    "failure_message",
    "input_alphabet",
    "nearest_plane_coupling",
]

# λ is raised tenfold at most this many times when the floating-point factorization fails.
MAX_DAMPING_RAISES = 8


def reversed_cholesky(matrix: jax.Array) -> jax.Array:
    """R upper triangular with M = RRᵀ (the Cholesky factor of M with the inputs reversed).

    NaN (JAX's Cholesky does not raise) where M is not positive definite in floating point.
    """
    return jax.lax.linalg.cholesky(matrix[::-1, ::-1], symmetrize_input=False)[::-1, ::-1]


def damped_factor(matrix: jax.Array, lam: jax.Array) -> tuple[jax.Array, jax.Array]:
    """λ' and R with M + λ'I = RRᵀ, λ' = λ·10^k for the least k ≤ `MAX_DAMPING_RAISES` that
    factors in floating point.

    Args:
      matrix: M, symmetric (N0, N0), positive semidefinite up to rounding.
      lam: λ ≥ 0, the damping to try first (a scalar, may be traced).

    Returns:
      (λ', R). R is NaN when M + λ·10^MAX_DAMPING_RAISES·I still fails to factor.
    """
    eye = jnp.eye(matrix.shape[0], dtype=matrix.dtype)

    def factor(lam):
        return reversed_cholesky(matrix + lam * eye)

    def failed(state):  # a failed factorization is NaN
        _, r, raises = state
        return ~jnp.all(jnp.isfinite(jnp.diagonal(r))) & (raises < MAX_DAMPING_RAISES)

    def raise_damping(state):
        lam, _, raises = state
        return 10 * lam, factor(10 * lam), raises + 1

    lam = jnp.asarray(lam, matrix.dtype)
    lam, r, _ = jax.lax.while_loop(failed, raise_damping, (lam, factor(lam), 0))
    return lam, r


def nearest_plane_coupling(r: jax.Array) -> jax.Array:
    """S with S_ts = R_tt R_st for s ≤ t, made symmetric (the scan reads its rows as columns)."""
    r_diag = jnp.diagonal(r)
    lower = r_diag[:, None] * r.T
    return lower + lower.T - jnp.diag(r_diag * r_diag)


def input_alphabet(alphabet: AnyAlphabet, order: jax.Array, w: jax.Array) -> AnyAlphabet:
    """The alphabet in visiting order: a group-wise alphabet becomes one row per visited input.

    Every leaf (step and zero point) is reordered alike, so integer grids keep their zero points.

    Args:
      alphabet: the alphabet of the layer's inputs in their own order.
      order: the visiting order, a permutation of 0..N0-1.
      w: the weights (N0, N1) (only their shape is read).
    """
    if not isinstance(alphabet, UniformAlphabet) or alphabet.group_size is None:
        return alphabet
    return jax.tree.map(lambda rows: rows[order], alphabet.per_input(w))


def failure_message(dtype: jnp.dtype, damping: float, scale: str) -> str:
    """What a factorization that failed at every damping means, and what to do.

    Args:
      dtype: the dtype of the statistics the method read.
      damping: the method's damping α; λ = α·`scale` was tried first.
      scale: what α multiplies, as the method defines λ (e.g. "mean(diag G)").
    """
    largest = damping * 10**MAX_DAMPING_RAISES
    return (
        f"the damped Hessian G + λI could not be factored in {dtype} for any damping "
        f"tried: λ = {damping:g}·{scale}, raised tenfold {MAX_DAMPING_RAISES} times up to "
        f"{largest:g}·{scale}. G = X~ᵀX~ is positive semidefinite, so a G this far from it is "
        "broken: check that the statistics were accumulated from the layer's inputs (finite, of "
        "comparable scales), accumulate them in float64 (gram_stats_init(..., "
        "dtype=jnp.float64) with jax_enable_x64), or raise `damping`"
    )
