"""Qronos (Zhang, Zhang, Colbert & Saab, ICLR 2026): correct the past, then shape the future.

For a layer with weights W (N0 inputs × N1 neurons), float-network inputs X and quantized-network
inputs X~ (m × N0), Qronos quantizes each neuron w (a column of W) input by input, t = 1..N0,
keeping auxiliary weights w^(t) for the inputs not yet quantized (w^(0) = w). Step t

* corrects the past: q_t is the letter nearest to the best value of input t when every other
  weight is held, the earlier ones at their letters q_s, the later ones at w^(t-1)_s:

      q_t = Q(argmin_p ||u_t(p)||² + λ(p - w_t)²),
      u_t(p) = Xw - Σ_{s<t} q_s X~_s - p X~_t - Σ_{s>t} w^(t-1)_s X~_s;

* shapes the future: the inputs after t absorb what is left, by (ridge) least squares,

      w^(t)_{>t} = argmin_v ||Xw - Σ_{s≤t} q_s X~_s - Σ_{s>t} v_s X~_s||² + λ||v - w_{>t}||².

Its target is the float network's output Xw, as in GPFQ, so the error that earlier quantized
layers left in X~ is corrected; its diffusion spreads each rounding error over all later inputs,
as in GPTQ. λ = α·||X~ᵀX~||₂ (damping α, the largest eigenvalue estimated by power iteration,
as Brevitas does); λ → 0 gives the paper's undamped rules.

Both steps need only G = X~ᵀX~ and H = X~ᵀX (qjax's `GramStats`; the paper writes these two the
other way round, H = X~ᵀX~ and G = X~ᵀX). With M = G + λI and b = (H + λI)w:

* Step 1 is the paper's Remark 3.3: q_1 = Q((b_1 - Σ_{s>1} G_1s w_s) / (G_11 + λ)).
* From step 2 on, the correction is the current auxiliary weight itself (w^(t-1) already
  minimizes over input t), so q_t = Q(w^(t-1)_t) and the diffusion is the GPTQ/OBS update with
  the Hessian M (Theorem 3.1). In the reversed Cholesky factor M = RRᵀ (R upper triangular)
  this is Babai's nearest-plane recursion

      w^(t-1)_t = (T_t - Σ_{s<t} S_ts q_s) / S_tt,   T = diag(R)·R⁻¹b,   S_ts = R_tt R_st (s ≤ t),

  the same greedy recursion as GPFQ's "gram" form, so `gpfq_from_targets` runs it (a scan inside
  blocks of B inputs, matrix products between blocks). One Cholesky factorization and one
  triangular solve replace GPTQ's inverse and second factorization.

Options: `damping` α (Brevitas's `alpha`, default 1e-6); `block_size` B, a speed knob only
(Brevitas's `num_blocks` k is B = ⌈N0/k⌉); `act_order` visits the inputs by decreasing G_tt.
Group-wise alphabets give input t the step (and zero point) of its own group, also under act-order.
Dead inputs (G_tt = 0) get Q(0), as in qjax's GPFQ and GPTQ (Brevitas rounds the float weight there;
neither changes the layer's output). If the float32 factorization of M fails (G singular up to
rounding and λ too small), λ is raised tenfold until it succeeds.

Where Qronos does not win. With X~ = X it is GPTQ with Hessian G + λI (the paper's Corollary
3.4), and with few rows (m ≪ N0) the tiny default λ lets its least-squares diffusion fit the rows
with large auxiliary weights that clip at the alphabet's ends: GPTQ's 1% damping then ends lower
(1.26x on average at 20 rows, 64 inputs, 2 bits), and a larger α (1e-3) closes the gap; see
`docs/qronos.md`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from qjax.alphabets import AnyAlphabet
from qjax.checks import check_positive_int
from qjax.methods import hessian
from qjax.methods.base import QuantizationMethod, functional_form
from qjax.methods.gpfq_core import gpfq_from_targets
from qjax.stats import GramStats

__all__ = ["Qronos", "qronos_from_stats"]

DEFAULT_DAMPING = 1e-6
DEFAULT_BLOCK_SIZE = 64
# Power-iteration steps for ||G||₂ (Brevitas's count), from the unit vector of the largest G_tt,
# so that the estimate is at least max_t G_tt.
POWER_ITERATIONS = 30
_HIGHEST = jax.lax.Precision.HIGHEST


def largest_eigenvalue(gram: jax.Array) -> jax.Array:
    """||G||₂ of a symmetric positive semidefinite G by `POWER_ITERATIONS` power-iteration steps.

    Starts from the unit vector of the largest diagonal entry, so the estimate (a Rayleigh
    quotient, nondecreasing along the iteration for G ⪰ 0) is at least max_t G_tt; 0 for G = 0.
    """
    start = jax.nn.one_hot(jnp.argmax(jnp.diagonal(gram)), gram.shape[0], dtype=gram.dtype)

    def step(_, v):
        gv = jnp.matmul(gram, v, precision=_HIGHEST)
        norm = jnp.linalg.norm(gv)
        return gv / jnp.where(norm > 0, norm, 1.0)

    v = jax.lax.fori_loop(0, POWER_ITERATIONS, step, start)
    return jnp.dot(v, jnp.matmul(gram, v, precision=_HIGHEST), precision=_HIGHEST)


def _qronos_matrix(
    w: jax.Array,
    gram: jax.Array,
    cross: jax.Array,
    alphabet: AnyAlphabet,
    *,
    damping: float,
    block_size: int,
    act_order: bool,
) -> jax.Array:
    """Qronos of one (N0, N1) matrix from G = X~ᵀX~ and H = X~ᵀX (N0, N0)."""
    if act_order:
        order = jnp.argsort(-jnp.diagonal(gram), stable=True)
        w, gram, cross = w[order], gram[order][:, order], cross[order][:, order]
        alphabet = hessian.input_alphabet(alphabet, order, w)
    diag = jnp.diagonal(gram)
    dead = diag <= 0
    # Dead inputs get 1 on their diagonal (they are uncoupled, so any positive value works),
    # which keeps M positive definite even when G = 0 and λ = 0.
    base = gram + jnp.diag(dead.astype(gram.dtype))
    lam, r = hessian.damped_factor(base, damping * largest_eigenvalue(gram))

    # b = (H + λI)w; a dead input's zero target makes its auxiliary weight 0, so q_t = Q(0).
    b = jnp.matmul(cross, w, precision=_HIGHEST) + lam * w
    b = jnp.where(dead[:, None] & ~jnp.isnan(b), 0.0, b)

    # Steps 2..N0 (shape the future): the nearest-plane recursion on M = RRᵀ.
    targets = jnp.diagonal(r)[:, None] * jax.scipy.linalg.solve_triangular(r, b, lower=False)
    coupling = hessian.nearest_plane_coupling(r)

    # Step 1 (correct the past): hold the later inputs at w, fit input 1 to Xw. With S_11 = 1 and
    # T_1 this argument, the recursion rounds it as it is, then carries q_1 into the later inputs.
    later_sum = jnp.matmul(gram[0], w, precision=_HIGHEST) - diag[0] * w[0]
    numerator = b[0] - later_sum  # 0 for a dead input (NaN for NaN weights)
    argument = jnp.where(dead[0], numerator, numerator / jnp.where(dead[0], 1, diag[0] + lam))
    targets = targets.at[0].set(argument)
    coupling = coupling.at[0, 0].set(1.0)
    q = gpfq_from_targets(w, targets, coupling, alphabet, block_size=block_size, dead_tol=0.0)
    return jnp.zeros_like(q).at[order].set(q) if act_order else q


@dataclasses.dataclass(frozen=True, kw_only=True)
class Qronos(QuantizationMethod):
    """Qronos (Zhang, Zhang, Colbert & Saab, 2026): matches XW, correcting then diffusing.

    Attributes:
      damping: α; the least-squares steps are damped by λ = α·||X~ᵀX~||₂ (Brevitas's `alpha`).
      block_size: inputs per lazy-batch block (a speed knob only).
      act_order: visit the inputs by decreasing G_tt = ||X~_t||², not in layer order.
    """

    name: ClassVar[str] = "qronos"
    damping: float = DEFAULT_DAMPING
    block_size: int = DEFAULT_BLOCK_SIZE
    act_order: bool = False

    def __post_init__(self):
        if not self.damping > 0:
            raise ValueError(f"damping must be positive, got {self.damping}")
        check_positive_int("block_size", self.block_size)

    def numerical_failure(self, dtype: jnp.dtype) -> str:
        return hessian.failure_message(dtype, self.damping, "||G||₂")

    def quantize_matrix(self, w: jax.Array, stats: GramStats, alphabet: AnyAlphabet) -> jax.Array:
        return _qronos_matrix(w, stats.gram, stats.cross, alphabet, **dataclasses.asdict(self))


qronos_from_stats = functional_form(Qronos)
