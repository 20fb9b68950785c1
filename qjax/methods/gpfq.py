"""GPFQ on a layer: the mesh (neurons split over devices) and the layer-level drivers.

The algorithm and the method object are in `qjax.methods.gpfq_core` (pure, traceable); this
module integrates them:

* `gpfq_layer` and `gpfq_conv` compute a dense or convolution layer's statistics from its
  calibration inputs (a convolution's patches a bounded chunk at a time) and quantize it, in the
  "gram" form (the `GPFQ` method) or the paper's "residual" form (`form="residual"`);
* `gpfq_from_stats` is the functional form of `GPFQ(...).quantize`.

One device or many. Statistics accumulated over a mesh (`qjax.stats.gram_stats_init(...,
mesh=)`: per-device partial sums) are read without gathering H: each device adds up G (psum)
and receives a block of H's columns (reduce-scatter), builds the targets Σ_{s≤t} H_ts w_s of its
block of neurons as the blocks of H pass round a ring (`ppermute`), and runs the scan on them
(`gpfq_from_targets`, inside `jax.shard_map`). A neuron's scan reads only G and its own targets,
so the codes are those of one device. `gpfq_layer` and `gpfq_conv` take `mesh=` for both forms
(the residual form splits the neurons and gives every device all the rows). Sizes that do not
divide the number of devices are padded: dead, uncorrelated inputs and copies of the last neuron,
whose codes are dropped.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from qjax import _mesh
from qjax.alphabets import Alphabet, AnyAlphabet
from qjax.checks import check_alphabet, check_finite, check_matrix, check_positive_int
from qjax.methods.base import batch_axes, functional_form
from qjax.methods.gpfq_core import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_DEAD_TOL,
    GPFQ,
    gpfq_from_targets,
    gpfq_residual,
)
from qjax.patches import ConvGeometry, conv_patches, kernel_to_matrix, matrix_to_kernel
from qjax.stats import GramStats, accumulate, gram_stats, gram_stats_init, gram_stats_update

__all__ = ["GPFQ", "gpfq_conv", "gpfq_from_stats", "gpfq_from_targets", "gpfq_layer"]

# gpfq_conv, "gram": patch rows per accumulation step when batch_size is not given. Each step
# extracts the patches of one image or a few and folds them into G and H in one compiled program,
# so the patch matrices (kernel-size times larger than the images) stay small and in cache:
# measured on 2 shared CPU cores (3x3, 128 -> 128 channels, 32x32 images), 1024 rows took 0.97x
# the time of the Gram products on patches extracted beforehand, 2048 rows 1.31x, 4096 1.43x.
DEFAULT_CONV_CHUNK_ROWS = 1024
_HIGHEST = jax.lax.Precision.HIGHEST

gpfq_from_stats = functional_form(GPFQ)


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
        quantize = functools.partial(gpfq_residual, dead_tol=dead_tol)
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
    quantize = functools.partial(gpfq_residual, dead_tol=dead_tol)
    for level in range(w.ndim - 2):
        quantize = jax.vmap(quantize, in_axes=(0, 0, 0, batch_axes(alphabet, level + 1)))
    return quantize(w, x, x_tilde, alphabet)


def gpfq_layer(
    w: ArrayLike,
    x: ArrayLike,
    x_tilde: ArrayLike,
    alphabet: AnyAlphabet,
    *,
    form: Literal["gram", "residual"] = "gram",
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
      form: the scan's form: "gram" (default; the `GPFQ` method on statistics G, H, memory
        independent of m) or "residual" (the paper's form; memory m per neuron). Both give the
        same codes up to float rounding.
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
    same = x_tilde is x  # a first layer: one product serves G and H
    x = check_matrix("x", x, batch_ndim=0)
    x_tilde = x if same else check_matrix("x_tilde", x_tilde, batch_ndim=0)
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
    if form == "gram":
        stats = gram_stats(x, x_tilde, batch_size=batch_size, mesh=mesh)
        return gpfq_from_stats(w, stats, alphabet, block_size=block_size, dead_tol=dead_tol)
    if form == "residual":
        check_finite("w", w)
        check_alphabet(alphabet)
        q = _residual_codes(w, x, x_tilde, alphabet, dead_tol=dead_tol, mesh=mesh)
        return q.astype(w.dtype)
    raise ValueError(f"unknown form {form!r}; expected 'gram' or 'residual'")


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
    form: Literal["gram", "residual"] = "gram",
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
      form: "gram" or "residual", see `gpfq_layer`.
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
    same = x_tilde is x  # a first layer: one product serves G and H
    x = jnp.asarray(x)
    x_tilde = x if same else jnp.asarray(x_tilde)
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
    elif form == "gram":
        one_image = jax.ShapeDtypeStruct((1, *x.shape[1:]), x.dtype)
        positions = jax.eval_shape(conv_patches, one_image, geometry).shape[1]  # rows per image
        step = max(1, DEFAULT_CONV_CHUNK_ROWS // positions)
    else:
        step = None
    batches = _mesh.row_slices(x.shape[0], step, mesh)
    keys = (
        jax.random.split(key, len(batches)) if patch_fraction is not None else [None] * len(batches)
    )
    # (images, images_tilde or None when X~ = X, patch-subsample key) of each accumulation step.
    chunks = [
        (x[rows], None if same else x_tilde[rows], chunk_key)
        for rows, chunk_key in zip(batches, keys, strict=True)
    ]
    sampling = dict(geometry=geometry, patch_fraction=patch_fraction)

    if form == "gram":
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
    elif form == "residual":
        sampled = [_sampled_patches(*chunk, **sampling) for chunk in chunks]
        patches = jnp.concatenate([p for p, _ in sampled], axis=1)
        patches_tilde = jnp.concatenate([p_tilde for _, p_tilde in sampled], axis=1)
        check_alphabet(alphabet)
        q = _residual_codes(
            matrices, patches, patches_tilde, group_alphabet, dead_tol=dead_tol, mesh=mesh
        )
    else:
        raise ValueError(f"unknown form {form!r}; expected 'gram' or 'residual'")
    return matrix_to_kernel(q, geometry)


@functools.partial(jax.jit, static_argnames=("geometry", "patch_fraction"))
def _sampled_patches(
    images: jax.Array,
    images_tilde: jax.Array | None,
    key: jax.Array | None,
    *,
    geometry: ConvGeometry,
    patch_fraction: float | None,
) -> tuple[jax.Array, jax.Array]:
    """The patches of both image batches, the same random `patch_fraction` of rows of each
    (`images_tilde` None: X~ = X, and the same patch array is returned twice)."""
    patches = conv_patches(images, geometry)
    m = patches.shape[1]
    if patch_fraction is not None and m:  # a process may have no images left for this step
        keep = jax.random.choice(key, m, (max(1, round(patch_fraction * m)),), replace=False)
    else:
        keep = slice(None)
    patches = patches[:, keep]
    if images_tilde is None:
        return patches, patches
    return patches, conv_patches(images_tilde, geometry)[:, keep]


@functools.partial(jax.jit, static_argnames=("geometry", "patch_fraction"), donate_argnames="stats")
def _conv_stats_update(
    stats: GramStats,
    images: jax.Array,
    images_tilde: jax.Array | None,
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
