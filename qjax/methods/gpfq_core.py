"""GPFQ's pure core: the greedy scans and the `GPFQ` method (Lybrand & Saab).

For a layer with weights W (N0 inputs × N1 neurons, Flax layout), float-network inputs X (m × N0)
and quantized-network inputs X~ (m × N0), each neuron w (a column of W) walks its inputs
t = 1..N0 with the residual u_0 = 0,

    q_t = Q(<X~_t, u_{t-1} + w_t X_t> / ||X~_t||²),      u_t = u_{t-1} + w_t X_t - q_t X~_t,

where Q rounds to the nearest letter of the alphabet A. Two equivalent forms are implemented:

* "residual": the paper's form, carrying u_t (m numbers per neuron) through a `jax.lax.scan`.
* "gram" (the method `GPFQ`): expanding u_{t-1} gives

      <X~_t, u_{t-1} + w_t X_t> = Σ_{s≤t} H_ts w_s - Σ_{s<t} G_ts q_s,  G = X~ᵀX~, H = X~ᵀX,

  so the greedy choices only need the N0×N0 statistics G and H, which are accumulated over
  calibration batches (`qjax.stats`); memory does not grow with m. The sums over earlier
  inputs are applied in blocks, as GPTQ's "lazy batch" updates: the inputs are split in halves,
  and once the first half is quantized its whole effect on the second half, H₂₁W₁ − G₂₁Q₁, is two
  matrix products (one, G₂₁(W₁ − Q₁), when H = G); runs of a few blocks of B inputs are left to a
  scan that updates B numbers per step. Summed over the levels, the products cover the lower
  triangles of H and G once — the work of one (N0 × N0)·(N0 × N1) product — and the scan never
  re-reads the whole weight matrix. GPTQ and Qronos run the same scan (`greedy`) on their
  nearest-plane coupling (`qjax.methods.hessian`).

Everything here is pure and traceable; `qjax.methods.gpfq` adds the mesh (neurons split over
devices) and the layer-level drivers (`gpfq_layer`, `gpfq_conv`) that compute the statistics.

Dead inputs. When ||X~_t||² is numerically zero (G_tt ≤ dead_tol·max_s G_ss; common after ReLU)
the choice of q_t does not change the residual. We then set the rounding argument to 0:
q_t = Q(0), the letter nearest zero, ties to the lower letter: 0 for alphabets containing 0, -δ/2
for even alphabets {±δ/2, ±3δ/2, ...} of any size. (The paper's reference code sets q_t = 0 even
when 0 is not a letter; qjax keeps every q_t a letter, so that the codes can be exported.)
A NaN weight gives a NaN code (never a letter).

Group-wise alphabets (one step per g consecutive inputs per neuron) work in both forms: input t
is rounded with the step of its group, `alphabet.for_input(t)`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar

import jax
import jax.numpy as jnp

from qjax import _mesh
from qjax.alphabets import Alphabet, AnyAlphabet
from qjax.checks import check_positive_int
from qjax.methods.base import QuantizationMethod, nearest_letter
from qjax.stats import GramStats

__all__ = ["GPFQ", "gpfq_from_targets", "greedy"]

DEFAULT_BLOCK_SIZE = 64
DEFAULT_DEAD_TOL = 1e-12
# Inputs are split in halves (the cross terms become matrix products) down to runs of at most
# LEAF_BLOCKS blocks, which the blocked scan handles.
LEAF_BLOCKS = 4
_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------------------------
# The greedy scan of a run of inputs, all neurons at once (rows of N1 numbers, contiguous).


def _leaf_scan(
    target: jax.Array,
    gram: jax.Array,
    dead: jax.Array,
    alphabet: AnyAlphabet,
    block_size: int,
    offset: int,
) -> jax.Array:
    """The greedy choices of a run of n inputs (n a multiple of block_size), all neurons at once.

    Input t is rounded from (T_t − Σ_{s<t} G_ts q_s) / G_tt. A block of B inputs first takes the
    sum over the earlier blocks as one product, then a scan handles its inputs one by one, each
    step reading the block's B × N1 codes so far (rows of N1 contiguous numbers: the layout of
    W, so no step gathers a strided column).

    Args:
      target: T, shape (n, N1).
      gram: G (or a method's coupling matrix), symmetric (n, n).
      dead: (n,) bool, inputs whose ||X~_t|| is numerically zero.
      alphabet: the alphabet, scalar or (N1,) (per neuron) or group-wise parameters.
      block_size: B.
      offset: the index in the whole layer of this run's first input (for group-wise alphabets).

    Returns:
      Q, shape (n, N1), in target's dtype.
    """
    n = target.shape[0]
    diag = jnp.diagonal(gram)

    def block_step(b, q):
        start = b * block_size
        rows = jax.lax.dynamic_slice_in_dim(gram, start, block_size, axis=0)  # (B, n)
        block_gram = jax.lax.dynamic_slice_in_dim(rows, start, block_size, axis=1)  # (B, B)
        # T_t − Σ_{s<start} G_ts q_s for the block's t: q is still zero from `start` on.
        block_target = jax.lax.dynamic_slice_in_dim(target, start, block_size, axis=0)
        block_target = block_target - jnp.matmul(rows, q, precision=_HIGHEST)

        def input_step(q_block, j):
            t = start + j
            # Σ over the block's earlier inputs (q_block is zero from row j on).
            within = jnp.matmul(block_gram[j], q_block, precision=_HIGHEST)
            argument = _argument(block_target[j] - within, diag[t], dead[t])
            q_t = nearest_letter(alphabet.for_input(offset + t), argument)
            return jax.lax.dynamic_update_index_in_dim(q_block, q_t, j, axis=0), None

        q_block, _ = jax.lax.scan(input_step, jnp.zeros_like(block_target), jnp.arange(block_size))
        return jax.lax.dynamic_update_slice_in_dim(q, q_block, start, axis=0)

    return jax.lax.fori_loop(0, n // block_size, block_step, jnp.zeros_like(target))


def _neuron_residual(
    w: jax.Array, x: jax.Array, x_tilde: jax.Array, dead: jax.Array, alphabet: AnyAlphabet
) -> jax.Array:
    """GPFQ for one neuron in the paper's residual form, u_t carried through the scan."""
    norms_sq = jnp.sum(x_tilde * x_tilde, axis=0)

    def input_step(u, inputs):
        t, w_t, x_t, x_tilde_t, norm_sq_t, dead_t = inputs
        v = u + w_t * x_t
        argument = _argument(jnp.dot(x_tilde_t, v, precision=_HIGHEST), norm_sq_t, dead_t)
        q_t = nearest_letter(alphabet.for_input(t), argument)
        return v - q_t * x_tilde_t, q_t

    u0 = jnp.zeros_like(x[:, 0], w.dtype)  # varies as x does (inside shard_map)
    steps = (jnp.arange(w.shape[0]), w, x.T, x_tilde.T, norms_sq, dead)
    _, q = jax.lax.scan(input_step, u0, steps)
    return q


def _per_neuron(alphabet: AnyAlphabet, n1: int) -> AnyAlphabet:
    """The alphabet with a leading neuron axis of length n1 on every leaf (for vmap)."""
    if isinstance(alphabet, Alphabet):
        return Alphabet(jnp.broadcast_to(alphabet.letters, (n1, alphabet.size)))
    if alphabet.group_size is not None:  # step and zero point (G, N1) -> (N1, G)
        return jax.tree.map(lambda leaf: jnp.swapaxes(jnp.asarray(leaf), 0, 1), alphabet)
    return jax.tree.map(lambda leaf: jnp.broadcast_to(leaf, (n1,)), alphabet)


def _dead_inputs(diag: jax.Array, dead_tol: float) -> jax.Array:
    return diag <= dead_tol * jnp.max(diag)


def _argument(numerator: jax.Array, norm_sq: jax.Array, dead: jax.Array) -> jax.Array:
    """The rounding argument numerator / ||X~_t||², or 0 for a dead input (NaN for a NaN
    numerator: NaN weights stay NaN)."""
    return jnp.where(dead, 0 * numerator, numerator / jnp.where(dead, 1, norm_sq))


def _greedy_segment(
    w: jax.Array,
    rhs: jax.Array,
    gram: jax.Array,
    cross: jax.Array | None,
    dead: jax.Array,
    alphabet: AnyAlphabet,
    *,
    block_size: int,
    leaf_size: int,
    difference: bool,
    offset: int = 0,
) -> jax.Array:
    """The greedy choices for a run of consecutive inputs S, split in halves down to leaves.

    For t in S the rounding argument, times G_tt, is
    rhs_t + Σ_{s∈S, s≤t} H_ts w_s − Σ_{s∈S, s<t} G_ts q_s, where `rhs` already holds the
    contributions of the inputs before S. After the first half S1 is quantized, its contribution
    to the second half, H[S2, S1]·W[S1] − G[S2, S1]·Q[S1], is two matrix products; summed over the
    levels these products cover the lower triangles of H and G once, i.e. the work of one
    (N0 × N0)·(N0 × N1) product. A leaf (≤ leaf_size inputs) runs the blocked scan. With
    `difference` (H = G: GPFQ with X~ = X, or GPTQ's nearest-plane form), the two products are
    one, G[S2, S1]·(W[S1] − Q[S1]).

    Args:
      w: weights W[S], shape (n, N1), n a multiple of block_size, in G's dtype.
      rhs: shape (n, N1).
      gram: G[S, S].
      cross: H[S, S], or None if `rhs` already holds all of Σ_{s≤t} H_ts w_s (or H = G, with
        `difference`).
      dead: (n,) bool.
      alphabet: the alphabet (scalar, (N1,) or group-wise parameters).
      block_size: B.
      leaf_size: runs of at most this many inputs go to the scan.
      difference: H = G (`cross` is None): the targets are Σ_{s≤t} G_ts w_s.
      offset: the index of S's first input in the layer.

    Returns:
      Q[S], shape (n, N1).
    """
    n = w.shape[0]
    if n <= leaf_size:
        own = gram if difference else cross
        if own is not None:
            rhs = rhs + jnp.matmul(jnp.tril(own), w, precision=_HIGHEST)
        return _leaf_scan(rhs, gram, dead, alphabet, block_size, offset)
    half = math.ceil(n / 2 / block_size) * block_size
    first, second = slice(None, half), slice(half, None)
    recurse = functools.partial(
        _greedy_segment, block_size=block_size, leaf_size=leaf_size, difference=difference
    )

    def part(matrix, rows, cols):
        return None if matrix is None else matrix[rows, cols]

    q_first = recurse(
        w[first],
        rhs[first],
        gram[first, first],
        part(cross, first, first),
        dead[first],
        alphabet,
        offset=offset,
    )
    if difference:
        update = jnp.matmul(gram[second, first], w[first] - q_first, precision=_HIGHEST)
    else:
        update = -jnp.matmul(gram[second, first], q_first, precision=_HIGHEST)
    if cross is not None:
        update = update + jnp.matmul(cross[second, first], w[first], precision=_HIGHEST)
    q_second = recurse(
        w[second],
        rhs[second] + update,
        gram[second, second],
        part(cross, second, second),
        dead[second],
        alphabet,
        offset=offset + half,
    )
    return jnp.concatenate([q_first, q_second])


def greedy(
    w: jax.Array,
    rhs: jax.Array,
    gram: jax.Array,
    cross: jax.Array | None,
    alphabet: AnyAlphabet,
    *,
    block_size: int,
    dead_tol: float,
    difference: bool = False,
) -> jax.Array:
    """The greedy scan over all inputs, for GPFQ, GPTQ and Qronos (neurons in parallel).

    The rounding argument of input t is (rhs_t + Σ_{s≤t} H_ts w_s − Σ_{s<t} G_ts q_s) / G_tt,
    Q(0) for a dead input (G_tt ≤ dead_tol·max G_ss). N0 is padded to a multiple of the block
    size with dead, uncoupled inputs.

    Args:
      w: weights, shape (N0, N1).
      rhs: targets already known, shape (N0, N1) (zeros, or all of Σ_{s≤t} H_ts w_s when
        `cross` is None and not `difference`).
      gram: G (or a method's coupling matrix), symmetric (N0, N0).
      cross: H, or None.
      alphabet: the alphabet A, scalar or (N1,) (per neuron) or group-wise parameters.
      block_size: B, inputs per block of the scan.
      dead_tol: the relative threshold of dead inputs.
      difference: H = G (`cross` None): the products between halves are G₂₁(W₁ − Q₁).

    Returns:
      Q, shape (N0, N1), dtype of w.
    """
    n0 = w.shape[0]
    block = min(block_size, n0)
    padded = math.ceil(n0 / block) * block
    pad = padded - n0
    dead = _dead_inputs(jnp.diagonal(gram), dead_tol)
    # Padded inputs are dead and uncorrelated with every other input, so they change nothing.
    gram = jnp.pad(gram, ((0, pad), (0, pad)))
    cross = None if cross is None else jnp.pad(cross, ((0, pad), (0, pad)))
    rhs = jnp.pad(rhs, ((0, pad), (0, 0)))
    dead = jnp.pad(dead, (0, pad), constant_values=True)
    w_padded = jnp.pad(w.astype(gram.dtype), ((0, pad), (0, 0)))
    q = _greedy_segment(
        w_padded,
        rhs,
        gram,
        cross,
        dead,
        alphabet,
        block_size=block,
        leaf_size=LEAF_BLOCKS * block,
        difference=difference,
    )
    return q[:n0].astype(w.dtype)


def gpfq_from_targets(
    w: jax.Array,
    target: jax.Array,
    gram: jax.Array,
    alphabet: AnyAlphabet,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    dead_tol: float = DEFAULT_DEAD_TOL,
) -> jax.Array:
    """The greedy scan of the "gram" form, from G and the targets Σ_{s≤t} H_ts w_s.

    Neurons are independent given G and their targets, so a caller may split the columns of
    `w`, `target` and the alphabet across devices and call this on each part (GPFQ on
    per-device statistics does, inside `jax.shard_map`). Not jitted: it traces inside the caller.

    Args:
      w: weights, shape (N0, N1) (their values enter only through `target`).
      target: T = tril(H)·W, T_tn = Σ_{s≤t} H_ts w_sn, shape (N0, N1), in G's dtype.
      gram: G = X~ᵀX~, shape (N0, N0).
      alphabet: the alphabet A, scalar or (N1,) (per neuron) parameters.
      block_size: B, the number of inputs per lazy-batch block.
      dead_tol: inputs with G_tt <= dead_tol·max_s G_ss are dead.

    Returns:
      q, shape (N0, N1), dtype of w.
    """
    return greedy(w, target, gram, None, alphabet, block_size=block_size, dead_tol=dead_tol)


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPFQ(QuantizationMethod):
    """GPFQ (Lybrand & Saab) in the "gram" form: matches the float network's output XW.

    Attributes:
      block_size: B, inputs per lazy-batch block of the scan (a speed knob only: the codes do
        not depend on it).
      dead_tol: inputs with G_tt <= dead_tol·max_s G_ss are dead: q_t = Q(0).
    """

    name: ClassVar[str] = "gpfq"
    block_size: int = DEFAULT_BLOCK_SIZE
    dead_tol: float = DEFAULT_DEAD_TOL

    def __post_init__(self):
        check_positive_int("block_size", self.block_size)
        if not 0 <= self.dead_tol < 1:
            raise ValueError(f"dead_tol must be in [0, 1), got {self.dead_tol}")

    def quantize_matrix(self, w: jax.Array, stats: GramStats, alphabet: AnyAlphabet) -> jax.Array:
        # The targets Σ_{s≤t} H_ts w_s are built on the way, from the lower triangle of H only.
        rhs = jnp.zeros(w.shape, stats.gram.dtype)
        return greedy(
            w,
            rhs,
            stats.gram,
            stats.cross,
            alphabet,
            block_size=self.block_size,
            dead_tol=self.dead_tol,
        )

    def quantize_per_device(
        self, w: jax.Array, stats: GramStats, alphabet: AnyAlphabet
    ) -> jax.Array:
        """GPFQ with its neurons split over the statistics' mesh; the codes of the combined run.

        G is added up by a psum and replicated (every neuron's scan reads all of it), H by a
        reduce-scatter that leaves each device a block of its columns; W, the targets and the
        codes are split by neuron (`qjax.methods.gpfq._gpfq_on_mesh`). Traced statistics do not
        know their mesh: they are combined, as for any method.
        """
        mesh = _mesh.mesh_of(stats.gram)
        if mesh is None:
            return super().quantize_per_device(w, stats, alphabet)
        from qjax.methods.gpfq import _gpfq_on_mesh  # gpfq imports this module

        return _gpfq_on_mesh(
            w, stats, alphabet, mesh=mesh, block_size=self.block_size, dead_tol=self.dead_tol
        )


@functools.partial(jax.jit, static_argnames=("dead_tol",))
def gpfq_residual(
    w: jax.Array, x: jax.Array, x_tilde: jax.Array, alphabet: AnyAlphabet, *, dead_tol: float
) -> jax.Array:
    """GPFQ in the paper's residual form, u_t carried per neuron (memory m per neuron).

    Args:
      w: weights W, shape (N0, N1).
      x: X, shape (m, N0).
      x_tilde: X~, shape (m, N0).
      alphabet: the alphabet A, scalar, (N1,) (per neuron) or group-wise parameters.
      dead_tol: inputs with ||X~_t||² <= dead_tol·max_s ||X~_s||² are dead: q_t = Q(0).

    Returns:
      Q, shape (N0, N1).
    """
    dead = _dead_inputs(jnp.sum(x_tilde * x_tilde, axis=0), dead_tol)
    quantize = jax.vmap(_neuron_residual, in_axes=(1, None, None, None, 0), out_axes=1)
    return quantize(w, x, x_tilde, dead, _per_neuron(alphabet, w.shape[1]))
