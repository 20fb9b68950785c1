"""Internal: arrays on a device mesh, behind the `mesh=` options of `qjax.stats` and GPFQ.

Nothing here is public API: pass `mesh=` to `qjax.stats.gram_stats_init` / `gram_stats`,
`qjax.gpfq_layer` or `qjax.gpfq_conv` (`qjax.stats.make_mesh` builds one).

A mesh's axes are used together as one axis of D devices, in the mesh's (row-major) device order:
"split over the mesh" means block d of an axis on device d. Calibration rows reach the devices as
one global array split by rows (`place_rows`): on several hosts each process contributes its own
rows, padded with zero rows so that every device holds the same number (zero rows add nothing to
X~ᵀX~, X~ᵀX or XᵀX, nor to GPFQ's residuals); the real rows of each device are counted.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from qjax.checks import check_finite, is_concrete


def check_mesh(mesh: Mesh) -> Mesh:
    """`mesh`, after checking that every running process owns some of its devices (each process
    feeds its own rows, so a mesh without some process's devices would leave its data out)."""
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


def mesh_of(array: jax.Array) -> Mesh | None:
    """The mesh a concrete array is laid out on; None for a traced array or another layout."""
    sharding = getattr(array, "sharding", None) if is_concrete(array) else None
    return sharding.mesh if isinstance(sharding, NamedSharding) else None


def split(mesh: Mesh, ndim: int, axis: int) -> P:
    """A PartitionSpec of rank `ndim` splitting `axis` over all the mesh's axes together."""
    spec = [None] * ndim
    spec[axis] = mesh.axis_names
    return P(*spec)


def lay_out(tree, mesh: Mesh, spec):
    """Inside jit: `tree` laid out as `spec` (a PartitionSpec, or a pytree of them) on `mesh`.

    Explicit-axis meshes (`jax.make_mesh`'s default) need `reshard`; Auto ones a constraint.
    """
    shardings = jax.tree.map(
        lambda s: NamedSharding(mesh, s), spec, is_leaf=lambda s: isinstance(s, P)
    )
    if all(kind == jax.sharding.AxisType.Explicit for kind in mesh.axis_types):
        return jax.sharding.reshard(tree, shardings)
    return jax.lax.with_sharding_constraint(tree, shardings)


def rows_per_process(rows: int, mesh: Mesh | None) -> list[int]:
    """The number of rows each process holds (a collective on several processes with a mesh)."""
    if mesh is None or jax.process_count() == 1:
        return [rows]
    return multihost_utils.process_allgather(np.array(rows, np.int64)).tolist()


def row_slices(rows: int, step: int | None, mesh: Mesh | None) -> list[slice]:
    """Batches of `step` of this process's `rows` rows (default: all at once).

    With a mesh on several processes every process gets as many batches (each batch's update is
    a collective), those with fewer rows passing empty ones.
    """
    per_process = rows_per_process(rows, mesh)
    if sum(per_process) == 0:
        raise ValueError("x has no rows: the statistics need at least one calibration row")
    step = max(per_process) if step is None else step
    return [slice(i * step, (i + 1) * step) for i in range(max(-(-r // step) for r in per_process))]


def block_rows(rows: int, devices: int) -> np.ndarray:
    """Rows of each device when `rows` rows, padded to a multiple of `devices`, are split evenly."""
    per_device = math.ceil(rows / devices)
    return np.clip(rows - per_device * np.arange(devices), 0, per_device)


def place_rows(
    name: str, value: ArrayLike, mesh: Mesh, rows_axis: int
) -> tuple[jax.Array, np.ndarray]:
    """This process's rows of `value`, as one global array split by rows over the mesh.

    Each device receives the same number of rows, zero rows padding the last blocks where needed.
    On one process the rows are split in order (a `jax.Array` anywhere, e.g. committed to one
    device, is moved). On several, each process's rows go straight from its host to its own
    devices; the processes may hold different numbers of rows, even none. A global `jax.Array`
    on the mesh's devices (several processes, every row real) is split in order, like one
    process's rows.

    Returns:
      The global array, and the number of real rows of each device, shape (D,), in mesh order.
    """
    devices = mesh.size
    sharding = NamedSharding(mesh, split(mesh, np.ndim(value), rows_axis))
    rows = np.shape(value)[rows_axis]
    is_global = isinstance(value, jax.Array) and not value.is_fully_addressable
    if is_global and value.sharding.device_set != set(mesh.devices.flat):
        raise ValueError(f"{name} is a global array on devices other than the mesh's")
    if is_global or jax.process_count() == 1:
        pad = [(0, 0)] * np.ndim(value)
        pad[rows_axis] = (0, -rows % devices)
        padded = jnp.pad(value, pad) if isinstance(value, jax.Array) else np.pad(value, pad)
        return jax.device_put(padded, sharding), block_rows(rows, devices)
    local = np.asarray(value)
    process_of = np.array([device.process_index for device in mesh.devices.flat])
    local_devices = np.sum(process_of == jax.process_index())
    counts = multihost_utils.process_allgather(np.array([rows, local_devices], np.int64))
    per_device = int(max(math.ceil(r / n) for r, n in counts))
    pad = [(0, 0)] * local.ndim
    pad[rows_axis] = (0, per_device * local_devices - rows)
    global_shape = list(local.shape)
    global_shape[rows_axis] = per_device * devices
    placed = jax.make_array_from_process_local_data(
        sharding, np.pad(local, pad), tuple(global_shape)
    )
    # Process p fills its devices in mesh order, per_device rows each, then zero rows.
    real = np.zeros(devices, np.int64)
    for process, (process_rows, _) in enumerate(counts):
        mine = process_of == process
        real[mine] = np.clip(process_rows - per_device * np.arange(mine.sum()), 0, per_device)
    return placed, real


def check_finite_here(name: str, value: jax.Array) -> None:
    """`check_finite` of the part of `value` this process holds (all of it on one process)."""
    if is_concrete(value) and isinstance(value, jax.Array) and not value.is_fully_addressable:
        for shard in value.addressable_shards:
            check_finite(name, shard.data)
    else:
        check_finite(name, value)
