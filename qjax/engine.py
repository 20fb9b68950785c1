"""`quantize_model`: quantize a whole Flax model layer by layer, in call order.

As in Lybrand & Saab, layer l is quantized knowing two inputs of it on the calibration set:

* X, its input in the float network, and
* X~, its input in the network whose layers 1..l-1 are already quantized.

A framework adapter (`qjax.adapters`: Linen, NNX) finds the layers and captures X and X~; a
layer kind (`qjax.layers`) turns them into rows, summed into the layer's `GramStats` (X~ᵀX~,
X~ᵀX, XᵀX); the layer's method (`qjax.methods`: GPFQ, GPTQ, MSQ, ...) quantizes its weight
matrix from them, and the new kernel is written back. The engine asks neither which framework
nor which method it drives. Three schedules, the same codes:

* one pass: the float and the quantized model run side by side (the two members of a
  `jax.vmap`) in one compiled program over all calibration examples, each layer quantized
  inside it as the pass reaches it (`_LayerStep`, `Adapter.paired_pass`);
* block by block, for a model built of a chain of blocks (`qjax.adapters.base.find_blocks`):
  the same paired pass up to the first block, whose inputs X and X~ for all calibration
  examples are cached; then a paired pass of each block alone on its cached inputs (one
  compiled program for blocks of one structure), whose outputs are the next block's inputs;
  then of the model after the last block;
* layer by layer: for each layer, X and X~ are captured batch by batch and streamed into the
  statistics, so the calibration set never has to fit in memory (also over a device mesh).

Layers under `scan` (stacked kernels) are quantized slice by slice, each with its own X and X~.

Before either, the host-level driver checks what would otherwise give a silently wrong model:
the batches (arrays of numbers, finite, fitting the model's arguments), the weights (finite),
and, in one float forward pass per batch (`Adapter.check_inputs`), every layer's input (finite)
and every embedding's token ids (inside its table); errors name the variable, layer and batch.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
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

from qjax.adapters.base import (
    Adapter,
    Blocks,
    Layer,
    ModelCall,
    ModuleCall,
    PairedPass,
    Static,
    call_error,
    find_blocks,
)
from qjax.adapters.linen import LinenAdapter
from qjax.adapters.nnx import NNXAdapter
from qjax.layers import Conv, ConvByChannel, LayerKind
from qjax.methods.msq import MSQ
from qjax.rules import DEFAULT_SPEC, LayerSpec, Rules, path_name
from qjax.stats import (
    GramStats,
    accumulate,
    gram_stats_init,
    gram_stats_update,
    relative_error,
)

__all__ = ["SCHEDULES", "BlockReport", "LayerReport", "format_report", "quantize_model"]

SCHEDULES = ("auto", "one_pass", "layer_by_layer", "block_wise")

Batch = ArrayLike | tuple | Mapping[str, ArrayLike] | Any
Calibration = Batch | list[Batch] | Callable[[], Iterable[Batch]]
RulesLike = Sequence[tuple[str, LayerSpec]] | Mapping[str, LayerSpec]


class BlockReport(NamedTuple):
    """One block of the block-wise schedule.

    Attributes:
      path: the block's path ("layers/3").
      layers: how many layers (slices) it holds.
      seconds: wall time of its paired pass (compilation included for the first block of a
        structure) and of caching its outputs.
      memory_bytes: the memory of its compiled pass as XLA plans it: arguments (the block's
        weights, its cached inputs X and X~), outputs and temporaries.
    """

    path: str
    layers: int
    seconds: float
    memory_bytes: int


class LayerReport(NamedTuple):
    """What happened to one layer (one slice of a stacked layer).

    Attributes:
      path: the layer's path, e.g. "Dense_0", "blocks/attn/query"; a slice of a stacked layer
        has its index appended, "blocks/mlp/fc1[3]" ("" for a model that is a layer itself).
      kind: the layer kind ("Dense", "DenseGeneral", "Einsum", "Conv").
      method: the method's name ("skip": left float, no error computed; "not reached": a
        floating variable that enters a matrix product in the forward pass but is not the
        kernel of a layer qjax knows, listed after the layers under its variable path: register
        its module with `qjax.register_layer` to quantize it).
      shape: the kernel's shape (of the slice).
      num_letters: letters of the alphabet (None when skipped).
      relative_error: ||XW - X~Q||_F / ||XW||_F on the calibration set.
      msq_relative_error: the same error had this layer's weights been rounded (MSQ) instead,
        with the same X~: the reference point.
      seconds: wall time spent on this layer: its statistics and quantization (layer by layer),
        or the time since the previous layer was done (one pass: the forward computation in
        between included, and for the first layer the tracing and compilation of the pass).
      alphabet: the alphabet the layer's weight matrix was quantized to (its scales per tensor,
        channel or group, and its letters), as `LayerSpec.make_alphabet` gives it for the
        kernel (slice) in `kind`'s matrix form; None when skipped.
      block: the block the layer was quantized in (block-wise schedule), or None.
    """

    path: str
    kind: str
    method: str
    shape: tuple[int, ...]
    num_letters: int | None
    relative_error: float | None
    msq_relative_error: float | None
    seconds: float
    alphabet: Any = None
    block: BlockReport | None = None


_INPUTS_ONLY = (
    "if your batches are (inputs, labels) pairs from a dataset, pass the inputs only "
    "([x for x, _ in batches]); pass several arguments as a tuple (positional) or a dict "
    "(keyword), or give call=lambda model, batch: ... to run the model on a batch yourself"
)


class _Batches:
    """The calibration batches, restartable (they are read once per layer), each checked and in
    the form the compiled passes take: (data, shared), see `ModelCall`.

    Without a `call` hook, a batch is an array (the model's one input), a tuple (its positional
    arguments), a dict (its keyword arguments), or an (args tuple, kwargs dict) pair; `data` is
    then (args, kwargs). With a hook, `data` is the batch as given.
    """

    def __init__(self, calibration: Calibration, hook, shared: Mapping[str, jax.Array]):
        if isinstance(calibration, Iterator):
            raise ValueError(
                "calibration is a one-shot iterator, but it is read once per layer: pass an "
                "array, a list of batches, or a function returning a fresh iterator of batches"
            )
        if callable(calibration) and not hasattr(calibration, "shape"):
            self._source = lambda: iter(calibration())
        elif isinstance(calibration, list):
            if not calibration:
                raise ValueError("calibration is an empty list of batches")
            self._source = lambda: iter(calibration)
        elif calibration is None or isinstance(calibration, str | bytes):
            raise ValueError(
                "calibration must be a batch (an array, a tuple or dict of arrays), a non-empty "
                f"list of batches, or a function returning an iterator of batches; got "
                f"{type(calibration).__name__}"
            )
        else:
            self._source = lambda: iter([calibration])
        self.streamed = callable(calibration) and not hasattr(calibration, "shape")
        self.hook = hook
        self.shared = dict(shared)
        self._first: tuple[Any, list] | None = None

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        for index, batch in enumerate(self._source()):
            yield self.fed(batch, index)

    def first(self) -> Any:
        return next(iter(self))

    def _data(self, batch: Any) -> Any:
        if self.hook is not None:
            return batch
        if (
            isinstance(batch, tuple)
            and len(batch) == 2
            and isinstance(batch[0], tuple)
            and isinstance(batch[1], Mapping)
        ):
            return tuple(batch[0]), dict(batch[1])
        if isinstance(batch, tuple):
            return batch, {}
        if isinstance(batch, Mapping):
            return (), dict(batch)
        return (batch,), {}

    def _name(self, keypath) -> str:
        if self.hook is not None:
            return f"batch{jax.tree_util.keystr(tuple(keypath))}"
        kind, *rest = keypath
        where = f"argument {rest[0].idx}" if kind.idx == 0 else f"keyword argument {rest[0].key!r}"
        return where + jax.tree_util.keystr(tuple(rest[1:]))

    def fed(self, batch: Any, index: int) -> tuple[Any, Any]:
        """Batch `index` checked: arrays of numbers, finite, of the first batch's structure and
        shapes beyond the batch axis."""
        data = self._data(batch)
        leaves, treedef = jax.tree_util.tree_flatten_with_path(data)
        if not leaves:
            raise ValueError(f"calibration batch {index} holds no arrays")
        single = self.hook is None and len(leaves) == 1 and not isinstance(batch, tuple | Mapping)
        arrays = []
        for keypath, leaf in leaves:
            try:
                array = jnp.asarray(leaf)
            except TypeError as error:
                raise ValueError(
                    f"calibration batch {index}: {self._name(keypath)} is not an array "
                    f"({type(leaf).__name__}); put non-array arguments in apply_kwargs"
                ) from error
            numbers = jnp.issubdtype(array.dtype, jnp.floating) or jnp.issubdtype(
                array.dtype, jnp.integer
            )
            if not numbers and (single or array.dtype != jnp.bool_):
                raise ValueError(
                    f"calibration batches must be floating point inputs or integer token ids "
                    f"(or boolean masks beside them), got dtype {array.dtype} for "
                    f"{self._name(keypath)} of batch {index}"
                )
            if array.ndim < 1 or array.shape[0] == 0:
                raise ValueError(
                    f"calibration batch {index}: {self._name(keypath)} has shape {array.shape}: "
                    "no examples"
                )
            if jnp.issubdtype(array.dtype, jnp.floating) and not np.all(
                np.isfinite(np.asarray(array))
            ):
                raise ValueError(
                    f"calibration batch {index}: {self._name(keypath)} contains NaN or Inf"
                )
            arrays.append(array)
        shapes = [a.shape for a in arrays]
        if self._first is None:
            self._first = (treedef, shapes)
        else:
            first_treedef, first_shapes = self._first
            if treedef != first_treedef:
                raise ValueError(
                    f"calibration batch {index} is structured as {treedef}, the first batch as "
                    f"{first_treedef}"
                )
            for (keypath, _), shape, first in zip(leaves, shapes, first_shapes, strict=True):
                if shape[1:] != first[1:]:
                    raise ValueError(
                        f"calibration batch {index}: {self._name(keypath)} of shape {shape} "
                        f"differs from the first batch's {first} beyond the batch axis"
                    )
        return jax.tree.unflatten(treedef, arrays), self.shared

    def aligned(self, fed: tuple[Any, Any]) -> bool:
        """Whether every array of a batch has the same leading (example) axis."""
        return len({leaf.shape[0] for leaf in jax.tree.leaves(fed[0])}) == 1

    def check_binds(self, model: Any, call: ModelCall, fed: tuple[Any, Any]) -> None:
        """Without a hook: the batch's arguments fit the model's `__call__`, and no element of a
        tuple batch is taken for a flag or looks like a dataset's labels."""
        if self.hook is not None:
            return
        (args, kwargs), shared = fed
        try:
            signature = inspect.signature(type(model).__call__)
        except (TypeError, ValueError):
            return
        try:
            bound = signature.bind(None, *args, **kwargs, **shared, **call.keywords)
        except TypeError as error:
            if "missing a required argument" in str(error) and not args[1:]:
                raise ValueError(call_error(error, type(model), fed)) from error
            raise ValueError(
                f"calibration batches give {type(model).__name__} {len(args)} positional and "
                f"keyword arguments {sorted({**kwargs, **shared})}, which do not fit "
                f"{type(model).__name__}{signature} ({error}): {_INPUTS_ONLY}"
            ) from error
        names = list(signature.parameters)[1 : 1 + len(args)]
        for position, (name, arg) in enumerate(zip(names, args, strict=False)):
            default = signature.parameters[name].default
            labels = (
                position > 0
                and isinstance(arg, jax.Array)
                and isinstance(args[0], jax.Array)
                and arg.ndim == 1
                and jnp.issubdtype(arg.dtype, jnp.integer)
                and args[0].ndim > 1
            )
            if isinstance(default, bool) or labels:
                raise ValueError(
                    f"calibration batches are tuples: element {position} (shape {arg.shape}, "
                    f"dtype {arg.dtype}) would be passed as {type(model).__name__}'s argument "
                    f"{name!r}"
                    + (f" (default {default!r})" if isinstance(default, bool) else "")
                    + f": {_INPUTS_ONLY}"
                )
        del bound


def _examples(fed: tuple[Any, Any]) -> int:
    """The number of examples of a checked batch (its first array's leading axis)."""
    return jax.tree.leaves(fed[0])[0].shape[0]


def _joined(fed: list[tuple[Any, Any]], schedule: str) -> tuple[Any, Any]:
    """The checked batches as one, joined along their example axis."""
    if len(fed) == 1:
        return fed[0]
    for index, batch in enumerate(fed):
        if len({leaf.shape[0] for leaf in jax.tree.leaves(batch[0])}) != 1:
            raise ValueError(
                f"schedule={schedule!r} joins the calibration batches along their first axis, "
                f"but the arrays of batch {index} have different first axes "
                f"{[leaf.shape for leaf in jax.tree.leaves(batch[0])]}: give "
                "schedule='layer_by_layer' (or one batch)"
            )
    joined = jax.tree.map(lambda *leaves: jnp.concatenate(leaves), *[b[0] for b in fed])
    return joined, fed[0][1]


def _adapter(model, args, call: ModelCall) -> tuple[Adapter, Calibration]:
    if isinstance(model, nnx.Module):
        if len(args) != 1:
            raise ValueError(
                "an NNX module is quantized as quantize_model(module, calibration, ...): "
                f"got {len(args)} positional arguments after the module"
            )
        return NNXAdapter(model, call), args[0]
    if isinstance(model, nn.Module):
        if len(args) != 2:
            raise ValueError(
                "a Linen module is quantized as quantize_model(model, variables, calibration, "
                f"...): got {len(args)} positional arguments after the model"
            )
        return LinenAdapter(model, args[0], call), args[1]
    raise ValueError(f"quantize_model takes a Flax Linen or NNX module, got {type(model).__name__}")


@jax.jit
def _finite_leaves(leaves: list[jax.Array]) -> jax.Array:
    """Whether each array holds only finite numbers, in one compiled program."""
    return jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves])


def _check_weights(state: Any) -> None:
    """Raises naming the first floating variable that holds NaN or Inf."""
    named = [
        (path_name(keypath), leaf)
        for keypath, leaf in jax.tree_util.tree_leaves_with_path(state)
        if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)
    ]
    if not named:
        return
    finite = np.asarray(_finite_leaves([leaf for _, leaf in named]))
    for (name, _), ok in zip(named, finite, strict=True):
        if not ok:
            raise ValueError(
                f"weight {name} contains NaN or Inf: quantization needs a finite model"
            )


def _check_inputs(adapter: Adapter, found: Sequence[Layer], batches: _Batches) -> None:
    """One float forward pass per batch: raises naming the batch and the first layer whose
    input holds NaN or Inf, or the embedding given token ids outside its table."""
    called = [layer for layer in found if layer.problem != "is never called"]
    for index, batch in enumerate(batches):
        finite, ids = adapter.check_inputs(called, batch)
        for path, (low, high, size) in ids.items():
            if low < 0 or high >= size:
                raise ValueError(
                    f"calibration batch {index}: embedding {path} is given token ids from {low} "
                    f"to {high}, outside its table of {size} rows (ids 0..{size - 1})"
                )
        for layer in called:
            if not finite.get(layer.path, True):
                raise ValueError(
                    f"calibration batch {index}: the input of layer {layer.path} holds NaN or "
                    "Inf in the float model (its weights and the batch are finite: an "
                    "overflow or a division by zero before it)"
                )


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
    """(relative error of Q, relative error had W been rounded (MSQ), 1 if the statistics are
    finite else 0) from the layer's stats."""
    rounded = q if isinstance(method, MSQ) else MSQ().quantize(matrix, stats, alphabet)
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in (stats.gram, stats.cross)]))
    errors = [relative_error(matrix, q, stats), relative_error(matrix, rounded, stats)]
    return jnp.stack([*errors, finite.astype(errors[0].dtype)])


def _name(layer: Layer, index: tuple[int, ...]) -> str:
    return layer.path + (f"[{', '.join(map(str, index))}]" if index else "")


def _skipped(layer: Layer, index: tuple[int, ...], kernel: jax.Array) -> LayerReport:
    shape = tuple(kernel.shape[len(layer.stack_shape) :])
    return LayerReport(_name(layer, index), layer.type_name, "skip", shape, None, None, None, 0)


def _quantized(
    layer: Layer,
    index: tuple[int, ...],
    step: _LayerStep,
    kernel: jax.Array,
    alphabet: Any,
    errors: ArrayLike,
    seconds: float,
) -> LayerReport:
    """The report of a quantized layer (slice), or an error if its statistics are not finite."""
    name = _name(layer, index)
    error, msq_error, finite = map(float, np.asarray(errors))
    if not finite:
        raise ValueError(
            f"the statistics of layer {name} (X~ᵀX~, X~ᵀX) hold NaN or Inf: its inputs "
            "overflow in the partly quantized model"
        )
    if not np.isfinite(error):
        method = step.spec.quantizer
        dtype = jnp.result_type(kernel.dtype, jnp.float32)
        raise ValueError(
            f"layer {name}: {method.name} gave NaN codes from finite weights and statistics: "
            f"{method.numerical_failure(dtype)}"
        )
    logging.info(
        "%s %s: relative error %.4f (MSQ %.4f), %d letters, %.1fs",
        name,
        step.spec.quantizer.name,
        error,
        msq_error,
        alphabet.size,
        seconds,
    )
    shape = tuple(kernel.shape[len(layer.stack_shape) :])
    return LayerReport(
        name,
        step.kind.name,
        step.spec.quantizer.name,
        shape,
        alphabet.size,
        error,
        msq_error,
        seconds,
        alphabet,
    )


# A convolution's rows are its input patches, kh·kw times the input: in a paired pass they are
# formed and summed over chunks of examples of at most this many rows.
_MAX_PATCH_ROWS = 1 << 16


@dataclasses.dataclass(frozen=True)
class _LayerStep:
    """A paired pass's step at one layer (one slice): stats of all calibration rows, then Q.

    Traced inside the pass (`qjax.adapters.base.paired_kernel`); a key of compiled passes
    (`Static`: equal specs share a program, a spec holding arrays, a fixed alphabet, its own).
    """

    spec: LayerSpec
    kind: LayerKind

    def __hash__(self):
        return hash(Static((self.spec, self.kind)))

    def __eq__(self, other):
        if not isinstance(other, _LayerStep):
            return NotImplemented
        return Static((self.spec, self.kind)) == Static((other.spec, other.kind))

    @property
    def program(self) -> _LayerStep:
        """This step with what does not change the compiled program taken out (the scale
        constant C, passed to `__call__` as `data` instead)."""
        if not self.spec.scale_is_data:
            return self
        return _LayerStep(dataclasses.replace(self.spec, c=1.0), self.kind)

    @property
    def data(self) -> jax.Array | None:
        """The numbers `program` leaves out: C, or None."""
        return jnp.float32(self.spec.c) if self.spec.scale_is_data else None

    def alphabet(self, kernel: jax.Array, data: jax.Array | None = None):
        """The layer's alphabet for this kernel (slice), given `data` (see `program`)."""
        return self.spec.make_alphabet(self.kind.to_matrix(kernel), c=data)

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
        c: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(Q, the alphabet, `_errors`) of the layer's matrix from its statistics.

        `gather`, if given, brings a Q split over a mesh onto this process before the errors;
        `c`, if given, is the scale constant C (see `program`).
        """
        alphabet = self.spec.make_alphabet(matrix, c=c)
        q = self.spec.quantizer.quantize(matrix, stats, alphabet)
        if gather is not None:
            q = gather(q)
        return q, alphabet, _errors(self.spec.quantizer, matrix, q, stats, alphabet)

    def __call__(self, kernel: jax.Array, x: jax.Array, x_tilde: jax.Array, data=None):
        matrix = self.kind.to_matrix(kernel)
        stats = self._accumulate(self.init_stats(matrix), x, x_tilde)
        q, _, errors = self.quantize(matrix, stats, c=data)
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
def _alphabet(program: _LayerStep, kernel: jax.Array, data: jax.Array | None):
    """The alphabet of a layer's kernel (slice), as its step makes it inside a pass (compiled
    once per program and kernel shape)."""
    return program.alphabet(kernel, data)


@functools.partial(jax.jit, static_argnums=0)
def _rows(kind: LayerKind, x) -> jax.Array:
    return kind.rows(x)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=1)
def _add_rows(kind: LayerKind, stats: GramStats, x, x_tilde) -> GramStats:
    """Rows of one batch's X and X~ folded into the statistics, as one compiled program."""
    return accumulate(stats, kind.rows(x), kind.rows(x_tilde))


def _steps(found: Sequence[Layer], table: Rules) -> dict[str, _LayerStep]:
    """The step of every layer that is not skipped, by path."""
    steps = {}
    for layer in found:
        spec = table.spec_for(layer.path)
        if not spec.skip:
            steps[layer.path] = _LayerStep(spec, spec.layer_kind(layer.kind))
    return steps


def _in_paired_pass(
    adapter: Adapter,
    units: Sequence[tuple[Layer, tuple[int, ...]]],
    steps: Mapping[str, _LayerStep],
    run: Callable[[dict, dict], tuple],
    bar: Any,
) -> tuple[Any, list[LayerReport], tuple]:
    """Runs one paired pass, `run(programs, data) -> (state, errors by path, *more)` with the
    steps of `units`' layers, and reports them (and those of `units` that are skipped).

    A layer's time is the time since the previous layer of the pass was done (since the pass
    began for the first one); `bar`, if given, advances by one per layer.
    """
    paths = list(dict.fromkeys(layer.path for layer, _ in units if layer.path in steps))
    todo = sum(layer.path in steps for layer, _ in units)
    finished: list[float] = []

    def layer_done(errors):
        finished.append(time.perf_counter())
        if bar is not None:
            bar.update()

    start = time.perf_counter()
    PairedPass.listener = layer_done
    try:
        state, errors_by_path, *more = run(
            {path: steps[path].program for path in paths},
            {path: steps[path].data for path in paths},
        )
        jax.effects_barrier()
    finally:
        PairedPass.listener = None
    if len(finished) == todo:
        times = np.diff([start, *finished])
    else:  # progress callbacks are best effort: share the time out evenly
        logging.warning("%d of %d layers reported progress", len(finished), todo)
        times = np.full(todo, (time.perf_counter() - start) / max(todo, 1))

    reports, done = [], 0
    for layer, index in units:
        kernel = adapter.kernel(adapter.state, layer)
        step = steps.get(layer.path)
        if step is None:
            reports.append(_skipped(layer, index, kernel))
            continue
        alphabet = _alphabet(step.program, kernel[index], step.data)
        errors = errors_by_path[layer.path][index]
        reports.append(_quantized(layer, index, step, kernel, alphabet, errors, times[done]))
        done += 1
    return state, reports, tuple(more)


def _in_one_pass(
    adapter: Adapter,
    found: Sequence[Layer],
    units: Sequence[tuple[Layer, tuple[int, ...]]],
    table: Rules,
    batch: Any,
    *,
    sequential: bool,
    progress: bool,
) -> tuple[Any, list[LayerReport]]:
    """`quantize_model` as one paired forward pass over all calibration examples at once."""
    steps = _steps(found, table)
    todo = sum(layer.path in steps for layer, _ in units)
    with tqdm(total=todo, desc="quantizing layers in one pass", disable=not progress) as bar:
        state, reports, _ = _in_paired_pass(
            adapter,
            units,
            steps,
            lambda programs, data: adapter.paired_pass(
                list(found), programs, batch, sequential=sequential, data=data
            ),
            bar,
        )
    return state, reports


def _block_wise(
    adapter: Adapter,
    found: Sequence[Layer],
    units: Sequence[tuple[Layer, tuple[int, ...]]],
    table: Rules,
    batch: Any,
    blocks: Blocks,
    *,
    sequential: bool,
    progress: bool,
    offload: bool,
) -> tuple[Any, list[LayerReport]]:
    """`quantize_model` block by block: a paired pass up to the first block caches its inputs
    (X and X~ of every calibration example; on the host with `offload`), a paired pass of each
    block alone quantizes its layers and gives the next block's inputs, and a paired pass of
    the model after the last block (from its cached outputs) quantizes the layers there."""
    steps = _steps(found, table)
    by_path = {layer.path: layer for layer in found}
    current = adapter.state
    cache = jax.device_get if offload else (lambda tree: tree)

    def segment(paths, run, bar=None):
        nonlocal current
        chosen = set(paths)
        part = [(layer, index) for layer, index in units if layer.path in chosen]
        state, reports, more = _in_paired_pass(adapter, part, steps, run, bar)
        for path in chosen & set(steps):  # the kernels this pass quantized
            layer = by_path[path]
            current = adapter.with_kernel(current, layer, adapter.kernel(state, layer))
        return reports, more

    reports, (inputs,) = segment(
        blocks.before,
        lambda programs, data: adapter.paired_pass(
            list(found), programs, batch, sequential=sequential, data=data, blocks=blocks
        ),
    )
    inputs = cache(inputs)
    for index in tqdm(range(len(blocks.paths)), desc="quantizing blocks", disable=not progress):
        start = time.perf_counter()
        rows, (outputs, memory) = segment(
            blocks.layers[index],
            lambda programs, data, index=index, inputs=inputs: adapter.block_pass(
                blocks, index, programs, inputs, sequential=sequential, data=data
            ),
        )
        inputs = [cache(outputs), *inputs[1:]]
        jax.block_until_ready(inputs)
        block = BlockReport(
            blocks.paths[index], len(rows), time.perf_counter() - start, int(memory)
        )
        logging.info("block %s: %.1fs, %.1f MiB", block.path, block.seconds, memory / 2**20)
        reports += [row._replace(block=block) for row in rows]
    after = [path for path in blocks.after if path in steps]
    if after:
        rows, _ = segment(
            blocks.after,
            lambda programs, data: adapter.paired_pass(
                list(found),
                programs,
                batch,
                sequential=sequential,
                data=data,
                blocks=blocks,
                carried=inputs[0],
            ),
        )
    else:
        rows = [
            _skipped(layer, index, adapter.kernel(current, layer))
            for layer, index in units
            if layer.path in set(blocks.after)
        ]
    return current, reports + rows


def _one_pass_budget() -> int:
    """Bytes the automatic schedule lets one paired pass's activations take: a quarter of the
    default device's memory (its `bytes_limit`), or of the host's physical memory where the
    device does not report it (CPU)."""
    stats = jax.devices()[0].memory_stats() or {}
    total = stats.get("bytes_limit") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(total) // 4


def _one_pass_bytes(
    calls: Sequence[ModuleCall], found: Sequence[Layer], scale: float, *, sequential: bool
) -> int:
    """An estimate of one paired pass's activation memory: every layer's input over the whole
    calibration set (`scale` times the first batch's), twice when sequential (X and X~). A
    stacked layer's input counts once per slice."""
    layers = {layer.path: layer for layer in found}
    total = 0
    for c in calls:
        layer = layers.get(c.path)
        if layer is not None and c.args and hasattr(c.args[0], "shape"):
            slices = int(np.prod(layer.stack_shape, dtype=np.int64))
            total += int(np.prod(c.args[0].shape)) * c.args[0].dtype.itemsize * slices
    return int(total * scale * (2 if sequential else 1))


def quantize_model(
    model: nn.Module | nnx.Module,
    *args: Any,
    spec: LayerSpec = DEFAULT_SPEC,
    rules: RulesLike | None = None,
    layers: RulesLike | None = None,
    apply_kwargs: Mapping[str, Any] | None = None,
    call: Callable[[Any, Any], Any] | None = None,
    mesh: Mesh | None = None,
    schedule: str | None = None,
    offload: bool = False,
    one_pass: bool | None = None,
    sequential: bool = True,
    progress: bool = True,
) -> tuple[Any, list[LayerReport]]:
    """Quantizes every Dense, DenseGeneral, Einsum and Conv kernel of a Flax model, in call order.

    Linen: `quantize_model(model, variables, calibration, ...)` returns (new variables, reports).
    NNX: `quantize_model(module, calibration, ...)` returns (a new module, reports) and leaves
    `module` untouched. The model may be a layer itself (`nnx.Linear(...)`, `nn.Dense(...)`).

    Layer l's method sees X (its input in the float model) and X~ (its input in the model whose
    earlier layers are quantized), accumulated over all calibration batches into `GramStats`.
    Embedding tables are left float (round them with `qjax.msq` if wanted); biases, normalization
    and every other variable stay as they were. Boxed Linen parameters (`nn.Partitioned`,
    `nn.with_logical_partitioning`) and NNX variable metadata (sharding names) are kept.

    Args:
      model: a Linen module (followed by its variables) or an NNX module, with any attributes
        (lists, config objects).
      *args: Linen: (variables, calibration); NNX: (calibration,). The calibration is one batch,
        a list of batches, or a function returning a fresh iterator of batches (each layer reads
        all of them once). A batch is what the model is called with: an array (preprocessed
        images, integer token ids), a tuple of positional arguments, a dict of keyword arguments
        (per-batch masks, positions, segment ids), or an (args tuple, kwargs dict) pair; every
        array in it has the batch (example) axis first. With `call`, a batch is any pytree of
        arrays that `call` takes.
      spec: the `LayerSpec` of every layer no rule matches.
      rules: ordered (pattern, LayerSpec) pairs (or a mapping); the first pattern that fully
        matches a layer's path (`re.fullmatch`, e.g. "blocks/attn/.*") gives its spec. Every
        pattern must match a layer. `LayerSpec(method="skip")` keeps a layer float.
      layers: the former name of `rules` (still accepted; give one of the two).
      apply_kwargs: keyword arguments of every forward pass (e.g. {"train": False}; Linen's
        `mutable` goes to `model.apply`). Arrays among them are passed to every batch's call
        as data; other values (numbers, strings, lists, None) are part of the program.
        NNX modules run in `eval()` mode.
      call: `call(model, batch) -> output`, how to run the model on one batch, for anything a
        batch of arguments cannot say (a `cache=None`, another method of a Linen module). The
        model is the NNX module, or the Linen module bound to its variables. `apply_kwargs`
        then holds only Linen's `mutable`.
      mesh: accumulate each layer's statistics data-parallel over this device mesh (and split
        GPFQ's neurons over it), see `qjax.stats`; the codes are those of the unsharded run.
        The forward passes run where the model and the batches are. On several hosts
        (`jax.distributed`), every process passes its own calibration batches, the same number
        of them, and gets the whole quantized model.
      schedule: how the model is run; all give the same codes up to the rounding of the
        statistics' sums.
        "one_pass": one compiled forward pass of the float model and the model being quantized
        side by side over all calibration examples at once, each layer quantized as the pass
        reaches it (fast: one compilation, two model evaluations in all; memory: the
        activations of the whole calibration set, twice).
        "block_wise": for a model built of a chain of blocks (a Python list or `nnx.List` of
        blocks, a Linen list attribute or `Block_0, Block_1, ...` submodules, each called on
        the previous one's output; see `qjax.adapters.base.find_blocks`): the model is run up
        to its first block and the block's inputs X and X~ over all calibration examples are
        cached; each block then runs alone on them, quantizing its layers in one paired pass
        (compiled once for blocks of one structure), and its outputs are the next block's
        inputs; the layers after the last block are quantized from its outputs. O(L) block
        evaluations; memory: one block's pass over the calibration set plus the cached inputs,
        independent of depth. Per-block time and memory are in the reports (`block`).
        "layer_by_layer": batch by batch (memory bounded by one batch; two forward passes per
        layer and batch, one compilation per layer; also over a `mesh`).
        None or "auto" (default): "one_pass" when the calibration is a batch or a list of
        batches whose arrays all have the same number of examples and no mesh is given, unless
        the model is built of blocks and the pass's activations (every layer's input over the
        calibration set, twice) would exceed a quarter of the device's memory (of the host's
        for a CPU): then "block_wise"; "layer_by_layer" for a function of batches (streamed
        data) or a mesh.
      offload: block-wise: keep the cached block inputs in host memory (moved to the device
        one block at a time) instead of device memory.
      one_pass: the former spelling of `schedule` (True: "one_pass", False:
        "layer_by_layer"); give one of the two.
      sequential: True (the GPFQ paper's order): layer l sees X~ from the model whose layers
        before it are quantized. False: every layer is quantized from the float model's inputs
        (X~ = X; no correction of the earlier layers' errors), as qwix's GPTQ and many GPTQ
        codes do: one float forward pass, a third of the statistics.
      progress: show a progress bar over layers.

    Returns:
      (quantized variables or module, one `LayerReport` per layer or slice in call order, with
      the alphabet each was quantized to).

    Raises:
      ValueError: a pattern that matches no layer; a kernel-owning layer that is not skipped and
        qjax cannot quantize (unknown kind, never called, called twice); calibration batches that
        are not arrays of numbers, not finite, not of the model's arguments (a dataset's
        (inputs, labels) pair), or not of the first batch's shapes; a model in training mode
        (the argument to pass is named); NaN or Inf in a weight, in a layer's input in the float
        model or in a layer's statistics, and token ids outside an embedding's table (the
        layer or variable, and the batch, are named). All before any layer is quantized, but
        the last.
    """
    if rules is not None and layers is not None:
        raise ValueError("give rules= or its former name layers=, not both")
    if one_pass is not None and schedule is not None:
        raise ValueError("give schedule= or its former spelling one_pass=, not both")
    if one_pass is not None:
        schedule = "one_pass" if one_pass else "layer_by_layer"
    schedule = schedule or "auto"
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if offload and schedule not in ("auto", "block_wise"):
        raise ValueError(f"offload=True keeps the block-wise schedule's cache; not {schedule!r}")
    if call is not None and set(apply_kwargs or {}) - {"mutable"}:
        raise ValueError(
            f"with call=, pass the forward pass's keyword arguments in the call itself, not in "
            f"apply_kwargs {sorted(apply_kwargs)}"
        )
    model_call, shared = ModelCall.make(call, apply_kwargs)
    adapter, calibration = _adapter(model, args, model_call)
    table = Rules(rules if rules is not None else layers, default=spec)
    batches = _Batches(calibration, call, shared)
    first = batches.first()
    batches.check_binds(model, adapter.call, first)
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
    _check_weights(adapter.state)
    _check_inputs(adapter, found, batches)
    unreached = []
    for name, shape in adapter.not_reached(found, first):
        logging.warning("%s enters a matrix product but is no layer qjax reaches", name)
        unreached.append(LayerReport(name, "?", "not reached", shape, None, None, None, 0))

    units = _in_forward_order(found)
    blocks = None
    if schedule == "auto":
        joinable = mesh is None and not batches.streamed
        schedule = (
            "one_pass" if joinable and all(map(batches.aligned, batches)) else "layer_by_layer"
        )
        if schedule == "one_pass":
            calls = adapter.module_calls(first)
            blocks = find_blocks(calls, found)
            fed = list(batches)
            scale = sum(_examples(b) for b in fed) / _examples(fed[0])
            needed = _one_pass_bytes(calls, found, scale, sequential=sequential)
            if blocks is not None and needed > _one_pass_budget():
                schedule = "block_wise"
    elif schedule == "block_wise":
        blocks = find_blocks(adapter.module_calls(first), found)
        if blocks is None:
            raise ValueError(
                f"schedule='block_wise' needs a model built of a chain of blocks, and "
                f"{type(model).__name__} has none: blocks are sibling submodules of one class (a "
                "list or nnx.List of them, a Linen list attribute), each called once on the "
                "previous one's output with the same other arguments, owning quantizable "
                "layers (scanned stacks are not split); give schedule='one_pass' or "
                "'layer_by_layer'"
            )
    if schedule in ("one_pass", "block_wise"):
        if mesh is not None:
            raise ValueError(
                f"schedule={schedule!r} runs on one device: give mesh= with "
                "schedule='layer_by_layer'"
            )
        batch = _joined(list(batches), schedule)
        if schedule == "one_pass":
            state, reports = _in_one_pass(
                adapter, found, units, table, batch, sequential=sequential, progress=progress
            )
        else:
            state, reports = _block_wise(
                adapter,
                found,
                units,
                table,
                batch,
                blocks,
                sequential=sequential,
                progress=progress,
                offload=offload,
            )
        return adapter.result(state), reports + unreached

    float_state = adapter.state
    current = float_state
    reports = []
    for layer, index in tqdm(units, desc="quantizing layers", disable=not progress):
        layer_spec = table.spec_for(layer.path)
        kernel = adapter.kernel(current, layer)
        if layer_spec.skip:
            reports.append(_skipped(layer, index, kernel))
            continue
        start = time.perf_counter()
        step = _LayerStep(layer_spec, layer_spec.layer_kind(layer.kind))
        kind = step.kind
        matrix = kind.to_matrix(kernel[index])
        stats = step.init_stats(matrix, mesh=mesh)
        for batch in batches:
            x = adapter.inputs(float_state, layer, index, batch)
            x_tilde = adapter.inputs(current, layer, index, batch) if sequential else x
            if mesh is None:
                stats = _add_rows(kind, stats, x, x_tilde)
            else:  # this process's rows, split over the mesh's devices
                stats = gram_stats_update(stats, _rows(kind, x), _rows(kind, x_tilde))
        # With a mesh, all of Q on this process, for the next forward passes.
        try:
            q, alphabet, errors = step.quantize(
                matrix, stats, gather=_gathered if mesh is not None else None
            )
        except ValueError as error:  # the method's own checks, which do not know the layer
            raise ValueError(f"layer {_name(layer, index)}: {error}") from error
        errors = np.asarray(errors)
        seconds = time.perf_counter() - start
        reports.append(_quantized(layer, index, step, kernel, alphabet, errors, seconds))
        new_kernel = kernel.at[index].set(kind.from_matrix(q).astype(kernel.dtype))
        current = adapter.with_kernel(current, layer, new_kernel)
    return adapter.result(current), reports + unreached


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
