"""Streamed second-moment statistics of a layer's calibration inputs: the data every method reads.

For a layer with weights W (N0 × N1), float-network inputs X (m × N0) and quantized-network
inputs X~ (m × N0), GPFQ, GPTQ and their successors need only

    G = X~ᵀX~,    H = X~ᵀX    (and XᵀX, to report ||XW - X~Q|| / ||XW||),

N0 × N0 matrices summed over calibration batches, so memory does not grow with m.

One device or many. With `mesh=` (`make_mesh()`, or any `jax.sharding.Mesh`, whose axes are used
together as one axis of D devices) the same functions accumulate data-parallel: the rows of each
batch are split over the devices, device d adds the products of its own rows to its own partial
sums, and no device ever holds all of X. The result is still a `GramStats`, whose arrays carry a
leading device axis (see `GramStats`); the partial sums are added only when they are read:
`combined` adds them (what GPTQ, MSQ and `relative_error` see), and GPFQ adds G by a psum and H by
a reduce-scatter that leaves each device the column blocks its neurons need (`qjax.methods.gpfq`).
On several hosts, start every process with `jax.distributed.initialize(...)`, build the mesh from
all processes' devices and make the same calls on every process, each passing its own rows (their
numbers may differ). Row counts that do not divide D are padded with zero rows, which add nothing.

Numerics: one summation scheme, plain float32. Each batch's products run at full float32
precision (`Precision.HIGHEST`: no TF32/bfloat16 passes on GPUs) and are added to the running sums
in float32 (float64 with `jax_enable_x64` and float64 inputs, or `dtype=jnp.float64`); with a mesh
each device sums its own batches so, and the D partial sums are added once. Kahan's compensated
summation was measured against it (`python -m benchmarks.gpfq_scale --summation --repeats 5`:
10⁶ rows of 128 ReLU features in 3,907 batches of 256 rows, against float64 sums):

    relative error of G (Frobenius / worst entry): plain 9.7e-7 / 3.8e-6, Kahan 2.8e-8 / 5.9e-8
    GPFQ 4-bit codes (128 × 512) unlike those from the float64 statistics: 0 of 65,536 for plain,
      for Kahan, and for the float64 statistics rounded to float32
    CPU time of the accumulation per batch of 256 rows, N0 = 784 / 2048: plain 5.8 / 65 ms,
      Kahan 8.2 / 90 ms (1.41× / 1.38×)

Compensated sums are 35 times closer to float64, but the plain error (10⁻⁶ relative) changed no
code, no more than rounding the float64 sums to float32 did. Compensation would cost ~1.4× the
time of the accumulation and double the statistics' memory (2 · N0² more floats per device: 1 GB
at N0 = 11008). Plain summation it is; accumulate in float64 where more is needed.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from qjax import _mesh
from qjax.checks import check_positive_int

__all__ = [
    "GramStats",
    "accumulate",
    "combined",
    "gram_stats",
    "gram_stats_init",
    "gram_stats_update",
    "make_mesh",
    "relative_error",
]

_HIGHEST = jax.lax.Precision.HIGHEST
# X~ᵀX~ is symmetric: its products are taken on the upper triangle of a grid of at most
# GRAM_BLOCKS × GRAM_BLOCKS column blocks of at least GRAM_BLOCK_MIN columns (measured on 2 CPU
# cores: 0.77-0.86 of the full product's time at N0 = 784 and 1152, up to 4 blocks).
GRAM_BLOCKS = 4
GRAM_BLOCK_MIN = 256


DEFAULT_AXIS_NAME = "devices"


class GramStats(NamedTuple):
    """Second-moment statistics of a layer's calibration inputs, summed over rows.

    Two layouts, told apart by the rank of `count` (static, so it holds under `jax.jit`):

    * one device: the arrays below, `count` a scalar;
    * data-parallel over a mesh of D devices (`gram_stats_init(..., mesh=)`): per-device partial
      sums. Every array has a leading axis of length D split over the mesh (device d holds the
      sums over the rows it received, shape (1, *batch_shape, N0, N0)), and `count` has shape
      (D,): the rows of each device (replicated). `combined` adds them up; `per_device` is True.

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

    @property
    def per_device(self) -> bool:
        """Whether these are per-device partial sums over a mesh (leading device axis)."""
        return jnp.ndim(self.count) == 1


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


def gram_stats_init(
    n0: int,
    *,
    batch_shape: tuple[int, ...] = (),
    track_error: bool = False,
    dtype: jnp.dtype = jnp.float32,
    mesh: Mesh | None = None,
) -> GramStats:
    """Zero statistics for a layer with `n0` inputs.

    Args:
      n0: the number of inputs N0.
      batch_shape: leading dimensions, e.g. (groups,) for a grouped convolution.
      track_error: also accumulate XᵀX, so that `relative_error` can be computed.
      dtype: accumulation dtype (float32 by default; float64 needs `jax_enable_x64`).
      mesh: accumulate data-parallel over this mesh's devices (and hosts): per-device partial
        sums, see `GramStats`. Every running process must own some of its devices.

    Returns:
      `GramStats` of zeros.
    """
    check_positive_int("n0", n0)
    shape = (*batch_shape, n0, n0)
    if mesh is None:
        device_axis, count_device, device = (), None, None
    else:
        mesh = _mesh.check_mesh(mesh)
        device_axis = (mesh.size,)
        count_device = NamedSharding(mesh, P())
        device = NamedSharding(mesh, _mesh.split(mesh, len(shape) + 1, 0))

    def zeros():
        return jnp.zeros((*device_axis, *shape), dtype, device=device)

    return GramStats(
        gram=zeros(),
        cross=zeros(),
        count=jnp.zeros(device_axis, jnp.int32, device=count_device),
        float_gram=zeros() if track_error else None,
    )


def accumulate(stats: GramStats, x: jax.Array, x_tilde: jax.Array) -> GramStats:
    """Adds X~ᵀX~, X~ᵀX (and XᵀX) of one batch of rows: the pure, traceable update.

    This is the update of single-device statistics; with a mesh, each device runs it on its own
    rows (`gram_stats_update`). When `x_tilde` is `x` (the same array or tracer: a first layer,
    where X~ = X), one product X~ᵀX~ serves as both.

    Args:
      stats: the running `GramStats`.
      x: rows of X, shape batch_shape + (m, N0).
      x_tilde: rows of X~, the same shape.

    Returns:
      The updated `GramStats`.
    """
    dtype = stats.gram.dtype
    same = x_tilde is x
    x, x_tilde = x.astype(dtype), x_tilde.astype(dtype)
    # Contract the row axis: (..., m, N0)ᵀ(..., m, N0) -> (..., N0, N0), in full float32 precision
    # (on GPUs the default float32 matmul precision would use TF32 and lose the small residuals).
    gram_product = _symmetric_gram(x_tilde)
    cross_product = (
        gram_product if same else jnp.matmul(jnp.swapaxes(x_tilde, -1, -2), x, precision=_HIGHEST)
    )
    gram, cross = stats.gram + gram_product, stats.cross + cross_product
    float_gram = stats.float_gram
    if float_gram is not None:
        float_product = gram_product if same else _symmetric_gram(x)
        float_gram = float_gram + float_product
    return GramStats(gram, cross, stats.count + x.shape[-2], float_gram)


def _symmetric_gram(a: jax.Array) -> jax.Array:
    """AᵀA for rows a (..., m, N0) from the products of its upper block triangle only.

    The columns are split into k ≤ `GRAM_BLOCKS` blocks of at least `GRAM_BLOCK_MIN` columns;
    the k(k+1)/2 products on and above the diagonal are computed and the rest are their
    transposes, (k + 1)/2k of the work of the full product (5/8 for k = 4), and AᵀA comes out
    exactly symmetric.
    """
    n0 = a.shape[-1]
    k = max(1, min(GRAM_BLOCKS, n0 // GRAM_BLOCK_MIN))
    bounds = [round(i * n0 / k) for i in range(k + 1)]
    columns = [a[..., bounds[i] : bounds[i + 1]] for i in range(k)]
    blocks = [[None] * k for _ in range(k)]
    for i in range(k):
        for j in range(i, k):
            product = jnp.matmul(jnp.swapaxes(columns[i], -1, -2), columns[j], precision=_HIGHEST)
            blocks[i][j], blocks[j][i] = product, jnp.swapaxes(product, -1, -2)
    return jnp.block(blocks)


_accumulate_jit = jax.jit(accumulate, donate_argnums=0)
# X~ = X: one array, so that `accumulate` sees it twice and computes one product.
_accumulate_same_jit = jax.jit(lambda stats, x: accumulate(stats, x, x), donate_argnums=0)


@functools.partial(jax.jit, static_argnames="mesh", donate_argnums=0)
def _accumulate_on_mesh(
    stats: GramStats, x: jax.Array, x_tilde: jax.Array, rows: jax.Array, *, mesh: Mesh
) -> GramStats:
    """`accumulate` on every device of `mesh`, each on its own block of rows.

    Args:
      stats: per-device `GramStats` on `mesh`.
      x: rows of X, shape batch_shape + (m, N0), m a multiple of D: block d is device d's.
      x_tilde: rows of X~, the same shape.
      rows: (D,) the real rows of each block (the others are zero padding).
    """
    partial = _mesh.split(mesh, stats.gram.ndim, 0)
    spec = GramStats(partial, partial, P(), None if stats.float_gram is None else partial)
    rows_spec = _mesh.split(mesh, x.ndim, x.ndim - 2)

    def add_own_rows(local: GramStats, x_local, x_tilde_local) -> GramStats:
        sums = jax.tree.map(lambda a: a[0], local._replace(count=local.count[:1]))
        own = jax.tree.map(lambda a: a[None], accumulate(sums, x_local, x_tilde_local))
        return own._replace(count=local.count)  # counted below, real rows only

    x, x_tilde = _mesh.lay_out((x, x_tilde), mesh, rows_spec)
    updated = jax.shard_map(
        add_own_rows, mesh=mesh, in_specs=(spec, rows_spec, rows_spec), out_specs=spec
    )(stats, x, x_tilde)
    return updated._replace(count=stats.count + rows)


def _checked_rows(name: str, value: ArrayLike, batch_ndim: int | None = None):
    """`value`'s dtype and rank checked where it lies: a host array stays on the host (with a
    mesh, each device receives only its own rows)."""
    array = value if isinstance(value, jax.Array) else np.asarray(value)
    if not jnp.issubdtype(array.dtype, jnp.floating):
        raise ValueError(f"{name} must be a floating-point array, got dtype {array.dtype}")
    if batch_ndim is None and array.ndim < 2:
        raise ValueError(f"{name} must have at least 2 dimensions (..., m, N0), got {array.shape}")
    if batch_ndim is not None and array.ndim != batch_ndim + 2:
        raise ValueError(f"{name} must have {batch_ndim + 2} dimensions, got shape {array.shape}")
    return array


def _mesh_of_stats(stats: GramStats) -> Mesh:
    mesh = _mesh.mesh_of(stats.gram)
    if mesh is None:
        raise ValueError(
            "stats are per-device partial sums (count has shape (D,)) but are not laid out on a "
            "mesh here: build them with gram_stats_init(..., mesh=) and update them outside jit"
        )
    return _mesh.check_mesh(mesh)


def gram_stats_update(stats: GramStats, x: ArrayLike, x_tilde: ArrayLike) -> GramStats:
    """Adds one calibration batch to the statistics (streaming accumulation).

    With per-device statistics (`gram_stats_init(..., mesh=)`) the rows are split over the mesh's
    devices, each adding the products of its own rows. On several processes this is a collective:
    call it the same number of times on every process, each with that process's own rows (their
    numbers may differ, even be zero; batch_shape and N0 may not). A global `jax.Array` on the
    mesh's devices is also accepted.

    Args:
      stats: the running `GramStats` (their buffers are donated: do not reuse `stats`).
      x: the batch's inputs to the layer in the float network, shape batch_shape + (m, N0).
      x_tilde: the same batch's inputs in the partly quantized network, same shape.

    Returns:
      The updated `GramStats`.
    """
    total_shape = stats.gram.shape[stats.count.ndim :]  # without the device axis
    same = x_tilde is x
    x = _checked_rows("x", x, batch_ndim=len(total_shape) - 2)
    x_tilde = x if same else _checked_rows("x_tilde", x_tilde, batch_ndim=len(total_shape) - 2)
    if x.shape != x_tilde.shape:
        raise ValueError(
            f"x and x_tilde must have the same shape, got {x.shape} and {x_tilde.shape}"
        )
    if x.shape[:-2] != total_shape[:-2] or x.shape[-1] != total_shape[-1]:
        raise ValueError(
            f"x has shape {x.shape}, but the statistics expect batch_shape + (m, N0) = "
            f"{total_shape[:-2]} + (m, {total_shape[-1]})"
        )
    if not stats.per_device:
        if same:
            return _accumulate_same_jit(stats, x)
        return _accumulate_jit(stats, x, x_tilde)
    mesh = _mesh_of_stats(stats)
    x, rows = _mesh.place_rows("x", x, mesh, rows_axis=x.ndim - 2)
    x_tilde, _ = _mesh.place_rows("x_tilde", x_tilde, mesh, rows_axis=x.ndim - 2)
    return _accumulate_on_mesh(stats, x, x_tilde, rows.astype(np.int32), mesh=mesh)


def gram_stats(
    x: ArrayLike,
    x_tilde: ArrayLike,
    *,
    batch_size: int | None = None,
    track_error: bool = False,
    mesh: Mesh | None = None,
) -> GramStats:
    """G = X~ᵀX~ and H = X~ᵀX of whole calibration matrices, summed `batch_size` rows at a time.

    Args:
      x: float-network inputs, shape (..., m, N0); with a mesh on several processes, this
        process's rows.
      x_tilde: quantized-network inputs, same shape.
      batch_size: rows per accumulation step (default: all rows at once).
      track_error: also accumulate XᵀX for `relative_error`.
      mesh: accumulate data-parallel over this mesh (see `gram_stats_init`).

    Returns:
      `GramStats`.
    """
    same = x_tilde is x  # X~ = X: one product per batch serves G and H
    x = _checked_rows("x", x)
    x_tilde = x if same else _checked_rows("x_tilde", x_tilde)
    if mesh is None:  # on the device once, not per batch
        x = jnp.asarray(x)
        x_tilde = x if same else jnp.asarray(x_tilde)
    if batch_size is not None:
        check_positive_int("batch_size", batch_size)
    stats = gram_stats_init(
        x.shape[-1],
        batch_shape=x.shape[:-2],
        track_error=track_error,
        dtype=jnp.result_type(x.dtype, jnp.float32),  # float64 inputs keep float64 (with x64)
        mesh=mesh,
    )
    for rows in _mesh.row_slices(x.shape[-2], batch_size, mesh):
        x_rows = x[..., rows, :]
        stats = gram_stats_update(stats, x_rows, x_rows if same else x_tilde[..., rows, :])
    return stats


@jax.jit
def _add_partial_sums(stats: GramStats) -> GramStats:
    return jax.tree.map(lambda a: jnp.sum(a, axis=0), stats)


def combined(stats: GramStats) -> GramStats:
    """The statistics of all rows: per-device partial sums added up, others as they are.

    Pure and traceable. Per-device sums give arrays replicated on their mesh.

    Args:
      stats: `GramStats`, per device or not.

    Returns:
      `GramStats` with G, H (and XᵀX) of every row and the total row count.
    """
    return _add_partial_sums(stats) if stats.per_device else stats


def relative_error(w: ArrayLike, q: ArrayLike, stats: GramStats) -> jax.Array:
    """||XW - X~Q||_F / ||XW||_F from statistics accumulated with `track_error=True`.

    Uses ||XW - X~Q||² = tr(WᵀXᵀXW) - 2 tr(WᵀHᵀQ) + tr(QᵀGQ), H = X~ᵀX, G = X~ᵀX~.

    Args:
      w: the float weights, shape batch_shape + (N0, N1).
      q: the quantized weights, same shape.
      stats: `GramStats` with `float_gram` (per device or not).

    Returns:
      The relative error, a scalar (summed over batch_shape).
    """
    stats = combined(stats)
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
