"""GPTQ (Frantar et al., 2023), the second baseline, on the same statistics as GPFQ.

GPTQ quantizes a layer's inputs t = 1..N0 in order and, after each, spreads the rounding error
over the inputs not yet quantized through the inverse Hessian of ||X~(W - Q)||², H = X~ᵀX~ = G:
with U the upper Cholesky factor of H⁻¹ (H⁻¹ = UᵀU),

    q_t = Q(w_t),      e_t = (w_t - q_t) / U_tt,      w_s ← w_s - U_ts e_t   for s > t,

where w_t is row t of W (one weight per neuron; all neurons are handled at once). As in the
GPTQ paper, H is damped by λ = `damping`·mean(diag H). With `act_order`, the inputs are visited
by decreasing H_tt (GPTQ's "act-order" heuristic); a group-wise alphabet still gives input t the
step (and zero point) of its own group.

qjax computes the same codes from one factorization. U = R⁻¹ for the reversed Cholesky factor
H = RRᵀ (R upper triangular), and the updated weight input t is rounded from is

    w^(t-1)_t = w_t + Σ_{s<t} R_st (w_s - q_s) / R_tt,

the nearest-plane recursion of `qjax.methods.hessian` with targets Σ_{s≤t} S_ts w_s. It runs in
GPFQ's blocked scan (`block_size` inputs per block, matrix products of S with W - Q between
blocks): a Cholesky factorization and the work of one N0²·N1 product, where GPTQ's reference
implementation computes H⁻¹, factors it, and multiplies by U.

Damping escalation. Collinear or dead inputs (or fewer rows than inputs) make G singular, and in
float32 G + λI may then fail to factor (JAX returns NaN rather than raising). λ is raised tenfold
while it does (`qjax.methods.hessian.MAX_DAMPING_RAISES` times at most); if G + λI still cannot
be factored, `quantize` raises an error saying the damping tried and what to do. Dead inputs
(G_tt = 0) get H_tt = 1 (they are uncoupled) and q_t = Q(0).

GPTQ matches X~W (the quantized network's inputs through the float weights) while GPFQ matches
XW (the float network's output); both read G = X~ᵀX~ from the same `GramStats`.
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
from qjax.methods.gpfq_core import greedy
from qjax.stats import GramStats

__all__ = ["GPTQ", "gptq_from_stats"]

DEFAULT_DAMPING = 0.01
DEFAULT_BLOCK_SIZE = 128


def _gptq_matrix(
    w: jax.Array,
    gram: jax.Array,
    alphabet: AnyAlphabet,
    *,
    damping: float,
    block_size: int,
    act_order: bool,
) -> jax.Array:
    """GPTQ of one (N0, N1) matrix with Gram matrix (N0, N0)."""
    if act_order:
        order = jnp.argsort(-jnp.diagonal(gram), stable=True)
        w, gram = w[order], gram[order][:, order]
        alphabet = hessian.input_alphabet(alphabet, order, w)
    dead = jnp.diagonal(gram) <= 0
    base = gram + jnp.diag(dead.astype(gram.dtype))
    _, r = hessian.damped_factor(base, damping * jnp.mean(jnp.diagonal(base)))
    # A dead input's weight is 0 (NaN stays NaN), so q_t = Q(0) there.
    w = jnp.where(dead[:, None] & ~jnp.isnan(w), 0.0, w)
    coupling = hessian.nearest_plane_coupling(r)
    q = greedy(
        w,
        jnp.zeros_like(w),
        coupling,
        None,
        alphabet,
        block_size=block_size,
        dead_tol=0.0,
        difference=True,
    )
    return jnp.zeros_like(q).at[order].set(q) if act_order else q


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPTQ(QuantizationMethod):
    """GPTQ (Frantar et al., 2023): matches X~W, spreading each rounding error over later inputs.

    Attributes:
      damping: λ, added as λ·mean(diag G) to the diagonal of G (GPTQ's "percdamp").
      block_size: inputs per block of the scan (a speed knob only).
      act_order: visit the inputs by decreasing G_tt (GPTQ's "act-order"), not in layer order.
    """

    name: ClassVar[str] = "gptq"
    uses_float_inputs: ClassVar[bool] = False
    damping: float = DEFAULT_DAMPING
    block_size: int = DEFAULT_BLOCK_SIZE
    act_order: bool = False

    def __post_init__(self):
        if not self.damping > 0:
            raise ValueError(f"damping must be positive, got {self.damping}")
        check_positive_int("block_size", self.block_size)

    def numerical_failure(self, dtype: jnp.dtype) -> str:
        return hessian.failure_message(dtype, self.damping, "mean(diag G)")

    def quantize_matrix(self, w: jax.Array, stats: GramStats, alphabet: AnyAlphabet) -> jax.Array:
        return _gptq_matrix(
            w,
            stats.gram,
            alphabet,
            damping=self.damping,
            block_size=self.block_size,
            act_order=self.act_order,
        )


gptq_from_stats = functional_form(GPTQ)
