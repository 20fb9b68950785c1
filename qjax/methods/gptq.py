"""GPTQ (Frantar et al., 2023), the second baseline, on the same statistics as GPFQ.

GPTQ quantizes a layer's inputs t = 1..N0 in order and, after each, spreads the rounding error
over the inputs not yet quantized through the inverse Hessian of ||X~(W - Q)||², H = X~ᵀX~ = G:
with U the upper Cholesky factor of H⁻¹ (H⁻¹ = UᵀU),

    q_t = Q(w_t),      e_t = (w_t - q_t) / U_tt,      w_s ← w_s - U_ts e_t   for s > t,

where w_t is row t of W (one weight per neuron; all neurons are handled at once). As in the
GPTQ paper, H is damped by `damping`·mean(diag H) and the updates are applied in "lazy batch"
blocks: a scan inside a block of B inputs, one matrix product for the inputs after it. With
`act_order`, the inputs are visited by decreasing H_tt (GPTQ's "act-order" heuristic); a
group-wise alphabet still gives input t the step of its own group.

GPTQ matches X~W (the quantized network's inputs through the float weights) while GPFQ matches
XW (the float network's output); both read G = X~ᵀX~ from the same `GramStats`.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from qjax.alphabets import AnyAlphabet
from qjax.checks import check_positive_int
from qjax.methods.base import QuantizationMethod
from qjax.stats import GramStats

__all__ = ["GPTQ", "gptq_from_stats"]

DEFAULT_DAMPING = 0.01
DEFAULT_BLOCK_SIZE = 128
_HIGHEST = jax.lax.Precision.HIGHEST


def _inverse_hessian_factor(gram: jax.Array, damping: float) -> tuple[jax.Array, jax.Array]:
    """U (upper, H⁻¹ = UᵀU) of the damped Hessian; dead inputs (G_tt = 0) get H_tt = 1."""
    diag = jnp.diagonal(gram)
    dead = diag <= 0
    hessian = gram + jnp.diag(jnp.where(dead, 1.0, 0.0))
    mean_diag = jnp.mean(jnp.diagonal(hessian))
    hessian = hessian + damping * mean_diag * jnp.eye(gram.shape[0], dtype=gram.dtype)
    # H⁻¹ = LLᵀ (Cholesky), so U = Lᵀ is upper triangular with H⁻¹ = UᵀU.
    return jnp.linalg.cholesky(jnp.linalg.inv(hessian)).T, dead


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
    n0 = w.shape[0]
    order = jnp.argsort(-jnp.diagonal(gram), stable=True) if act_order else jnp.arange(n0)
    w, gram = w[order], gram[order][:, order]
    u, dead = _inverse_hessian_factor(gram, damping)
    w = jnp.where(dead[:, None], 0.0, w)
    num_blocks = -(-n0 // block_size)
    pad = num_blocks * block_size - n0
    # Padding inputs have U = identity there and no coupling to the real inputs.
    w = jnp.pad(w, ((0, pad), (0, 0)))
    u = jnp.pad(u, ((0, pad), (0, pad))) + jnp.diag(jnp.arange(n0 + pad) >= n0).astype(u.dtype)
    inputs = jnp.pad(order, (0, pad), mode="edge")  # each position's input index in the layer

    def input_step(w_block, step):
        u_row, u_diag, j, t = step
        q_j = alphabet.for_input(t).project(w_block[j])
        e_j = (w_block[j] - q_j) / u_diag
        return w_block - jnp.outer(u_row, e_j), (q_j, e_j)

    def block_step(b, carry):
        w, q = carry
        start = b * block_size
        w_block = jax.lax.dynamic_slice_in_dim(w, start, block_size, axis=0)
        u_rows = jax.lax.dynamic_slice_in_dim(u, start, block_size, axis=0)  # (B, N0 + pad)
        u_block = jax.lax.dynamic_slice_in_dim(u_rows, start, block_size, axis=1)
        block_inputs = jax.lax.dynamic_slice_in_dim(inputs, start, block_size)
        steps = (u_block, jnp.diagonal(u_block), jnp.arange(block_size), block_inputs)
        _, (q_block, errors) = jax.lax.scan(input_step, w_block, steps)
        # Later inputs absorb the block's errors: w_s -= Σ_t U_ts e_t (U is upper triangular, so
        # earlier rows are untouched and the block's own rows are finished already).
        w = w - jnp.matmul(u_rows.T, errors, precision=_HIGHEST)
        q = jax.lax.dynamic_update_slice_in_dim(q, q_block, start, axis=0)
        return w, q

    _, q = jax.lax.fori_loop(0, num_blocks, block_step, (w, jnp.zeros_like(w)))
    return jnp.zeros_like(q[:n0]).at[order].set(q[:n0])


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPTQ(QuantizationMethod):
    """GPTQ (Frantar et al., 2023): matches X~W, spreading each rounding error over later inputs.

    Attributes:
      damping: λ, added as λ·mean(diag G) to the diagonal of G (GPTQ's "percdamp").
      block_size: inputs per lazy-batch block (a speed knob only).
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

    def quantize_matrix(self, w: jax.Array, stats: GramStats, alphabet: AnyAlphabet) -> jax.Array:
        return _gptq_matrix(
            w,
            stats.gram,
            alphabet,
            damping=self.damping,
            block_size=self.block_size,
            act_order=self.act_order,
        )


def gptq_from_stats(
    w: ArrayLike,
    stats: GramStats,
    alphabet: AnyAlphabet,
    *,
    damping: float = DEFAULT_DAMPING,
    block_size: int = DEFAULT_BLOCK_SIZE,
    act_order: bool = False,
) -> jax.Array:
    """GPTQ of one layer from the Gram matrix G = X~ᵀX~ of its calibration inputs.

    The functional form of `GPTQ(damping=..., block_size=..., act_order=...).quantize(...)`.

    Args:
      w: weights, shape batch_shape + (N0, N1) (Flax layout, batch_shape as in `stats`).
      stats: `GramStats` of the layer's inputs (only `gram` is used).
      alphabet: the alphabet A: per tensor, per neuron, or group-wise.
      damping: λ, added as λ·mean(diag G) to the diagonal of G (GPTQ's "percdamp").
      block_size: inputs per lazy-batch block (a speed knob only).
      act_order: visit inputs by decreasing G_tt.

    Returns:
      Q, same shape as w, every entry a letter of A.
    """
    method = GPTQ(damping=damping, block_size=block_size, act_order=act_order)
    return method.quantize(w, stats, alphabet)
