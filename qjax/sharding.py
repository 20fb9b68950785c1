"""GPFQ across devices and hosts: data-parallel statistics, neurons split over a device mesh.

GPFQ's "gram" form (`qjax.gpfq`) needs, for a layer W (N0 × N1), the statistics G = X~ᵀX~ and
H = X~ᵀX of its calibration inputs, and then a greedy scan per neuron. Both parts shard:

* Statistics, data-parallel. The calibration rows of every batch are split across the devices of
  a `jax.sharding.Mesh`; device d adds X~_dᵀX~_d and X~_dᵀX_d of its own rows to its own partial
  sums, so no device ever holds all of X. The partial sums are combined only once, when the layer
  is quantized: G = Σ_d X~_dᵀX~_d by a `psum` (G is replicated: every neuron's scan reads all of
  it), and H by a reduce-scatter (`psum_scatter`), which leaves device d with a block of H's
  columns.
* Neurons, model-parallel. W and the targets T = tril(H)·W, T_tn = Σ_{s≤t} H_ts w_sn, are split by
  neuron (column of W). Device d computes its neurons' targets from the column blocks of H as
  they pass around a ring (`ppermute`), then runs `qjax.gpfq.gpfq_from_targets` on its neurons.
  The scan of one neuron only reads G and its own target, so the codes are those of the
  unsharded run.

One API for one device, N devices and many hosts. Every function takes the devices from a mesh:
pass `mesh=` (`make_mesh`, or any `Mesh`, whose axes are used together as one axis) or let
`gram_stats_init` build one from `jax.devices()`. On several hosts, start every process with
`jax.distributed.initialize(...)` and make the same calls on every process; each process passes
its own calibration rows, see `gram_stats_update`. `qjax.quantize_model(..., mesh=)` quantizes a
whole model this way.

Sizes that do not divide the number of devices D are padded, never rounded away: calibration rows
with zero rows (which add nothing to G or H), inputs with dead, uncorrelated inputs (which change
no code), and neurons with copies of the last neuron (whose codes are dropped).

Numerics. G and H are sums over up to millions of rows in float32. Each batch's products are
full-precision matmuls (HIGHEST: no TF32/bfloat16 passes on GPUs and TPUs), and the batches are
added with Kahan's compensated summation: the rounding error of every addition is kept in a
compensation term and fed back into the next one. Plain float32 summation of n batch products
has an error that grows like n·ε in the worst case (ε = 6·10⁻⁸; the model-level API adds a few
hundred rows per batch, so 10⁶ rows are thousands of additions); compensated, it stays at a few ε
whatever n is, for the price of one more N0 × N0 buffer and four additions per entry per batch,
negligible next to the batch's O(rows·N0²) product. (A pairwise tree over batches would need
O(log n) buffers of N0 × N0.) The D partial sums are added once, by the psum.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from qjax.alphabets import Alphabet, AnyAlphabet
from qjax.checks import check_alphabet as _check_alphabet
from qjax.checks import check_finite as _check_finite
from qjax.checks import check_matrix as _check_matrix
from qjax.checks import check_positive_int as _check_positive_int
from qjax.methods.gpfq import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_DEAD_TOL,
    _split_channels,
    gpfq_from_targets,
)
from qjax.patches import ConvGeometry, conv_patches, kernel_to_matrix, matrix_to_kernel
from qjax.stats import GramStats

__all__ = [
    "CompensatedSum",
    "ShardedGramStats",
    "combine_stats",
    "gpfq_conv",
    "gpfq_from_stats",
    "gpfq_layer",
    "gram_stats_init",
    "gram_stats_update",
    "make_mesh",
]

DEFAULT_AXIS_NAME = "devices"
_HIGHEST = jax.lax.Precision.HIGHEST


class CompensatedSum(NamedTuple):
    """A float sum with Kahan compensation: the exact sum is ≈ total - compensation.

    Attributes:
      total: the running sum.
      compensation: the low-order part that `total` lost to rounding, with the opposite sign.
    """

    total: jax.Array
    compensation: jax.Array

    def value(self) -> jax.Array:
        """The compensated sum, total - compensation."""
        return self.total - self.compensation


class ShardedGramStats(NamedTuple):
    """Per-device partial sums of a layer's statistics over the calibration rows each device saw.

    Every array has a leading axis of length D (the mesh's devices), sharded over the mesh:
    device d holds only its own partial sums. `combine_stats` adds them up.

    Attributes:
      gram: Σ over device d's rows of X~ᵀX~, shape (D, *batch_shape, N0, N0).
      cross: Σ over device d's rows of X~ᵀX, same shape.
      count: the number of calibration rows m summed so far over all devices (int32 scalar).
      float_gram: Σ of XᵀX (for `qjax.relative_error`), kept with `track_error=True`, else None.
    """

    gram: CompensatedSum
    cross: CompensatedSum
    count: jax.Array
    float_gram: CompensatedSum | None = None

    @property
    def mesh(self) -> Mesh:
        """The mesh whose devices hold the partial sums."""
        sharding = self.gram.total.sharding
        if not isinstance(sharding, NamedSharding):
            raise ValueError(
                "stats.gram is not laid out on a mesh (got sharding "
                f"{type(sharding).__name__}); build the statistics with "
                "qjax.sharding.gram_stats_init"
            )
        return sharding.mesh


def make_mesh(
    devices: Iterable[jax.Device] | None = None, *, axis_name: str = DEFAULT_AXIS_NAME
) -> Mesh:
    """A one-axis mesh over `devices` (default: `jax.devices()`, every device of every process).

    Args:
      devices: the devices to use, in order.
      axis_name: the mesh axis name.

    Returns:
      A `jax.sharding.Mesh` of shape (len(devices),).
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("devices is empty: a mesh needs at least one device")
    return Mesh(np.array(devices), (axis_name,))


def _check_mesh(mesh: Mesh) -> Mesh:
    """Every running process must own devices of the mesh (each one feeds its own rows)."""
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    processes = {device.process_index for device in mesh.devices.flat}
    expected = set(range(jax.process_count()))
    if processes != expected:
        raise ValueError(
            f"mesh has devices of processes {sorted(processes)} but {jax.process_count()} "
            f"processes are running (processes {sorted(expected)}): the host count and the "
            "data shards disagree; build the mesh from jax.devices() on every process"
        )
    return mesh


def _device_spec(mesh: Mesh, ndim: int, axis: int) -> P:
    """A PartitionSpec of rank `ndim` splitting `axis` over all the mesh's axes together."""
    spec = [None] * ndim
    spec[axis] = mesh.axis_names
    return P(*spec)


def _lay_out(tree, mesh: Mesh, spec):
    """Inside jit: `tree` laid out as `spec` (a PartitionSpec, or a pytree of them) on `mesh`.

    Explicit-axis meshes (`jax.make_mesh`'s default) need `reshard`; Auto ones a constraint.
    """
    shardings = jax.tree.map(
        lambda s: NamedSharding(mesh, s), spec, is_leaf=lambda s: isinstance(s, P)
    )
    if all(kind == jax.sharding.AxisType.Explicit for kind in mesh.axis_types):
        return jax.sharding.reshard(tree, shardings)
    return jax.lax.with_sharding_constraint(tree, shardings)


def _partial_sums_spec(mesh: Mesh, stats: ShardedGramStats) -> ShardedGramStats:
    split = _device_spec(mesh, stats.gram.total.ndim, 0)
    compensated = CompensatedSum(split, split)
    return ShardedGramStats(
        compensated, compensated, P(), None if stats.float_gram is None else compensated
    )


def gram_stats_init(
    n0: int,
    *,
    mesh: Mesh | None = None,
    batch_shape: tuple[int, ...] = (),
    track_error: bool = False,
    dtype: jnp.dtype = jnp.float32,
) -> ShardedGramStats:
    """Zero partial statistics on every device of `mesh`, for a layer with `n0` inputs.

    Args:
      n0: the number of inputs N0.
      mesh: the devices (default: `make_mesh()`, all devices of all processes).
      batch_shape: leading dimensions, e.g. (groups,) for a grouped convolution.
      track_error: also accumulate XᵀX, so that `qjax.relative_error` can be computed.
      dtype: accumulation dtype (float32 by default).

    Returns:
      `ShardedGramStats` of zeros, each device holding its own (1, *batch_shape, N0, N0) slice.
    """
    _check_positive_int("n0", n0)
    mesh = _check_mesh(make_mesh() if mesh is None else mesh)
    shape = (mesh.size, *batch_shape, n0, n0)
    split = NamedSharding(mesh, _device_spec(mesh, len(shape), 0))

    def zeros() -> CompensatedSum:
        return CompensatedSum(
            jnp.zeros(shape, dtype, device=split), jnp.zeros(shape, dtype, device=split)
        )

    return ShardedGramStats(
        gram=zeros(),
        cross=zeros(),
        count=jnp.zeros((), jnp.int32, device=NamedSharding(mesh, P())),
        float_gram=zeros() if track_error else None,
    )


def _kahan_add(running: CompensatedSum, value: jax.Array) -> CompensatedSum:
    """running + value, Kahan-compensated (XLA keeps float additions in order: no reassociation)."""
    corrected = value - running.compensation
    total = running.total + corrected
    return CompensatedSum(total, (total - running.total) - corrected)


@functools.partial(jax.jit, static_argnames="mesh", donate_argnums=0)
def _gram_stats_update(
    stats: ShardedGramStats, x: jax.Array, x_tilde: jax.Array, num_rows: jax.Array, *, mesh: Mesh
) -> ShardedGramStats:
    dtype = stats.gram.total.dtype
    rows = x.shape[-2]
    pad = [(0, 0)] * (x.ndim - 2) + [(0, -rows % mesh.size), (0, 0)]
    # Zero rows add nothing to X~ᵀX~ or X~ᵀX.
    x, x_tilde = (jnp.pad(a.astype(dtype), pad) for a in (x, x_tilde))

    def add_local_rows(local: ShardedGramStats, x_local, x_tilde_local) -> ShardedGramStats:
        xt_t = jnp.swapaxes(x_tilde_local, -1, -2)

        def add(running, a, b):
            if running is None:
                return None
            product = jnp.matmul(a, b, precision=_HIGHEST)[None]
            return _kahan_add(running, product)

        return ShardedGramStats(
            add(local.gram, xt_t, x_tilde_local),
            add(local.cross, xt_t, x_local),
            local.count,
            add(local.float_gram, jnp.swapaxes(x_local, -1, -2), x_local),
        )

    spec = _partial_sums_spec(mesh, stats)
    rows_spec = _device_spec(mesh, x.ndim, x.ndim - 2)
    x, x_tilde = _lay_out((x, x_tilde), mesh, rows_spec)
    updated = jax.shard_map(
        add_local_rows, mesh=mesh, in_specs=(spec, rows_spec, rows_spec), out_specs=spec
    )(stats, x, x_tilde)
    return updated._replace(count=stats.count + num_rows)


def _place_rows(name: str, value: ArrayLike, mesh: Mesh, rows_axis: int) -> tuple[jax.Array, int]:
    """This process's calibration rows as one global array split by rows over the mesh.

    A `jax.Array` on a single process stays where it is when it is already on the mesh's devices
    (the update reshards it); one elsewhere, e.g. committed to one device, is padded with zero
    rows and split over the mesh. Otherwise each process's rows go straight to its own devices,
    padded with zero rows so that every device holds the same number: processes may pass
    different numbers of rows.

    Returns:
      The global array and its number of rows before padding, over all processes.
    """
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        if value.sharding.device_set != set(mesh.devices.flat):
            raise ValueError(f"{name} is a global array on devices other than the statistics' mesh")
        return value, value.shape[rows_axis]
    if isinstance(value, jax.Array) and jax.process_count() == 1:
        rows = value.shape[rows_axis]
        if value.sharding.device_set != set(mesh.devices.flat):
            pad = [(0, 0)] * value.ndim
            pad[rows_axis] = (0, -rows % mesh.size)
            split = NamedSharding(mesh, _device_spec(mesh, value.ndim, rows_axis))
            value = jax.device_put(jnp.pad(value, pad), split)
        return value, rows
    local = np.asarray(value)
    local_devices = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    rows = local.shape[rows_axis]
    if jax.process_count() == 1:
        counts = [(rows, len(local_devices))]
    else:
        counts = multihost_utils.process_allgather(np.array([rows, len(local_devices)], np.int64))
    per_device = int(max(math.ceil(r / n) for r, n in counts))
    pad = [(0, 0)] * local.ndim
    pad[rows_axis] = (0, per_device * len(local_devices) - rows)
    local = np.pad(local, pad)
    global_shape = list(local.shape)
    global_shape[rows_axis] = per_device * mesh.size
    sharding = NamedSharding(mesh, _device_spec(mesh, local.ndim, rows_axis))
    placed = jax.make_array_from_process_local_data(sharding, local, tuple(global_shape))
    return placed, int(sum(r for r, _ in counts))


def gram_stats_update(
    stats: ShardedGramStats, x: ArrayLike, x_tilde: ArrayLike
) -> ShardedGramStats:
    """Adds one calibration batch, data-parallel: each device sums the products of its rows.

    On several processes this is a collective: call it the same number of times on every
    process, each with that process's own rows (the numbers of rows may differ, even be zero;
    the batch shape and N0 may not). A global `jax.Array` on the statistics' mesh is also
    accepted.

    Args:
      stats: the running `ShardedGramStats` (their buffers are donated: do not reuse `stats`).
      x: the batch's inputs to the layer in the float network, shape batch_shape + (m, N0).
      x_tilde: the same batch's inputs in the partly quantized network, same shape.

    Returns:
      The updated `ShardedGramStats`.
    """
    mesh = _check_mesh(stats.mesh)
    batch_ndim = stats.gram.total.ndim - 3
    x = _checked_rows("x", x, batch_ndim)
    x_tilde = _checked_rows("x_tilde", x_tilde, batch_ndim)
    if x.shape != x_tilde.shape:
        raise ValueError(
            f"x and x_tilde must have the same shape, got {x.shape} and {x_tilde.shape}"
        )
    batch_shape, n0 = stats.gram.total.shape[1:-2], stats.gram.total.shape[-1]
    if x.ndim != batch_ndim + 2 or x.shape[:-2] != batch_shape or x.shape[-1] != n0:
        raise ValueError(
            f"x has shape {x.shape}, but the statistics expect batch_shape + (m, N0) = "
            f"{batch_shape} + (m, {n0})"
        )
    rows_axis = x.ndim - 2
    x, num_rows = _place_rows("x", x, mesh, rows_axis)
    x_tilde, _ = _place_rows("x_tilde", x_tilde, mesh, rows_axis)
    return _gram_stats_update(stats, x, x_tilde, jnp.int32(num_rows), mesh=mesh)


def _checked_rows(name: str, value: ArrayLike, batch_ndim: int) -> jax.Array | np.ndarray:
    """Calibration rows checked where they are: on the host, or on this process's devices."""
    array = value if isinstance(value, jax.Array) else np.asarray(value)
    if not jnp.issubdtype(array.dtype, jnp.floating):
        raise ValueError(f"{name} must be a floating-point array, got dtype {array.dtype}")
    if array.ndim != batch_ndim + 2:
        raise ValueError(f"{name} must have {batch_ndim + 2} dimensions, got shape {array.shape}")
    if isinstance(array, np.ndarray):  # checked on the host: not copied to one device
        if not np.all(np.isfinite(array)):
            raise ValueError(f"{name} contains NaN or Inf")
    elif array.is_fully_addressable:  # a global array spans other hosts' rows: they check them
        _check_finite(name, array)
    return array


@jax.jit
def combine_stats(stats: ShardedGramStats) -> GramStats:
    """Adds the devices' partial sums into the statistics of all calibration rows.

    The result is an ordinary `qjax.GramStats` (replicated on the mesh), for
    `qjax.relative_error` or the single-device `qjax.gpfq_from_stats`. `gpfq_from_stats` below
    does not need it: it combines G and H itself, keeping H split by column.

    Args:
      stats: `ShardedGramStats`.

    Returns:
      `GramStats` with G = X~ᵀX~, H = X~ᵀX (and XᵀX when tracked) of every row.
    """

    def total(running):
        return None if running is None else jnp.sum(running.value(), axis=0)

    return GramStats(total(stats.gram), total(stats.cross), stats.count, total(stats.float_gram))


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


def _per_neuron_padded(alphabet: AnyAlphabet, batch_shape: tuple[int, ...], n1: int, pad: int):
    """Alphabet leaves broadcast to one alphabet per neuron, batch_shape + (N1 + pad,) (+ letters);
    padded neurons repeat the last neuron's alphabet."""
    letters_ndim = 1 if isinstance(alphabet, Alphabet) else 0

    def broadcast(leaf):
        shape = (*batch_shape, n1, *leaf.shape[leaf.ndim - letters_ndim :])
        widths = [(0, 0)] * len(shape)
        widths[len(batch_shape)] = (0, pad)
        return jnp.pad(jnp.broadcast_to(leaf, shape), widths, mode="edge")

    return jax.tree.map(broadcast, alphabet)


@functools.partial(jax.jit, static_argnames=("mesh", "block_size", "dead_tol"))
def _gpfq_sharded(
    w: jax.Array,
    stats: ShardedGramStats,
    alphabet: AnyAlphabet,
    *,
    mesh: Mesh,
    block_size: int,
    dead_tol: float,
) -> jax.Array:
    devices = mesh.size
    *batch_shape, n0, n1 = w.shape
    nb = len(batch_shape)
    pad0, pad1 = -n0 % devices, -n1 % devices
    # Padded inputs are dead (G_tt = 0) and uncorrelated; padded neurons are dropped below.
    square_pad = [(0, 0)] * (nb + 1) + [(0, pad0), (0, pad0)]
    gram = jnp.pad(stats.gram.value(), square_pad)
    cross = jnp.pad(stats.cross.value(), square_pad)
    w_padded = jnp.pad(w.astype(gram.dtype), [(0, 0)] * nb + [(0, pad0), (0, pad1)])
    alphabet = _per_neuron_padded(alphabet, tuple(batch_shape), n1, pad1)

    def quantize_local_neurons(gram_local, cross_local, w_local, alphabet_local):
        gram = jax.lax.psum(gram_local[0], mesh.axis_names)
        cross_columns = jax.lax.psum_scatter(
            cross_local[0], mesh.axis_names, scatter_dimension=nb + 1, tiled=True
        )
        target = _ring_targets(
            cross_columns, w_local, axis_names=mesh.axis_names, num_devices=devices
        )
        quantize = functools.partial(gpfq_from_targets, block_size=block_size, dead_tol=dead_tol)
        for _ in range(nb):
            quantize = jax.vmap(quantize)
        return quantize(w_local, target, gram, alphabet_local)

    partial_spec = _device_spec(mesh, gram.ndim, 0)
    neuron_spec = _device_spec(mesh, w_padded.ndim, nb + 1)
    alphabet_spec = jax.tree.map(lambda leaf: _device_spec(mesh, leaf.ndim, nb), alphabet)
    gram, cross, w_padded, alphabet = _lay_out(
        (gram, cross, w_padded, alphabet),
        mesh,
        (partial_spec, partial_spec, neuron_spec, alphabet_spec),
    )
    q = jax.shard_map(
        quantize_local_neurons,
        mesh=mesh,
        in_specs=(partial_spec, partial_spec, neuron_spec, alphabet_spec),
        out_specs=neuron_spec,
    )(gram, cross, w_padded, alphabet)
    if pad1:  # N1 is not a multiple of D: the padded neurons' codes are dropped from a gathered q
        q = _lay_out(q, mesh, P())
    return q[..., :n0, :n1].astype(w.dtype)


def gpfq_from_stats(
    w: ArrayLike,
    stats: ShardedGramStats,
    alphabet: AnyAlphabet,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
    dead_tol: float = DEFAULT_DEAD_TOL,
) -> jax.Array:
    """GPFQ of one layer with its neurons split over the statistics' mesh.

    G is combined by a psum and replicated, H by a reduce-scatter into column blocks; W, the
    targets and the codes are split by neuron. The codes are those of `qjax.gpfq_from_stats` on
    the combined statistics.

    Args:
      w: weights, shape batch_shape + (N0, N1) (batch_shape as in `stats`).
      stats: `ShardedGramStats` of the layer's calibration inputs.
      alphabet: the alphabet A; scalar parameters, or per neuron ((N1,) or batch_shape + (N1,)).
      block_size: B, the number of inputs per lazy-batch block (a speed knob only).
      dead_tol: inputs with G_tt <= dead_tol·max_s G_ss are dead.

    Returns:
      q, the quantized weights, same shape and dtype as w, split by neuron over the mesh.
    """
    mesh = _check_mesh(stats.mesh)
    total_shape = stats.gram.total.shape[1:]
    w = _check_matrix("w", w, batch_ndim=len(total_shape) - 2)
    _check_finite("w", w)
    if total_shape[-2:] != (w.shape[-2],) * 2 or total_shape[:-2] != w.shape[:-2]:
        raise ValueError(
            f"w has shape {w.shape} (batch_shape + (N0, N1)) but the statistics are for "
            f"batch_shape + (N0, N0) = {total_shape}"
        )
    for name, running in (("stats.gram", stats.gram), ("stats.cross", stats.cross)):
        if running.total.is_fully_addressable:  # across hosts, each host checked its own rows
            _check_finite(name, running.total)
    _check_alphabet(alphabet)
    _check_positive_int("block_size", block_size)
    return _gpfq_sharded(w, stats, alphabet, mesh=mesh, block_size=block_size, dead_tol=dead_tol)


def _batching(rows: int, batch_size: int | None) -> tuple[int, int]:
    """Rows per batch and the number of batches, the same on every process.

    `gram_stats_update` is a collective: every process makes the same number of calls, those
    with fewer rows passing empty batches.
    """
    if batch_size is not None:
        _check_positive_int("batch_size", batch_size)
    if jax.process_count() == 1:
        rows_per_process = [rows]
    else:
        rows_per_process = multihost_utils.process_allgather(np.array(rows, np.int64)).tolist()
    if sum(rows_per_process) == 0:
        raise ValueError("x has no rows: GPFQ needs at least one calibration sample")
    step = max(rows_per_process) if batch_size is None else batch_size
    return step, max(math.ceil(r / step) for r in rows_per_process)


def gpfq_layer(
    w: ArrayLike,
    x: ArrayLike,
    x_tilde: ArrayLike,
    alphabet: AnyAlphabet,
    *,
    mesh: Mesh | None = None,
    batch_size: int | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    dead_tol: float = DEFAULT_DEAD_TOL,
) -> jax.Array:
    """GPFQ of one dense layer over a mesh: `qjax.gpfq_layer` with rows and neurons sharded.

    Args:
      w: weights W, shape (N0, N1).
      x: X, this process's calibration inputs in the float network, shape (m, N0).
      x_tilde: X~, the same rows in the partly quantized network, shape (m, N0).
      alphabet: the alphabet A.
      mesh: the devices (default: all devices of all processes).
      batch_size: rows per accumulation step (default: all at once).
      block_size: inputs per lazy-batch block.
      dead_tol: relative threshold on ||X~_t||² below which input t is dead.

    Returns:
      Q, shape (N0, N1), every entry a letter of A.
    """
    w = _check_matrix("w", w, batch_ndim=0)
    rows = np.shape(x)[0]
    step, num_batches = _batching(rows, batch_size)
    stats = gram_stats_init(w.shape[0], mesh=mesh, dtype=jnp.result_type(w.dtype, jnp.float32))
    for start in range(0, num_batches * step, step):
        batch = slice(start, start + step)
        stats = gram_stats_update(stats, x[batch], x_tilde[batch])
    return gpfq_from_stats(w, stats, alphabet, block_size=block_size, dead_tol=dead_tol)


def gpfq_conv(
    kernel: ArrayLike,
    x: ArrayLike,
    x_tilde: ArrayLike,
    alphabet: AnyAlphabet,
    *,
    geometry: ConvGeometry,
    mesh: Mesh | None = None,
    batch_size: int | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    dead_tol: float = DEFAULT_DEAD_TOL,
) -> jax.Array:
    """GPFQ of one convolution over a mesh: images data-parallel, output channels split.

    Each device extracts the patches of its own images (`qjax.patches.conv_patches`), so the
    patch matrix is never gathered on one device.

    Args:
      kernel: the kernel, shape (*window, cin/groups, cout).
      x: this process's input images in the float network, shape (batch, *spatial, cin).
      x_tilde: the same images in the partly quantized network.
      alphabet: the alphabet A, per layer or per output channel ((cout,) parameters).
      geometry: the conv's `ConvGeometry`.
      mesh: the devices (default: all devices of all processes).
      batch_size: images per accumulation step (default: all at once).
      block_size: inputs per lazy-batch block.
      dead_tol: relative threshold on ||X~_t||² below which input t is dead.

    Returns:
      The quantized kernel, same shape as `kernel`.
    """
    matrices = kernel_to_matrix(kernel, geometry)
    groups = geometry.feature_group_count
    if np.shape(x) != np.shape(x_tilde):
        raise ValueError(
            f"x and x_tilde must have the same shape, got {np.shape(x)} and {np.shape(x_tilde)}"
        )
    cin = matrices.shape[1] // geometry.window_size * groups
    if len(np.shape(x)) != len(geometry.kernel_size) + 2 or np.shape(x)[-1] != cin:
        raise ValueError(
            f"x must have shape (batch, *spatial, {cin}) for a kernel of shape "
            f"{np.shape(kernel)}, got {np.shape(x)}"
        )
    step, num_batches = _batching(np.shape(x)[0], batch_size)
    stats = gram_stats_init(matrices.shape[1], mesh=mesh, batch_shape=(groups,))
    mesh = stats.mesh
    for start in range(0, num_batches * step, step):
        batch = slice(start, start + step)
        # Images split over the devices: each device computes the patches of its own images.
        (images_x, _), (images_tilde, _) = (
            _place_rows(name, value[batch], mesh, rows_axis=0)
            for name, value in (("x", x), ("x_tilde", x_tilde))
        )
        stats = gram_stats_update(
            stats, conv_patches(images_x, geometry), conv_patches(images_tilde, geometry)
        )
    group_alphabet = _split_channels(alphabet, groups)
    q = gpfq_from_stats(matrices, stats, group_alphabet, block_size=block_size, dead_tol=dead_tol)
    return matrix_to_kernel(q, geometry)
