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

One device or many. Statistics accumulated over a mesh (`qjax.stats.gram_stats_init(...,
mesh=)`: per-device partial sums) are read without gathering H: each device adds up G (psum)
and receives a block of H's columns (reduce-scatter), builds the targets Σ_{s≤t} H_ts w_s of its
block of neurons as the blocks of H pass round a ring (`ppermute`), and runs the scan on them
(`gpfq_from_targets`, inside `jax.shard_map`). A neuron's scan reads only G and its own targets,
so the codes are those of one device. `gpfq_layer` and `gpfq_conv` take `mesh=` for both forms
(the residual form splits the neurons and gives every device all the rows). Sizes that do not
divide the number of devices are padded: dead, uncorrelated inputs and copies of the last neuron,
whose codes are dropped.

Dead inputs. When ||X~_t||² is numerically zero (G_tt ≤ dead_tol·max_s G_ss; common after ReLU)
the choice of q_t does not change the residual. We then set the rounding argument to 0:
q_t = Q(0), the letter nearest zero, ties to the lower letter: 0 for alphabets containing 0, -δ/2
for even alphabets {±δ/2, ±3δ/2, ...} of any size. (The paper's reference code sets q_t = 0 even
when 0 is not a letter; qjax keeps every q_t a letter, so that the codes can be exported.)

Group-wise alphabets (one step per g consecutive inputs per neuron) work in both forms: input t
is rounded with the step of its group, `alphabet.for_input(t)`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar, Literal

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from qjax import _mesh
from qjax.alphabets import Alphabet, AnyAlphabet
from qjax.checks import check_alphabet, check_finite, check_matrix, check_positive_int
from qjax.methods.base import QuantizationMethod, batch_axes, nearest_letter
from qjax.patches import ConvGeometry, conv_patches, kernel_to_matrix, matrix_to_kernel
from qjax.stats import GramStats, accumulate, gram_stats, gram_stats_init, gram_stats_update

__all__ = ["GPFQ", "gpfq_conv", "gpfq_from_stats", "gpfq_from_targets", "gpfq_layer"]

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


# ----------------------------------------------------------------------------------------------
# The greedy scan, for one neuron; vmapped across neurons below.


def _neuron_gram(
    w: jax.Array,
    target: jax.Array,
    gram: jax.Array,
    dead: jax.Array,
    alphabet: AnyAlphabet,
    block_size: int,
    offset: int,
) -> jax.Array:
    """GPFQ for one neuron from G (N0p × N0p, N0p a multiple of block_size).

    Args:
      w: the neuron's weights (N0p,) (used only for its dtype).
      target: Σ_{s≤t} H_ts w_s for each t, shape (N0p,).
      gram: G = X~ᵀX~.
      dead: (N0p,) bool, inputs whose ||X~_t|| is numerically zero.
      alphabet: this neuron's alphabet.
      block_size: B.
      offset: the index in the whole layer of this run's first input (for group-wise alphabets).

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
            argument = _argument(target[t] - correction[j], diag[t], dead[t])
            q_t = nearest_letter(alphabet.for_input(offset + t), argument)
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
    if alphabet.group_size is not None:  # step (G, N1) -> (N1, G)
        return dataclasses.replace(alphabet, step=jnp.swapaxes(jnp.asarray(alphabet.step), 0, 1))
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
      alphabet: per-neuron alphabet (leading axis N1).
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
        quantize = jax.vmap(
            functools.partial(_neuron_gram, block_size=block_size, offset=offset),
            in_axes=(1, 1, None, None, 0),
            out_axes=1,
        )
        return quantize(w, rhs, gram, dead, alphabet)
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


def _greedy(
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
    return _greedy(w, target, gram, None, alphabet, block_size=block_size, dead_tol=dead_tol)


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
        return _greedy(
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
        codes are split by neuron (see `_gpfq_on_mesh`). Traced statistics do not know their mesh:
        they are combined, as for any method.
        """
        mesh = _mesh.mesh_of(stats.gram)
        if mesh is None:
            return super().quantize_per_device(w, stats, alphabet)
        return _gpfq_on_mesh(
            w, stats, alphabet, mesh=mesh, block_size=self.block_size, dead_tol=self.dead_tol
        )


# ----------------------------------------------------------------------------------------------
# Neurons split over a mesh: D devices, each quantizing a block of N1 / D neurons.


def _neuron_axis(alphabet: AnyAlphabet) -> int:
    """The neuron axis of every leaf of a per-neuron alphabet: letters (..., N1, n), steps
    (..., N1) or group-wise (..., G, N1)."""
    return -2 if isinstance(alphabet, Alphabet) else -1


def _neurons_padded(alphabet: AnyAlphabet, batch_shape: tuple[int, ...], n1: int, pad: int):
    """Every alphabet leaf broadcast to one alphabet per neuron and batch entry, `pad` neurons
    added that repeat the last neuron's alphabet."""
    axis = _neuron_axis(alphabet)

    def broadcast(leaf):
        leaf = jnp.asarray(leaf)
        if isinstance(alphabet, Alphabet):
            shape = (*batch_shape, n1, leaf.shape[-1])
        elif alphabet.group_size is not None:
            shape = (*batch_shape, leaf.shape[-2], n1)
        else:
            shape = (*batch_shape, n1)
        widths = [(0, 0)] * len(shape)
        widths[axis] = (0, pad)
        return jnp.pad(jnp.broadcast_to(leaf, shape), widths, mode="edge")

    return jax.tree.map(broadcast, alphabet)


def _split_neurons(quantize_local, mesh: Mesh, w: jax.Array, alphabet, operands, specs):
    """Inside jit: `quantize_local(w_d, alphabet_d, *operands)` on each device d of `mesh`, for
    its block of neurons.

    N1 is padded to a multiple of D with zero neurons (the last neuron's alphabet), whose codes
    are dropped. The codes stay split by neuron when no neuron was padded.

    Args:
      quantize_local: maps the device's w (batch_shape + (N0, N1 / D)), its alphabet (one per
        neuron and batch entry) and its parts of `operands` to its codes.
      w: weights, shape batch_shape + (N0, N1).
      alphabet: the alphabet, as `qjax.gpfq_from_stats` takes it.
      operands: further arrays, laid out as `specs` (PartitionSpecs) say.

    Returns:
      Q, shape batch_shape + (N0, N1).
    """
    n1 = w.shape[-1]
    pad = -n1 % mesh.size
    w = jnp.pad(w, [(0, 0)] * (w.ndim - 1) + [(0, pad)])
    alphabet = _neurons_padded(alphabet, w.shape[:-2], n1, pad)
    neuron_spec = _mesh.split(mesh, w.ndim, w.ndim - 1)
    axis = _neuron_axis(alphabet)
    alphabet_spec = jax.tree.map(
        lambda leaf: _mesh.split(mesh, leaf.ndim, leaf.ndim + axis), alphabet
    )
    in_specs = (neuron_spec, alphabet_spec, *specs)
    arguments = _mesh.lay_out((w, alphabet, *operands), mesh, in_specs)
    q = jax.shard_map(quantize_local, mesh=mesh, in_specs=in_specs, out_specs=neuron_spec)(
        *arguments
    )
    if pad:  # the padded neurons' codes are dropped from a gathered q
        q = _mesh.lay_out(q, mesh, P())
    return q[..., :n1]


def _batched(quantize, batch_ndim: int):
    """`quantize` vmapped over `batch_ndim` leading axes of all its arguments."""
    for _ in range(batch_ndim):
        quantize = jax.vmap(quantize)
    return quantize


def _ring_targets(
    cross_columns: jax.Array, w: jax.Array, *, axis_names: tuple[str, ...], num_devices: int
) -> jax.Array:
    """T = tril(H)·W for this device's neurons, from the column blocks of H passed round a ring.

    Args:
      cross_columns: this device's columns of H, shape (..., N0, N0 / D).
      w: this device's neurons' weights, shape (..., N0, N1 / D).

    Returns:
      T_tn = Σ_{s≤t} H_ts w_sn for this device's neurons, shape (..., N0, N1 / D).
    """
    n0, width = cross_columns.shape[-2:]
    here = jax.lax.axis_index(axis_names)
    # Device d sends its block to d - 1, so after k steps it holds the block of d + k.
    ring = [(d, (d - 1) % num_devices) for d in range(num_devices)]

    def step(k, carry):
        block, target = carry
        owner = (here + k) % num_devices
        rows = jnp.arange(n0)[:, None]
        columns = owner * width + jnp.arange(width)[None, :]
        lower = jnp.where(rows >= columns, block, 0)
        w_rows = jax.lax.dynamic_slice_in_dim(w, owner * width, width, axis=-2)
        target = target + jnp.matmul(lower, w_rows, precision=_HIGHEST)
        return jax.lax.ppermute(block, axis_names, ring), target

    target = jnp.zeros_like(w, cross_columns.dtype)  # w has N0 rows too; varies by device
    _, target = jax.lax.fori_loop(0, num_devices, step, (cross_columns, target))
    return target


@functools.partial(jax.jit, static_argnames=("mesh", "block_size", "dead_tol"))
def _gpfq_on_mesh(
    w: jax.Array,
    stats: GramStats,
    alphabet: AnyAlphabet,
    *,
    mesh: Mesh,
    block_size: int,
    dead_tol: float,
) -> jax.Array:
    """GPFQ from per-device statistics, neurons split over the mesh.

    Each device adds up G (psum: replicated) and receives a block of H's columns (reduce-scatter);
    its neurons' targets T = tril(H)·W are built as the column blocks pass round a ring, and it
    runs `gpfq_from_targets` on its neurons. N0 is padded to a multiple of D with dead,
    uncorrelated inputs, which change no code.
    """
    devices, nb = mesh.size, w.ndim - 2
    n0 = w.shape[-2]
    pad = [(0, 0)] * (nb + 1) + [(0, -n0 % devices)] * 2
    gram, cross = jnp.pad(stats.gram, pad), jnp.pad(stats.cross, pad)
    w_padded = jnp.pad(w, [*pad[1:-1], (0, 0)])

    def quantize_local(w_local, alphabet_local, gram_local, cross_local):
        gram = jax.lax.psum(gram_local[0], mesh.axis_names)
        cross_columns = jax.lax.psum_scatter(
            cross_local[0], mesh.axis_names, scatter_dimension=nb + 1, tiled=True
        )
        target = _ring_targets(
            cross_columns, w_local, axis_names=mesh.axis_names, num_devices=devices
        )
        quantize = functools.partial(gpfq_from_targets, block_size=block_size, dead_tol=dead_tol)
        return _batched(quantize, nb)(w_local, target, gram, alphabet_local)

    partial = _mesh.split(mesh, gram.ndim, 0)
    q = _split_neurons(quantize_local, mesh, w_padded, alphabet, (gram, cross), (partial, partial))
    return q[..., :n0, :]


@functools.partial(jax.jit, static_argnames=("mesh", "dead_tol"))
def _gpfq_residual_on_mesh(
    w: jax.Array,
    x: jax.Array,
    x_tilde: jax.Array,
    alphabet: AnyAlphabet,
    *,
    mesh: Mesh,
    dead_tol: float,
) -> jax.Array:
    """The residual form with neurons split over the mesh; every device gathers all the rows."""

    def quantize_local(w_local, alphabet_local, x, x_tilde):
        # The rows are the same on every device, but the residuals they start differ by neuron.
        x, x_tilde = jax.lax.pcast((x, x_tilde), mesh.axis_names, to="varying")
        quantize = functools.partial(_gpfq_residual, dead_tol=dead_tol)
        return _batched(quantize, w.ndim - 2)(w_local, x, x_tilde, alphabet_local)

    return _split_neurons(quantize_local, mesh, w, alphabet, (x, x_tilde), (P(), P()))


def _residual_codes(
    w: jax.Array,
    x: jax.Array,
    x_tilde: jax.Array,
    alphabet: AnyAlphabet,
    *,
    dead_tol: float,
    mesh: Mesh | None,
) -> jax.Array:
    """The residual form for weights batch_shape + (N0, N1) and rows batch_shape + (m, N0).

    With a mesh, each process's rows are placed on the mesh (zero rows padding them change no
    residual) and the neurons are split over its devices.
    """
    if mesh is not None:
        x, _ = _mesh.place_rows("x", x, mesh, rows_axis=x.ndim - 2)
        x_tilde, _ = _mesh.place_rows("x_tilde", x_tilde, mesh, rows_axis=x.ndim - 2)
        return _gpfq_residual_on_mesh(w, x, x_tilde, alphabet, mesh=mesh, dead_tol=dead_tol)
    quantize = functools.partial(_gpfq_residual, dead_tol=dead_tol)
    for level in range(w.ndim - 2):
        quantize = jax.vmap(quantize, in_axes=(0, 0, 0, batch_axes(alphabet, level + 1)))
    return quantize(w, x, x_tilde, alphabet)


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

    The functional form of `GPFQ(block_size=..., dead_tol=...).quantize(w, stats, alphabet)`.

    Args:
      w: weights, shape batch_shape + (N0, N1) (batch_shape as in `stats`, e.g. conv groups).
      stats: `GramStats` of the layer's calibration inputs; per-device statistics on a mesh
        split the neurons over it (see the module docstring).
      alphabet: the alphabet A: per tensor, per neuron (N1,), or group-wise (⌈N0/g⌉, N1), with
        batch_shape in front for batched layers whose alphabets differ.
      block_size: B, the number of inputs handled per lazy-batch block (a speed knob only).
      dead_tol: inputs with G_tt <= dead_tol·max_s G_ss are dead (see the module docstring).

    Returns:
      q, the quantized weights, same shape and dtype as w, every entry a letter of A; from
      per-device statistics, a global array split by neuron over the mesh (gathered when N1 is
      not a multiple of the number of devices).
    """
    return GPFQ(block_size=block_size, dead_tol=dead_tol).quantize(w, stats, alphabet)


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
    mesh: Mesh | None = None,
) -> jax.Array:
    """GPFQ of one dense layer.

    Args:
      w: weights W, shape (N0, N1) (Flax `Dense` kernel layout: inputs × neurons).
      x: X, the layer's inputs in the float network, shape (m, N0); with a mesh on several
        processes, this process's rows.
      x_tilde: X~, the layer's inputs in the network whose earlier layers are quantized, shape
        (m, N0). For the first layer, pass x.
      alphabet: the alphabet A (per layer, or per neuron with (N1,) parameters).
      method: "gram" (default; statistics G, H, memory independent of m) or "residual" (the
        paper's form; memory m per neuron). Both give the same codes up to float rounding.
      batch_size: with "gram", rows of X per accumulation step (default: all at once).
      block_size: with "gram", inputs per lazy-batch block.
      dead_tol: relative threshold on ||X~_t||² below which input t is dead.
      mesh: split the work over this mesh's devices (and hosts): with "gram" the statistics are
        accumulated data-parallel (`qjax.stats.gram_stats_init`) and the neurons split; with
        "residual" the neurons are split and every device reads all the rows. The codes are
        those of the run without a mesh.

    Returns:
      Q, shape (N0, N1), every entry a letter of A.
    """
    w = check_matrix("w", w, batch_ndim=0)
    x = check_matrix("x", x, batch_ndim=0)
    x_tilde = check_matrix("x_tilde", x_tilde, batch_ndim=0)
    if x.shape != x_tilde.shape:
        raise ValueError(
            f"x and x_tilde must have the same shape, got {x.shape} and {x_tilde.shape}"
        )
    if x.shape[1] != w.shape[0]:
        raise ValueError(
            f"x has {x.shape[1]} columns but w has N0 = {w.shape[0]} rows; x must be (m, N0)"
        )
    if sum(_mesh.rows_per_process(x.shape[0], mesh)) == 0:
        raise ValueError("x has no rows: GPFQ needs at least one calibration sample")
    check_finite("x", x)
    check_finite("x_tilde", x_tilde)
    if method == "gram":
        stats = gram_stats(x, x_tilde, batch_size=batch_size, mesh=mesh)
        return gpfq_from_stats(w, stats, alphabet, block_size=block_size, dead_tol=dead_tol)
    if method == "residual":
        check_finite("w", w)
        check_alphabet(alphabet)
        q = _residual_codes(w, x, x_tilde, alphabet, dead_tol=dead_tol, mesh=mesh)
        return q.astype(w.dtype)
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
    mesh: Mesh | None = None,
) -> jax.Array:
    """GPFQ of one convolution layer (a Flax `nn.Conv` kernel), through its image patches.

    Each feature group is a dense layer whose calibration rows are the patches the kernel sees
    (`qjax.patches.conv_patches`); its neurons are the group's output channels.

    Args:
      kernel: the kernel, shape (*window, cin/groups, cout).
      x: the layer's input images in the float network, shape (batch, *spatial, cin); with a mesh
        on several processes, this process's images.
      x_tilde: the same images' inputs in the partly quantized network, same shape.
      alphabet: the alphabet A, per layer or per output channel ((cout,) parameters).
      geometry: the conv's `ConvGeometry`; if None, built from the keyword arguments below
        (Flax's `nn.Conv` conventions).
      strides, padding, input_dilation, kernel_dilation, feature_group_count: as in `nn.Conv`.
      method: "gram" or "residual", see `gpfq_layer`.
      patch_fraction: if given, GPFQ uses this random fraction of the patches (the paper
        subsamples patches to bound the cost); needs `key`. Each accumulation step subsamples
        its own patches (on several processes, each process its own, with the same key).
      key: PRNG key for the patch subsample.
      batch_size: images per accumulation step (default: as many as give about
        `DEFAULT_CONV_CHUNK_ROWS` patch rows with "gram", all at once with "residual").
      block_size: with "gram", inputs per lazy-batch block.
      dead_tol: relative threshold on ||X~_t||² below which input t is dead.
      mesh: split the work over this mesh's devices (and hosts), as in `gpfq_layer`; each
        step's patches are split over the devices by rows. The codes are those without a mesh.

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
    check_finite("x", x)
    check_finite("x_tilde", x_tilde)
    if patch_fraction is not None:
        if not 0 < patch_fraction <= 1:
            raise ValueError(f"patch_fraction must be in (0, 1], got {patch_fraction}")
        if key is None:
            raise ValueError("patch_fraction needs a PRNG key")
    group_alphabet = _split_channels(alphabet, geometry.feature_group_count)

    if batch_size is not None:
        check_positive_int("batch_size", batch_size)
        step = batch_size
    elif method == "gram":
        one_image = jax.ShapeDtypeStruct((1, *x.shape[1:]), x.dtype)
        positions = jax.eval_shape(conv_patches, one_image, geometry).shape[1]  # rows per image
        step = max(1, DEFAULT_CONV_CHUNK_ROWS // positions)
    else:
        step = None
    batches = _mesh.row_slices(x.shape[0], step, mesh)
    keys = (
        jax.random.split(key, len(batches)) if patch_fraction is not None else [None] * len(batches)
    )
    # (images, images_tilde, patch-subsample key) of each accumulation step.
    chunks = [
        (x[rows], x_tilde[rows], chunk_key) for rows, chunk_key in zip(batches, keys, strict=True)
    ]
    sampling = dict(geometry=geometry, patch_fraction=patch_fraction)

    if method == "gram":
        stats = gram_stats_init(
            matrices.shape[1],
            batch_shape=(geometry.feature_group_count,),
            dtype=jnp.result_type(x.dtype, jnp.float32),
            mesh=mesh,
        )
        for chunk in chunks:
            if mesh is None:  # patches and update in one compiled program
                stats = _conv_stats_update(stats, *chunk, **sampling)
            else:  # this process's patches, split over the mesh by the update
                stats = gram_stats_update(stats, *_sampled_patches(*chunk, **sampling))
        q = gpfq_from_stats(
            matrices, stats, group_alphabet, block_size=block_size, dead_tol=dead_tol
        )
    elif method == "residual":
        sampled = [_sampled_patches(*chunk, **sampling) for chunk in chunks]
        patches = jnp.concatenate([p for p, _ in sampled], axis=1)
        patches_tilde = jnp.concatenate([p_tilde for _, p_tilde in sampled], axis=1)
        check_alphabet(alphabet)
        q = _residual_codes(
            matrices, patches, patches_tilde, group_alphabet, dead_tol=dead_tol, mesh=mesh
        )
    else:
        raise ValueError(f"unknown method {method!r}; expected 'gram' or 'residual'")
    return matrix_to_kernel(q, geometry)


@functools.partial(jax.jit, static_argnames=("geometry", "patch_fraction"))
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
    m = patches.shape[1]
    if patch_fraction is not None and m:  # a process may have no images left for this step
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
    return accumulate(stats, patches, patches_tilde)


def _split_channels(alphabet: AnyAlphabet, groups: int) -> AnyAlphabet:
    """Per-output-channel alphabet parameters (cout,) -> (groups, cout/groups)."""
    neuron_ndim = 1 if isinstance(alphabet, Alphabet) else 0

    def split(leaf):
        if leaf.ndim == neuron_ndim:
            return leaf
        return leaf.reshape(groups, leaf.shape[0] // groups, *leaf.shape[1:])

    return jax.tree.map(split, alphabet)
