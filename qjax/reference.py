"""Plain NumPy transcriptions of the papers' algorithms: the references for tests and benchmarks.

They follow the papers line by line, with Python loops, and are slow on purpose.
"""

from __future__ import annotations

import numpy as np

__all__ = ["gpfq_reference", "nearest_letter"]


def nearest_letter(value: float, letters: np.ndarray) -> float:
    """Q(value): the nearest of `letters` (sorted); a tie goes to the lower letter."""
    return letters[np.argmin(np.abs(letters - value))]


def gpfq_reference(
    w: np.ndarray,
    x: np.ndarray,
    x_tilde: np.ndarray,
    letters: np.ndarray,
    *,
    dead_tol: float = 1e-12,
) -> np.ndarray:
    """GPFQ (Lybrand & Saab) for one layer, neuron by neuron, input by input.

    For each neuron w (a column of W): u_0 = 0 and for t = 1..N0
    q_t = Q(<X~_t, u_{t-1} + w_t X_t> / ||X~_t||²), u_t = u_{t-1} + w_t X_t - q_t X~_t,
    with q_t = Q(0) when ||X~_t||² <= dead_tol·max_s ||X~_s||² (the reference code's rule).

    Args:
      w: (N0, N1) weights.
      x: (m, N0) inputs in the float network.
      x_tilde: (m, N0) inputs in the quantized network.
      letters: the alphabet, sorted: shape (n,) for all weights, (N1, n) per neuron, or
        (N0, N1, n) per input and neuron (group-wise alphabets).
      dead_tol: relative threshold for dead inputs.

    Returns:
      Q, (N0, N1).
    """
    n0, n1 = w.shape
    letters = np.broadcast_to(letters, (n0, n1, np.shape(letters)[-1]))
    norms_sq = np.sum(x_tilde * x_tilde, axis=0)
    dead = norms_sq <= dead_tol * norms_sq.max()
    q = np.zeros_like(w)
    for neuron in range(n1):
        u = np.zeros(x.shape[0], dtype=w.dtype)
        for t in range(n0):
            v = u + w[t, neuron] * x[:, t]
            argument = 0.0 if dead[t] else x_tilde[:, t] @ v / norms_sq[t]
            q[t, neuron] = nearest_letter(argument, letters[t, neuron])
            u = v - q[t, neuron] * x_tilde[:, t]
    return q
