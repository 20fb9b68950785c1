"""GPFQ: greedy path-following quantization of one layer (Lybrand & Saab).

For a layer with weights W (N0 inputs × N1 neurons, Flax layout), float-network inputs X (m × N0)
and quantized-network inputs X~ (m × N0), each neuron w (a column of W) walks its inputs
t = 1..N0 with the residual u_0 = 0,

    q_t = Q(<X~_t, u_{t-1} + w_t X_t> / ||X~_t||²),      u_t = u_{t-1} + w_t X_t - q_t X~_t,

where Q rounds to the nearest letter of the alphabet A. Two equivalent forms are implemented:

* "residual": the paper's form, carrying u_t (m numbers per neuron) through a `jax.lax.scan`.
* "gram" (default): expanding u_{t-1} gives

      <X~_t, u_{t-1} + w_t X_t> = Σ_{s≤t} H_ts w_s - Σ_{s<t} G_ts q_s,  G = X~ᵀX~, H = X~ᵀX,

  so the greedy choices only need the N0×N0 statistics G and H, which are accumulated over
  calibration batches (`gram_stats_update`); memory does not grow with m. The sums over earlier
  inputs are applied in blocks, as GPTQ's "lazy batch" updates: the inputs are split in halves,
  and once the first half is quantized its whole effect on the second half, H₂₁W₁ − G₂₁Q₁, is two
  matrix products; runs of a few blocks of B inputs are left to a scan that updates B numbers per
  step. Summed over the levels, the products cover the lower triangles of H and G once — the work
  of one (N0 × N0)·(N0 × N1) product — and the scan never re-reads the whole weight matrix.

Both are scans over inputs, vmapped across neurons; `gpfq_layer` and `gpfq_from_stats` are
jit-compiled.

Dead inputs. When ||X~_t||² is numerically zero (G_tt ≤ dead_tol·max_s G_ss; common after ReLU)
the choice of q_t does not change the residual. As in the paper's reference code we then set the
rounding argument to 0: q_t = Q(0), which is 0 for alphabets containing 0 (for binary {±δ}, the
tie rounds to -δ).
"""

from __future__ import annotations

import functools
import math
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from qjax.alphabets import Alphabet, AnyAlphabet, UniformAlphabet
from qjax.patches import ConvGeometry, conv_patches, kernel_to_matrix, matrix_to_kernel

__all__ = [
    "GramStats",
    "gpfq_conv",
    "gpfq_from_stats",
    "gpfq_from_targets",
    "gpfq_layer",
    "gram_stats",
    "gram_stats_init",
    "gram_stats_update",
    "msq",
    "relative_error",
]

DEFAULT_BLOCK_SIZE = 64
DEFAULT_DEAD_TOL = 1e-12
# Inputs are split in halves (the cross terms become matrix products) down to runs of at most
# LEAF_BLOCKS blocks, which the blocked scan handles.
LEAF_BLOCKS = 4
# gpfq_conv, "gram": patch rows per accumulation step when batch_size is not given. Each step
# extracts the patches of a few images and folds them into G and H in one compiled program, so the
# patch matrices (kernel-size times larger than the images) stay small and in cache.
DEFAULT_CONV_CHUNK_ROWS = 4096
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
    _check_positive_int("n0", n0)
    shape = (*batch_shape, n0, n0)
    return GramStats(
        gram=jnp.zeros(shape, dtype),
        cross=jnp.zeros(shape, dtype),
        count=jnp.zeros((), jnp.int32),
        float_gram=jnp.zeros(shape, dtype) if track_error else None,
    )


def _gram_stats_update(stats: GramStats, x: jax.Array, x_tilde: jax.Array) -> GramStats:
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


_gram_stats_update_jit = jax.jit(_gram_stats_update, donate_argnums=0)


def gram_stats_update(stats: GramStats, x: ArrayLike, x_tilde: ArrayLike) -> GramStats:
    """Adds one calibration batch to the statistics (streaming accumulation).

    Args:
      stats: the running `GramStats` (their buffers are donated: do not reuse `stats`).
      x: the batch's inputs to the layer in the float network, shape batch_shape + (m, N0).
      x_tilde: the same batch's inputs in the partly quantized network, same shape.

    Returns:
      The updated `GramStats`.
    """
    x = _check_matrix("x", x, batch_ndim=stats.gram.ndim - 2)
    x_tilde = _check_matrix("x_tilde", x_tilde, batch_ndim=stats.gram.ndim - 2)
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
    return _gram_stats_update_jit(stats, x, x_tilde)


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
    x = _check_matrix("x", x)
    x_tilde = jnp.asarray(x_tilde)  # once, not per batch
    dtype = jnp.result_type(x.dtype, jnp.float32)  # float64 inputs keep float64 (with x64)
    stats = gram_stats_init(
        x.shape[-1], batch_shape=x.shape[:-2], track_error=track_error, dtype=dtype
    )
    m = x.shape[-2]
    if batch_size is not None:
        _check_positive_int("batch_size", batch_size)
    step = m if batch_size is None else batch_size
    for start in range(0, m, step):
        rows = slice(start, start + step)
        stats = gram_stats_update(stats, x[..., rows, :], x_tilde[..., rows, :])
    return stats


def msq(w: ArrayLike, alphabet: AnyAlphabet) -> jax.Array:
    """Memoryless scalar quantization: each weight rounded to its nearest letter (the baseline).

    Args:
      w: weights, output neurons on the last axis (per-neuron alphabets broadcast along it).
      alphabet: the alphabet A.

    Returns:
      Q(w), same shape and dtype as w.
    """
    w = jnp.asarray(w)
    _check_finite("w", w)
    return alphabet.project(w)


# ----------------------------------------------------------------------------------------------
# The greedy scan, for one neuron; vmapped across neurons below.


def _neuron_gram(
    w: jax.Array,
    target: jax.Array,
    gram: jax.Array,
    dead: jax.Array,
    alphabet: AnyAlphabet,
    block_size: int,
) -> jax.Array:
    """GPFQ for one neuron from G (N0p × N0p, N0p a multiple of block_size).

    Args:
      w: the neuron's weights (N0p,) (used only for its dtype).
      target: Σ_{s≤t} H_ts w_s for each t, shape (N0p,).
      gram: G = X~ᵀX~.
      dead: (N0p,) bool, inputs whose ||X~_t|| is numerically zero.
      alphabet: this neuron's alphabet.
      block_size: B.

    Returns:
      q, shape (N0p,).
    """
    n0 = w.shape[0]
    diag = jnp.diagonal(gram)

    def block_step(b, q):
        start = b * block_size
        rows = jax.lax.dynamic_slice_in_dim(gram, start, block_size, axis=0)  # (B, N0p)
        block_gram = jax.lax.dynamic_slice_in_dim(rows, start, block_size, axis=1)  # (B, B)
        # Σ_{s<start} G_ts q_s for the block's t: q is still zero from `start` on.
        earlier = jnp.matmul(rows, q, precision=_HIGHEST)

        def input_step(correction, j):
            t = start + j
            argument = (target[t] - correction[j]) / diag[t]
            q_t = alphabet.project(jnp.where(dead[t], jnp.zeros_like(argument), argument))
            # G is symmetric: row j is column j, and rows are contiguous.
            return correction + block_gram[j] * q_t, q_t

        _, q_block = jax.lax.scan(input_step, earlier, jnp.arange(block_size))
        return jax.lax.dynamic_update_slice_in_dim(q, q_block.astype(q.dtype), start, axis=0)

    return jax.lax.fori_loop(0, n0 // block_size, block_step, jnp.zeros_like(w))


def _neuron_residual(
    w: jax.Array, x: jax.Array, x_tilde: jax.Array, dead: jax.Array, alphabet: AnyAlphabet
) -> jax.Array:
    """GPFQ for one neuron in the paper's residual form, u_t carried through the scan."""
    norms_sq = jnp.sum(x_tilde * x_tilde, axis=0)

    def input_step(u, inputs):
        w_t, x_t, x_tilde_t, norm_sq_t, dead_t = inputs
        v = u + w_t * x_t
        argument = jnp.dot(x_tilde_t, v, precision=_HIGHEST) / norm_sq_t
        q_t = alphabet.project(jnp.where(dead_t, jnp.zeros_like(argument), argument))
        return v - q_t * x_tilde_t, q_t

    u0 = jnp.zeros(x.shape[0], w.dtype)
    _, q = jax.lax.scan(input_step, u0, (w, x.T, x_tilde.T, norms_sq, dead))
    return q


def _per_neuron(alphabet: AnyAlphabet, n1: int) -> AnyAlphabet:
    """The alphabet with a leading neuron axis of length n1 on every leaf (for vmap)."""
    if isinstance(alphabet, Alphabet):
        return Alphabet(jnp.broadcast_to(alphabet.letters, (n1, alphabet.size)))
    return jax.tree.map(lambda leaf: jnp.broadcast_to(leaf, (n1,)), alphabet)


def _dead_inputs(diag: jax.Array, dead_tol: float) -> jax.Array:
    return diag <= dead_tol * jnp.max(diag)


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
) -> jax.Array:
    """The greedy choices for a run of consecutive inputs S, split in halves down to leaves.

    For t in S the rounding argument, times G_tt, is
    rhs_t + Σ_{s∈S, s≤t} H_ts w_s − Σ_{s∈S, s<t} G_ts q_s, where `rhs` already holds the
    contributions of the inputs before S. After the first half S1 is quantized, its contribution
    to the second half, H[S2, S1]·W[S1] − G[S2, S1]·Q[S1], is two matrix products; summed over the
    levels these products cover the lower triangles of H and G once, i.e. the work of one
    (N0 × N0)·(N0 × N1) product. A leaf (≤ leaf_size inputs) runs the blocked scan.

    Args:
      w: weights W[S], shape (n, N1), n a multiple of block_size, in G's dtype.
      rhs: shape (n, N1).
      gram: G[S, S].
      cross: H[S, S], or None if `rhs` already holds all of Σ_{s≤t} H_ts w_s.
      dead: (n,) bool.
      alphabet: per-neuron alphabet (leading axis N1).
      block_size: B.
      leaf_size: runs of at most this many inputs go to the scan.

    Returns:
      Q[S], shape (n, N1).
    """
    n = w.shape[0]
    if n <= leaf_size:
        if cross is not None:
            rhs = rhs + jnp.matmul(jnp.tril(cross), w, precision=_HIGHEST)
        quantize = jax.vmap(
            functools.partial(_neuron_gram, block_size=block_size),
            in_axes=(1, 1, None, None, 0),
            out_axes=1,
        )
        return quantize(w, rhs, gram, dead, alphabet)
    half = math.ceil(n / 2 / block_size) * block_size
    first, second = slice(None, half), slice(half, None)
    recurse = functools.partial(_greedy_segment, block_size=block_size, leaf_size=leaf_size)

    def part(matrix, rows, cols):
        return None if matrix is None else matrix[rows, cols]

    q_first = recurse(
        w[first], rhs[first], gram[first, first], part(cross, first, first), dead[first], alphabet
    )
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
    )
    return jnp.concatenate([q_first, q_second])


def _greedy(
    w: jax.Array,
    rhs: jax.Array,
    gram: jax.Array,
    cross: jax.Array | None,
    alphabet: AnyAlphabet,
    *,
    block_size: int,
    dead_tol: float,
) -> jax.Array:
    """Pads N0 to a multiple of the block size and runs `_greedy_segment` on all inputs."""
    n0, n1 = w.shape
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
        _per_neuron(alphabet, n1),
        block_size=block,
        leaf_size=LEAF_BLOCKS * block,
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
    `w`, `target` and the alphabet across devices and call this on each part
    (`qjax.sharding` does, inside `jax.shard_map`). Not jitted: it traces inside the caller.

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
    return _greedy(w, target, gram, None, alphabet, block_size=block_size, dead_tol=dead_tol)


@functools.partial(jax.jit, static_argnames=("block_size", "dead_tol"))
def _gpfq_gram(
    w: jax.Array,
    gram: jax.Array,
    cross: jax.Array,
    alphabet: AnyAlphabet,
    *,
    block_size: int,
    dead_tol: float,
) -> jax.Array:
    # The targets Σ_{s≤t} H_ts w_s are built on the way, from the lower triangle of H only.
    rhs = jnp.zeros(w.shape, gram.dtype)
    return _greedy(w, rhs, gram, cross, alphabet, block_size=block_size, dead_tol=dead_tol)


@functools.partial(jax.jit, static_argnames=("dead_tol",))
def _gpfq_residual(
    w: jax.Array, x: jax.Array, x_tilde: jax.Array, alphabet: AnyAlphabet, *, dead_tol: float
) -> jax.Array:
    dead = _dead_inputs(jnp.sum(x_tilde * x_tilde, axis=0), dead_tol)
    quantize = jax.vmap(_neuron_residual, in_axes=(1, None, None, None, 0), out_axes=1)
    return quantize(w, x, x_tilde, dead, _per_neuron(alphabet, w.shape[1]))


def gpfq_from_stats(
    w: ArrayLike,
    stats: GramStats,
    alphabet: AnyAlphabet,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    dead_tol: float = DEFAULT_DEAD_TOL,
) -> jax.Array:
    """GPFQ of one layer from accumulated statistics G = X~ᵀX~ and H = X~ᵀX.

    Args:
      w: weights, shape batch_shape + (N0, N1) (batch_shape as in `stats`, e.g. conv groups).
      stats: `GramStats` of the layer's calibration inputs.
      alphabet: the alphabet A; its parameters are scalars or (N1,) arrays (per neuron), or carry
        batch_shape + (N1,) for batched layers.
      block_size: B, the number of inputs handled per lazy-batch block (a speed knob only).
      dead_tol: inputs with G_tt <= dead_tol·max_s G_ss are dead (see the module docstring).

    Returns:
      q, the quantized weights, same shape and dtype as w, every entry a letter of A.
    """
    w = _check_matrix("w", w, batch_ndim=stats.gram.ndim - 2)
    _check_finite("w", w)
    n0 = w.shape[-2]
    if stats.gram.shape[-2:] != (n0, n0) or stats.gram.shape[:-2] != w.shape[:-2]:
        raise ValueError(
            f"w has shape {w.shape} (batch_shape + (N0, N1)) but the statistics are for "
            f"batch_shape + (N0, N0) = {stats.gram.shape}"
        )
    _check_finite("stats.gram", stats.gram)
    _check_finite("stats.cross", stats.cross)
    _check_alphabet(alphabet)
    _check_positive_int("block_size", block_size)
    quantize = functools.partial(_gpfq_gram, block_size=block_size, dead_tol=dead_tol)
    for _ in range(w.ndim - 2):
        quantize = jax.vmap(quantize, in_axes=(0, 0, 0, _alphabet_batch_axes(alphabet, w)))
    return quantize(w, stats.gram, stats.cross, alphabet)


def gpfq_layer(
    w: ArrayLike,
    x: ArrayLike,
    x_tilde: ArrayLike,
    alphabet: AnyAlphabet,
    *,
    method: Literal["gram", "residual"] = "gram",
    batch_size: int | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    dead_tol: float = DEFAULT_DEAD_TOL,
) -> jax.Array:
    """GPFQ of one dense layer.

    Args:
      w: weights W, shape (N0, N1) (Flax `Dense` kernel layout: inputs × neurons).
      x: X, the layer's inputs in the float network, shape (m, N0).
      x_tilde: X~, the layer's inputs in the network whose earlier layers are quantized, shape
        (m, N0). For the first layer, pass x.
      alphabet: the alphabet A (per layer, or per neuron with (N1,) parameters).
      method: "gram" (default; statistics G, H, memory independent of m) or "residual" (the
        paper's form; memory m per neuron). Both give the same codes up to float rounding.
      batch_size: with "gram", rows of X per accumulation step (default: all at once).
      block_size: with "gram", inputs per lazy-batch block.
      dead_tol: relative threshold on ||X~_t||² below which input t is dead.

    Returns:
      Q, shape (N0, N1), every entry a letter of A.
    """
    w = _check_matrix("w", w, batch_ndim=0)
    x = _check_matrix("x", x, batch_ndim=0)
    x_tilde = _check_matrix("x_tilde", x_tilde, batch_ndim=0)
    if x.shape != x_tilde.shape:
        raise ValueError(
            f"x and x_tilde must have the same shape, got {x.shape} and {x_tilde.shape}"
        )
    if x.shape[1] != w.shape[0]:
        raise ValueError(
            f"x has {x.shape[1]} columns but w has N0 = {w.shape[0]} rows; x must be (m, N0)"
        )
    if x.shape[0] == 0:
        raise ValueError("x has no rows: GPFQ needs at least one calibration sample")
    _check_finite("x", x)
    _check_finite("x_tilde", x_tilde)
    if method == "gram":
        stats = gram_stats(x, x_tilde, batch_size=batch_size)
        return gpfq_from_stats(w, stats, alphabet, block_size=block_size, dead_tol=dead_tol)
    if method == "residual":
        _check_finite("w", w)
        _check_alphabet(alphabet)
        return _gpfq_residual(w, x, x_tilde, alphabet, dead_tol=dead_tol)
    raise ValueError(f"unknown method {method!r}; expected 'gram' or 'residual'")


def gpfq_conv(
    kernel: ArrayLike,
    x: ArrayLike,
    x_tilde: ArrayLike,
    alphabet: AnyAlphabet,
    *,
    geometry: ConvGeometry | None = None,
    strides: int | tuple[int, ...] = 1,
    padding: str | int | tuple = "SAME",
    input_dilation: int | tuple[int, ...] = 1,
    kernel_dilation: int | tuple[int, ...] = 1,
    feature_group_count: int = 1,
    method: Literal["gram", "residual"] = "gram",
    patch_fraction: float | None = None,
    key: jax.Array | None = None,
    batch_size: int | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    dead_tol: float = DEFAULT_DEAD_TOL,
) -> jax.Array:
    """GPFQ of one convolution layer (a Flax `nn.Conv` kernel), through its image patches.

    Each feature group is a dense layer whose calibration rows are the patches the kernel sees
    (`qjax.patches.conv_patches`); its neurons are the group's output channels.

    Args:
      kernel: the kernel, shape (*window, cin/groups, cout).
      x: the layer's input images in the float network, shape (batch, *spatial, cin).
      x_tilde: the same images' inputs in the partly quantized network, same shape.
      alphabet: the alphabet A, per layer or per output channel ((cout,) parameters).
      geometry: the conv's `ConvGeometry`; if None, built from the keyword arguments below
        (Flax's `nn.Conv` conventions).
      strides, padding, input_dilation, kernel_dilation, feature_group_count: as in `nn.Conv`.
      method: "gram" or "residual", see `gpfq_layer`.
      patch_fraction: if given, GPFQ uses this random fraction of the patches (the paper
        subsamples patches to bound the cost); needs `key`.
      key: PRNG key for the patch subsample.
      batch_size: images per accumulation step (default: as many as give about
        `DEFAULT_CONV_CHUNK_ROWS` patch rows with "gram", all at once with "residual").
      block_size: with "gram", inputs per lazy-batch block.
      dead_tol: relative threshold on ||X~_t||² below which input t is dead.

    Returns:
      The quantized kernel, same shape as `kernel`.
    """
    if geometry is None:
        kernel_shape = jnp.shape(kernel)
        geometry = ConvGeometry(
            kernel_size=tuple(kernel_shape[:-2]),
            strides=strides,
            padding=padding,
            input_dilation=input_dilation,
            kernel_dilation=kernel_dilation,
            feature_group_count=feature_group_count,
        )
    matrices = kernel_to_matrix(kernel, geometry)
    x, x_tilde = jnp.asarray(x), jnp.asarray(x_tilde)
    if x.shape != x_tilde.shape:
        raise ValueError(
            f"x and x_tilde must have the same shape, got {x.shape} and {x_tilde.shape}"
        )
    cin = matrices.shape[1] // geometry.window_size * geometry.feature_group_count
    if x.ndim != len(geometry.kernel_size) + 2 or x.shape[-1] != cin:
        raise ValueError(
            f"x must have shape (batch, *spatial, {cin}) for a kernel of shape "
            f"{jnp.shape(kernel)}, got {x.shape}"
        )
    _check_finite("x", x)
    _check_finite("x_tilde", x_tilde)
    if patch_fraction is not None:
        if not 0 < patch_fraction <= 1:
            raise ValueError(f"patch_fraction must be in (0, 1], got {patch_fraction}")
        if key is None:
            raise ValueError("patch_fraction needs a PRNG key")
    group_alphabet = _split_channels(alphabet, geometry.feature_group_count)

    if batch_size is not None:
        _check_positive_int("batch_size", batch_size)
        step = batch_size
    elif method == "gram":
        one_image = jax.ShapeDtypeStruct((1, *x.shape[1:]), x.dtype)
        positions = jax.eval_shape(conv_patches, one_image, geometry).shape[1]  # rows per image
        step = max(1, DEFAULT_CONV_CHUNK_ROWS // positions)
    else:
        step = x.shape[0]
    starts = range(0, x.shape[0], step)
    keys = (
        jax.random.split(key, len(starts)) if patch_fraction is not None else [None] * len(starts)
    )
    # (images, images_tilde, patch-subsample key) of each accumulation step.
    chunks = [
        (x[start : start + step], x_tilde[start : start + step], chunk_key)
        for start, chunk_key in zip(starts, keys, strict=True)
    ]
    sampling = dict(geometry=geometry, patch_fraction=patch_fraction)

    if method == "gram":
        stats = gram_stats_init(
            matrices.shape[1],
            batch_shape=(geometry.feature_group_count,),
            dtype=jnp.result_type(x.dtype, jnp.float32),
        )
        for chunk in chunks:
            stats = _conv_stats_update(stats, *chunk, **sampling)
        q = gpfq_from_stats(
            matrices, stats, group_alphabet, block_size=block_size, dead_tol=dead_tol
        )
    elif method == "residual":
        sampled = [_sampled_patches(*chunk, **sampling) for chunk in chunks]
        patches = jnp.concatenate([p for p, _ in sampled], axis=1)
        patches_tilde = jnp.concatenate([p_tilde for _, p_tilde in sampled], axis=1)
        _check_alphabet(alphabet)
        quantize = jax.vmap(
            functools.partial(_gpfq_residual, dead_tol=dead_tol),
            in_axes=(0, 0, 0, _alphabet_batch_axes(group_alphabet, matrices)),
        )
        q = quantize(matrices, patches, patches_tilde, group_alphabet)
    else:
        raise ValueError(f"unknown method {method!r}; expected 'gram' or 'residual'")
    return matrix_to_kernel(q, geometry)


def _sampled_patches(
    images: jax.Array,
    images_tilde: jax.Array,
    key: jax.Array | None,
    *,
    geometry: ConvGeometry,
    patch_fraction: float | None,
) -> tuple[jax.Array, jax.Array]:
    """The patches of both image batches, the same random `patch_fraction` of rows of each."""
    patches = conv_patches(images, geometry)
    patches_tilde = conv_patches(images_tilde, geometry)
    if patch_fraction is not None:
        m = patches.shape[1]
        keep = jax.random.choice(key, m, (max(1, round(patch_fraction * m)),), replace=False)
        patches, patches_tilde = patches[:, keep], patches_tilde[:, keep]
    return patches, patches_tilde


@functools.partial(jax.jit, static_argnames=("geometry", "patch_fraction"), donate_argnames="stats")
def _conv_stats_update(
    stats: GramStats,
    images: jax.Array,
    images_tilde: jax.Array,
    key: jax.Array | None,
    *,
    geometry: ConvGeometry,
    patch_fraction: float | None,
) -> GramStats:
    """Patch extraction and the Gram update of one image chunk, as one compiled program."""
    patches, patches_tilde = _sampled_patches(
        images, images_tilde, key, geometry=geometry, patch_fraction=patch_fraction
    )
    return _gram_stats_update(stats, patches, patches_tilde)


def _split_channels(alphabet: AnyAlphabet, groups: int) -> AnyAlphabet:
    """Per-output-channel alphabet parameters (cout,) -> (groups, cout/groups)."""
    neuron_ndim = 1 if isinstance(alphabet, Alphabet) else 0

    def split(leaf):
        if leaf.ndim == neuron_ndim:
            return leaf
        return leaf.reshape(groups, leaf.shape[0] // groups, *leaf.shape[1:])

    return jax.tree.map(split, alphabet)


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


# ----------------------------------------------------------------------------------------------
# Input checks: a clear ValueError naming the argument, never a silent wrong answer.


def _check_matrix(name: str, value: ArrayLike, *, batch_ndim: int | None = None) -> jax.Array:
    array = jnp.asarray(value)
    if not jnp.issubdtype(array.dtype, jnp.floating):
        raise ValueError(f"{name} must be a floating-point array, got dtype {array.dtype}")
    if batch_ndim is None:
        if array.ndim < 2:
            raise ValueError(
                f"{name} must have at least 2 dimensions (..., m, N0), got {array.shape}"
            )
    elif array.ndim != batch_ndim + 2:
        raise ValueError(f"{name} must have {batch_ndim + 2} dimensions, got shape {array.shape}")
    return array


def _check_positive_int(name: str, value) -> None:
    if not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_finite(name: str, value: jax.Array) -> None:
    if isinstance(value, jax.core.Tracer):
        return
    if not bool(jnp.all(jnp.isfinite(value))):
        raise ValueError(f"{name} contains NaN or Inf")


def _check_alphabet(alphabet) -> None:
    if not isinstance(alphabet, UniformAlphabet | Alphabet):
        raise ValueError(
            f"alphabet must be a qjax.alphabets alphabet, got {type(alphabet).__name__}"
        )
    if alphabet.size < 1:
        raise ValueError("alphabet is empty")
    for leaf in jax.tree.leaves(alphabet):
        _check_finite("alphabet", leaf)


def _alphabet_batch_axes(alphabet: AnyAlphabet, w: jax.Array):
    """vmap axes of an alphabet's leaves over w's leading (batch) axis."""
    neuron_ndim = 2 if isinstance(alphabet, Alphabet) else 1

    def axis(leaf):
        return 0 if leaf.ndim > neuron_ndim else None

    return jax.tree.map(axis, alphabet)
