"""`quantize_model`: quantize a whole Flax model layer by layer, in call order.

As in Lybrand & Saab, layer l is quantized knowing two inputs of it on the calibration set:

* X, its input in the float network, and
* X~, its input in the network whose layers 1..l-1 are already quantized.

A framework adapter (`qjax.adapters`: Linen, NNX) finds the layers and captures X and X~; a
layer kind (`qjax.layers`) turns them into rows, summed into the layer's `GramStats` (X~ᵀX~,
X~ᵀX, XᵀX); the layer's method (`qjax.methods`: GPFQ, GPTQ, MSQ, ...) quantizes its weight
matrix from them, and the new kernel is written back. The engine asks neither which framework
nor which method it drives. Two schedules, the same codes:

* one pass: the float and the quantized model run side by side (the two members of a
  `jax.vmap`) in one compiled program over all calibration examples, each layer quantized
  inside it as the pass reaches it (`_LayerStep`, `Adapter.paired_pass`);
* layer by layer: for each layer, X and X~ are captured batch by batch and streamed into the
  statistics, so the calibration set never has to fit in memory (also over a device mesh).

Layers under `scan` (stacked kernels) are quantized slice by slice, each with its own X and X~.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.typing import ArrayLike
from tqdm.auto import tqdm

from qjax.adapters.base import Adapter, Layer, PairedPass
from qjax.adapters.linen import LinenAdapter
from qjax.adapters.nnx import NNXAdapter
from qjax.layers import Conv, ConvByChannel, LayerKind
from qjax.methods.msq import MSQ
from qjax.rules import DEFAULT_SPEC, LayerSpec, Rules
from qjax.stats import (
    GramStats,
    accumulate,
    gram_stats_init,
    gram_stats_update,
    relative_error,
)

__all__ = ["LayerReport", "format_report", "quantize_model"]

Calibration = ArrayLike | Sequence[ArrayLike] | Callable[[], Iterable[ArrayLike]]
RulesLike = Sequence[tuple[str, LayerSpec]] | Mapping[str, LayerSpec]


class LayerReport(NamedTuple):
    """What happened to one layer (one slice of a stacked layer).

    Attributes:
      path: the layer's path, e.g. "Dense_0", "blocks/attn/query"; a slice of a stacked layer
        has its index appended, "blocks/mlp/fc1[3]".
      kind: the layer kind ("Dense", "DenseGeneral", "Einsum", "Conv").
      method: the method's name ("skip": left float, no error computed).
      shape: the kernel's shape (of the slice).
      num_letters: letters of the alphabet (None when skipped).
      relative_error: ||XW - X~Q||_F / ||XW||_F on the calibration set.
      msq_relative_error: the same error had this layer's weights been rounded (MSQ) instead,
        with the same X~: the reference point.
      seconds: wall time spent on this layer: its statistics and quantization (layer by layer),
        or the time since the previous layer was done (one pass: the forward computation in
        between included, and for the first layer the tracing and compilation of the pass).
    """

    path: str
    kind: str
    method: str
    shape: tuple[int, ...]
    num_letters: int | None
    relative_error: float | None
    msq_relative_error: float | None
    seconds: float


def _calibration_batches(calibration: Calibration) -> Callable[[], Iterator[Any]]:
    """A function that restarts the calibration batches (they are read once per layer)."""
    if callable(calibration):
        return lambda: iter(calibration())
    if hasattr(calibration, "shape"):
        return lambda: iter([calibration])
    if isinstance(calibration, Iterator):
        raise ValueError(
            "calibration is a one-shot iterator, but it is read once per layer: pass an array, "
            "a list of batches, or a function returning a fresh iterator of batches"
        )
    if isinstance(calibration, Sequence) and calibration:
        return lambda: iter(calibration)
    raise ValueError(
        "calibration must be an array, a non-empty list of batches, or a function returning "
        f"an iterator of batches; got {type(calibration).__name__}"
    )


def _checked(batch: ArrayLike, first_shape: tuple[int, ...] | None) -> jax.Array:
    """A calibration batch: numbers (floating inputs, or integer token ids), finite, non-empty."""
    batch = jnp.asarray(batch)
    if not (jnp.issubdtype(batch.dtype, jnp.floating) or jnp.issubdtype(batch.dtype, jnp.integer)):
        raise ValueError(
            f"calibration batches must be floating point inputs or integer token ids, got dtype "
            f"{batch.dtype}"
        )
    if batch.ndim < 1 or batch.shape[0] == 0:
        raise ValueError(f"calibration batch has shape {batch.shape}: no examples")
    if first_shape is not None and batch.shape[1:] != first_shape[1:]:
        raise ValueError(
            f"calibration batch of shape {batch.shape} differs from the first batch "
            f"{first_shape} beyond the batch axis"
        )
    if jnp.issubdtype(batch.dtype, jnp.floating) and not np.all(np.isfinite(np.asarray(batch))):
        raise ValueError("calibration batch contains NaN or Inf")
    return batch


def _adapter(model, args, apply_kwargs) -> tuple[Adapter, Calibration]:
    if isinstance(model, nnx.Module):
        if len(args) != 1:
            raise ValueError(
                "an NNX module is quantized as quantize_model(module, calibration, ...): "
                f"got {len(args)} positional arguments after the module"
            )
        return NNXAdapter(model, apply_kwargs), args[0]
    if isinstance(model, nn.Module):
        if len(args) != 2:
            raise ValueError(
                "a Linen module is quantized as quantize_model(model, variables, calibration, "
                f"...): got {len(args)} positional arguments after the model"
            )
        return LinenAdapter(model, args[0], apply_kwargs), args[1]
    raise ValueError(f"quantize_model takes a Flax Linen or NNX module, got {type(model).__name__}")


def _in_forward_order(found: Sequence[Layer]) -> list[tuple[Layer, tuple[int, ...]]]:
    """(layer, slice index) in the order the forward pass computes them.

    Consecutive stacked layers of one scan (same stack shape, same first path part) run slice
    after slice: all of slice 0's layers in call order, then slice 1's, ...
    """
    units, i = [], 0
    while i < len(found):
        group = [found[i]]
        root = found[i].path.split("/")[0]
        while (
            found[i].stack_shape
            and i + len(group) < len(found)
            and found[i + len(group)].stack_shape == found[i].stack_shape
            and found[i + len(group)].path.split("/")[0] == root
        ):
            group.append(found[i + len(group)])
        units += [(layer, index) for index in np.ndindex(*found[i].stack_shape) for layer in group]
        i += len(group)
    return units


def _errors(method, matrix, q, stats: GramStats, alphabet) -> jax.Array:
    """(relative error of Q, relative error had W been rounded (MSQ)) from the layer's stats."""
    rounded = q if isinstance(method, MSQ) else MSQ().quantize(matrix, stats, alphabet)
    return jnp.stack([relative_error(matrix, q, stats), relative_error(matrix, rounded, stats)])


# A convolution's rows are its input patches, kh·kw times the input: in a paired pass they are
# formed and summed over chunks of examples of at most this many rows.
_MAX_PATCH_ROWS = 1 << 16


@dataclasses.dataclass(frozen=True)
class _LayerStep:
    """A paired pass's step at one layer (one slice): stats of all calibration rows, then Q.

    Traced inside the pass (`qjax.adapters.base.paired_kernel`); hashable, so that the compiled
    pass is reused by later calls with the same specs.
    """

    spec: LayerSpec
    kind: LayerKind

    def __hash__(self):
        try:
            return hash((self.spec, self.kind))
        except TypeError:  # a spec holding arrays (a fixed alphabet): compiled for this call
            return id(self)

    def __eq__(self, other):
        if self is other:
            return True
        if not isinstance(other, _LayerStep):
            return False
        try:
            hash((self.spec, other.spec))
        except TypeError:
            return False
        return (self.spec, self.kind) == (other.spec, other.kind)

    def alphabet(self, kernel: jax.Array):
        """The layer's alphabet for this kernel (slice)."""
        return self.spec.make_alphabet(self.kind.to_matrix(kernel))

    def init_stats(self, matrix: jax.Array, *, mesh: Mesh | None = None) -> GramStats:
        """Empty statistics for the neurons of `matrix` (the kernel in `kind.to_matrix` form)."""
        return gram_stats_init(
            matrix.shape[-2],
            batch_shape=matrix.shape[:-2],
            track_error=True,
            dtype=jnp.result_type(matrix.dtype, jnp.float32),
            mesh=mesh,
        )

    def quantize(
        self,
        matrix: jax.Array,
        stats: GramStats,
        *,
        gather: Callable[[jax.Array], jax.Array] | None = None,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(Q, the alphabet, `_errors`) of the layer's matrix from its statistics.

        `gather`, if given, brings a Q split over a mesh onto this process before the errors.
        """
        alphabet = self.spec.make_alphabet(matrix)
        q = self.spec.quantizer.quantize(matrix, stats, alphabet)
        if gather is not None:
            q = gather(q)
        return q, alphabet, _errors(self.spec.quantizer, matrix, q, stats, alphabet)

    def __call__(self, kernel: jax.Array, x: jax.Array, x_tilde: jax.Array):
        matrix = self.kind.to_matrix(kernel)
        stats = self._accumulate(self.init_stats(matrix), x, x_tilde)
        q, _, errors = self.quantize(matrix, stats)
        return self.kind.from_matrix(q), errors

    def _accumulate(self, stats: GramStats, x: jax.Array, x_tilde: jax.Array) -> GramStats:
        if not isinstance(self.kind, Conv | ConvByChannel):
            return accumulate(stats, self.kind.rows(x), self.kind.rows(x_tilde))
        examples = x.shape[0]
        per_example = self.kind.rows(x[:1]).shape[-2]
        chunk = max(
            (
                d
                for d in range(1, examples + 1)
                if examples % d == 0 and d * per_example <= _MAX_PATCH_ROWS
            ),
            default=1,
        )
        chunked = lambda a: a.reshape(examples // chunk, chunk, *a.shape[1:])

        def add(stats, pair):
            return accumulate(stats, self.kind.rows(pair[0]), self.kind.rows(pair[1])), None

        return jax.lax.scan(add, stats, (chunked(x), chunked(x_tilde)))[0]


def _gathered(q: jax.Array) -> jax.Array:
    """A Q split over a mesh (and over processes), whole on this process."""
    return jnp.asarray(multihost_utils.process_allgather(q, tiled=True))


@functools.partial(jax.jit, static_argnums=0)
def _rows(kind: LayerKind, x) -> jax.Array:
    return kind.rows(x)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def _add_rows(kind: LayerKind, stats: GramStats, x, x_tilde) -> GramStats:
    """Rows of one batch's X and X~ folded into the statistics, as one compiled program."""
    return accumulate(stats, kind.rows(x), kind.rows(x_tilde))


def _in_one_pass(
    adapter: Adapter,
    found: Sequence[Layer],
    units: Sequence[tuple[Layer, tuple[int, ...]]],
    table: Rules,
    batch: jax.Array,
    *,
    sequential: bool,
    progress: bool,
) -> tuple[Any, list[LayerReport]]:
    """`quantize_model` as one paired forward pass over all calibration examples at once."""
    steps = {}
    for layer in found:
        spec = table.spec_for(layer.path)
        if not spec.skip:
            steps[layer.path] = _LayerStep(spec, spec.layer_kind(layer.kind))
    todo = sum(layer.path in steps for layer, _ in units)
    finished: list[float] = []
    bar = tqdm(total=todo, desc="quantizing layers in one pass", disable=not progress)

    def layer_done(errors):
        finished.append(time.perf_counter())
        bar.update()

    start = time.perf_counter()
    PairedPass.listener = layer_done
    try:
        state, errors = adapter.paired_pass(list(found), steps, batch, sequential=sequential)
        jax.effects_barrier()
    finally:
        PairedPass.listener = None
        bar.close()
    if len(finished) == todo:
        times = np.diff([start, *finished])
    else:  # progress callbacks are best effort: share the time out evenly
        logging.warning("%d of %d layers reported progress", len(finished), todo)
        times = np.full(todo, (time.perf_counter() - start) / max(todo, 1))

    reports, done, sizes = [], 0, {}
    for layer, index in units:
        name = layer.path + (f"[{', '.join(map(str, index))}]" if index else "")
        kernel = adapter.kernel(adapter.state, layer)
        shape = tuple(kernel.shape[len(layer.stack_shape) :])
        step = steps.get(layer.path)
        if step is None:
            reports.append(LayerReport(name, layer.type_name, "skip", shape, None, None, None, 0))
            continue
        key = (step, shape, kernel.dtype)
        if key not in sizes:  # the alphabet's size, without computing it
            sizes[key] = jax.eval_shape(
                step.alphabet, jax.ShapeDtypeStruct(shape, kernel.dtype)
            ).size
        error, msq_error = map(float, errors[layer.path][index])
        reports.append(
            LayerReport(
                name,
                step.kind.name,
                step.spec.quantizer.name,
                shape,
                sizes[key],
                error,
                msq_error,
                float(times[done]),
            )
        )
        done += 1
        logging.info(
            "%s %s: relative error %.4f (MSQ %.4f), %d letters",
            name,
            step.spec.quantizer.name,
            error,
            msq_error,
            sizes[key],
        )
    return state, reports


def quantize_model(
    model: nn.Module | nnx.Module,
    *args: Any,
    spec: LayerSpec = DEFAULT_SPEC,
    rules: RulesLike | None = None,
    layers: RulesLike | None = None,
    apply_kwargs: Mapping[str, Any] | None = None,
    mesh: Mesh | None = None,
    one_pass: bool | None = None,
    sequential: bool = True,
    progress: bool = True,
) -> tuple[Any, list[LayerReport]]:
    """Quantizes every Dense, DenseGeneral, Einsum and Conv kernel of a Flax model, in call order.

    Linen: `quantize_model(model, variables, calibration, ...)` returns (new variables, reports).
    NNX: `quantize_model(module, calibration, ...)` returns (a new module, reports) and leaves
    `module` untouched.

    Layer l's method sees X (its input in the float model) and X~ (its input in the model whose
    earlier layers are quantized), accumulated over all calibration batches into `GramStats`.
    Embedding tables are left float (round them with `qjax.msq` if wanted); biases, normalization
    and every other variable stay as they were.

    Args:
      model: a Linen module (followed by its variables) or an NNX module.
      *args: Linen: (variables, calibration); NNX: (calibration,). The calibration inputs are
        what the model takes (preprocessed images, or integer token ids): one array (one batch),
        a list of batches, or a function returning a fresh iterator of batches (each layer reads
        all of them once).
      spec: the `LayerSpec` of every layer no rule matches.
      rules: ordered (pattern, LayerSpec) pairs (or a mapping); the first pattern that fully
        matches a layer's path (`re.fullmatch`, e.g. "blocks/attn/.*") gives its spec. Every
        pattern must match a layer. `LayerSpec(method="skip")` keeps a layer float.
      layers: the former name of `rules` (still accepted; give one of the two).
      apply_kwargs: keyword arguments of every forward pass (Linen `model.apply(..., **kw)`, e.g.
        {"train": False}; NNX `module(batch, **kw)`). NNX modules run in `eval()` mode.
      mesh: accumulate each layer's statistics data-parallel over this device mesh (and split
        GPFQ's neurons over it), see `qjax.stats`; the codes are those of the unsharded run.
        The forward passes run where the model and the batches are. On several hosts
        (`jax.distributed`), every process passes its own calibration batches, the same number
        of them, and gets the whole quantized model.
      one_pass: how the model is run.
        True: one compiled forward pass of the float model and the model being quantized side
        by side over all calibration examples at once, each layer quantized as the pass reaches
        it (fast: one compilation, two model evaluations in all; memory: the activations of the
        whole calibration set, twice).
        False: layer by layer, batch by batch (memory bounded by one batch; two forward passes
        per layer and batch, one compilation per layer).
        None (default): one pass when the calibration is an array or a list of batches and no
        mesh is given; layer by layer for a function of batches (streamed data) or a mesh.
        Both give the same codes up to the rounding of the statistics' sums.
      sequential: True (the GPFQ paper's order): layer l sees X~ from the model whose layers
        before it are quantized. False: every layer is quantized from the float model's inputs
        (X~ = X; no correction of the earlier layers' errors), as qwix's GPTQ and many GPTQ
        codes do: one float forward pass, a third of the statistics.
      progress: show a progress bar over layers.

    Returns:
      (quantized variables or module, one `LayerReport` per layer or slice in call order).

    Raises:
      ValueError: a pattern that matches no layer; a kernel-owning layer that is not skipped and
        qjax cannot quantize (unknown kind, never called, called twice); calibration batches that
        are not numbers, not finite, or not of the shape the model takes.
    """
    if rules is not None and layers is not None:
        raise ValueError("give rules= or its former name layers=, not both")
    adapter, calibration = _adapter(model, args, apply_kwargs)
    table = Rules(rules if rules is not None else layers, default=spec)
    batches = _calibration_batches(calibration)
    first = _checked(next(batches()), None)
    found = adapter.layers(first)
    if not found:
        raise ValueError(f"{type(model).__name__} has no layer with a kernel to quantize")
    table.check_matches([layer.path for layer in found])
    for layer in found:
        if layer.problem is not None and not table.spec_for(layer.path).skip:
            raise ValueError(
                f"layer {layer.path} {layer.problem}: qjax quantizes Dense/Linear, "
                f"DenseGeneral/LinearGeneral, Einsum and Conv layers; keep it float with "
                f"rules=[({layer.path!r}, LayerSpec(method='skip'))]"
            )

    units = _in_forward_order(found)
    if one_pass is None:
        one_pass = mesh is None and not callable(calibration)
    if one_pass:
        if mesh is not None:
            raise ValueError("one_pass=True runs on one device: give mesh= with one_pass=False")
        batch = jnp.concatenate([_checked(b, first.shape) for b in batches()])
        state, reports = _in_one_pass(
            adapter, found, units, table, batch, sequential=sequential, progress=progress
        )
        return adapter.result(state), reports

    float_state = adapter.state
    current = float_state
    reports = []
    for layer, index in tqdm(units, desc="quantizing layers", disable=not progress):
        layer_spec = table.spec_for(layer.path)
        name = layer.path + (f"[{', '.join(map(str, index))}]" if index else "")
        kernel = adapter.kernel(current, layer)
        if layer_spec.skip:
            shape = tuple(kernel.shape[len(layer.stack_shape) :])
            reports.append(LayerReport(name, layer.type_name, "skip", shape, None, None, None, 0))
            continue
        start = time.perf_counter()
        step = _LayerStep(layer_spec, layer_spec.layer_kind(layer.kind))
        method, kind = step.spec.quantizer, step.kind
        matrix = kind.to_matrix(kernel[index])
        stats = step.init_stats(matrix, mesh=mesh)
        for batch in batches():
            batch = _checked(batch, first.shape)
            x = adapter.inputs(float_state, layer, index, batch)
            x_tilde = adapter.inputs(current, layer, index, batch) if sequential else x
            if mesh is None:
                stats = _add_rows(kind, stats, x, x_tilde)
            else:  # this process's rows, split over the mesh's devices
                stats = gram_stats_update(stats, _rows(kind, x), _rows(kind, x_tilde))
        # With a mesh, all of Q on this process, for the next forward passes.
        q, alphabet, errors = step.quantize(
            matrix, stats, gather=_gathered if mesh is not None else None
        )
        error, msq_error = map(float, errors)
        new_kernel = kernel.at[index].set(kind.from_matrix(q).astype(kernel.dtype))
        current = adapter.with_kernel(current, layer, new_kernel)
        seconds = time.perf_counter() - start
        reports.append(
            LayerReport(
                name,
                kind.name,
                method.name,
                tuple(kernel.shape[len(layer.stack_shape) :]),
                alphabet.size,
                error,
                msq_error,
                seconds,
            )
        )
        logging.info(
            "%s %s: relative error %.4f (MSQ %.4f), %d letters, %.1fs",
            name,
            method.name,
            error,
            msq_error,
            alphabet.size,
            seconds,
        )
    return adapter.result(current), reports


def format_report(reports: Sequence[LayerReport]) -> str:
    """A Markdown table of `quantize_model`'s per-layer report."""
    lines = [
        "| layer | kind | kernel | method | letters | rel. error | MSQ rel. error | time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        fmt = lambda v: "–" if v is None else f"{v:.4f}"
        lines.append(
            f"| {r.path} | {r.kind} | {'×'.join(map(str, r.shape))} | {r.method} | "
            f"{r.num_letters or '–'} | {fmt(r.relative_error)} | {fmt(r.msq_relative_error)} | "
            f"{r.seconds:.1f} |"
        )
    return "\n".join(lines)
