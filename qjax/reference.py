"""Plain NumPy transcriptions of the papers' algorithms: the references for tests and benchmarks.

They follow the papers line by line, with Python loops, and are slow on purpose.
"""

from __future__ import annotations

import numpy as np

__all__ = ["gpfq_reference", "gptq_reference", "nearest_letter", "qronos_reference"]


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


def gptq_reference(
    w: np.ndarray,
    gram: np.ndarray,
    letters: np.ndarray,
    *,
    damping: float,
    act_order: bool = False,
) -> np.ndarray:
    """GPTQ (Frantar et al., eqs. 2-3) without Cholesky or blocks, in float64.

    H = G + damping·mean(diag G)·I. For each input t in turn: q_t = Q(w_t) entry by entry; the
    inputs not yet quantized absorb the error, w_{>t} -= H⁻¹_{>t,t} (w_t - q_t) / H⁻¹_tt; t leaves
    H⁻¹ by one step of Gaussian elimination.

    Args:
      w: (N0, N1) weights.
      gram: G = X~ᵀX~, (N0, N0).
      letters: the alphabet, sorted: shape (n,) for all weights, (N1, n) per neuron, or
        (N0, N1, n) per input and neuron (group-wise alphabets).
      damping: the relative damping α.
      act_order: visit the inputs by decreasing G_tt (ties in layer order) instead of in order.

    Returns:
      Q, (N0, N1), rows in the layer's input order.
    """
    n0, n1 = np.shape(w)
    letters = np.broadcast_to(np.asarray(letters, np.float64), (n0, n1, np.shape(letters)[-1]))
    order = np.argsort(-np.diag(gram), kind="stable") if act_order else np.arange(n0)
    w = np.array(w, np.float64)[order]
    h = np.array(gram, np.float64)[np.ix_(order, order)]
    letters = letters[order]
    h = h + damping * np.mean(np.diag(h)) * np.eye(n0)
    h_inv = np.linalg.inv(h)
    q = np.zeros_like(w)
    for t in range(n0):
        q[t] = [nearest_letter(v, row) for v, row in zip(w[t], letters[t], strict=True)]
        error = (w[t] - q[t]) / h_inv[t, t]
        w[t + 1 :] -= np.outer(h_inv[t + 1 :, t], error)
        h_inv = h_inv - np.outer(h_inv[:, t], h_inv[t, :]) / h_inv[t, t]
    return q[np.argsort(order)]  # row k of q is input order[k]


def qronos_reference(
    w: np.ndarray,
    x: np.ndarray,
    x_tilde: np.ndarray,
    letters: np.ndarray,
    *,
    damping: float,
    act_order: bool = False,
    power_iterations: int = 30,
) -> np.ndarray:
    """Qronos (Zhang, Zhang, Colbert & Saab) for one layer, neuron by neuron, input by input.

    For each neuron w (a column of W), w^(0) = w, and for the inputs t in visiting order:

      correct the past:  q_t = Q(argmin_p ||u_t(p)||² + λ(p - w_t)²),
                         u_t(p) = Xw - Σ_{s<t} q_s X~_s - p X~_t - Σ_{s>t} w^(t-1)_s X~_s,
      shape the future:  w^(t)_{>t} = argmin_v ||Xw - Σ_{s≤t} q_s X~_s - Σ_{s>t} v_s X~_s||²
                                               + λ||v - w_{>t}||²,

    both solved in closed form from X and X~ (no Cholesky, no statistics). "s<t" means visited
    before t. λ = damping·||X~ᵀX~||₂, the norm by `power_iterations` steps of power iteration
    from the unit vector of the largest ||X~_t||² (as `qjax.methods.qronos`). A dead input
    (||X~_t|| = 0) gets Q(0).

    Args:
      w: (N0, N1) weights.
      x: (m, N0) inputs in the float network.
      x_tilde: (m, N0) inputs in the quantized network.
      letters: the alphabet, sorted: (n,) for all, (N1, n) per neuron, or (N0, N1, n) per input
        and neuron (group-wise alphabets, each input with its group's letters).
      damping: α (λ = α·||X~ᵀX~||₂).
      act_order: visit the inputs by decreasing ||X~_t||² (ties in layer order).
      power_iterations: steps of the power iteration for ||X~ᵀX~||₂.

    Returns:
      Q, (N0, N1).
    """
    n0, n1 = w.shape
    letters = np.broadcast_to(letters, (n0, n1, np.shape(letters)[-1]))
    gram = x_tilde.T @ x_tilde
    norms_sq = np.diag(gram)
    v = np.zeros(n0)
    v[np.argmax(norms_sq)] = 1.0
    for _ in range(power_iterations):
        gv = gram @ v
        norm = np.linalg.norm(gv)
        v = gv / norm if norm > 0 else gv
    lam = damping * (v @ gram @ v)
    order = np.argsort(-norms_sq, kind="stable") if act_order else np.arange(n0)
    q = np.zeros_like(w)
    for neuron in range(n1):
        target = x @ w[:, neuron]
        current = w[:, neuron].copy()  # w^(t-1): letters for visited inputs, the rest auxiliary
        for k, t in enumerate(order):
            before, after = order[:k], order[k + 1 :]
            residual = target - x_tilde[:, before] @ q[before, neuron]
            residual = residual - x_tilde[:, after] @ current[after]
            argument = (x_tilde[:, t] @ residual + lam * w[t, neuron]) / (norms_sq[t] + lam)
            if norms_sq[t] <= 0:
                argument = 0.0
            q[t, neuron] = nearest_letter(argument, letters[t, neuron])
            current[t] = q[t, neuron]
            if len(after):
                rest = x_tilde[:, after]
                remainder = target - x_tilde[:, order[: k + 1]] @ q[order[: k + 1], neuron]
                current[after] = np.linalg.solve(
                    rest.T @ rest + lam * np.eye(len(after)),
                    rest.T @ remainder + lam * w[after, neuron],
                )
    return q
