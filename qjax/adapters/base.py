"""What the engine needs from a framework: find the layers, read and write kernels, capture inputs.

An adapter wraps one model (a Linen module and its variables, or an NNX module) and knows its
framework; `qjax.quantize_model` drives any adapter the same way and never asks which framework
it is. Adding a framework is one new adapter file.

Layers applied under `nn.scan` / `nnx.scan` own stacked kernels (L, ...): each slice l is its own
layer with its own inputs X and X~, quantized in order. Their inputs are captured from inside the
scan by an ordered host callback (the l-th call of the layer in a forward pass is slice l).

Two ways to drive a model, both given by every adapter:

* layer by layer (`inputs`): the engine captures one layer's X and X~ batch by batch, two
  forward passes per layer and batch, with bounded memory;
* in one pass (`paired_pass`): the float model and the model being quantized run side by side,
  as the two members of a `jax.vmap` over a pair axis named `PAIR_AXIS`, in one compiled program.
  At each layer call, `paired_kernel` gathers the layer's input of both members (X, X~), lets
  the engine's quantizer turn them and the kernel into Q, and hands member 0 the float kernel and
  member 1 the quantized one; the layers after it then see X~ computed with Q. The vmap keeps the
  two members apart whatever the model does across its batch axis. Not sequential (X~ = X: every
  layer quantized from the float model's inputs), the pass is one plain float forward pass;
* block by block (`paired_pass` with `blocks`, then `block_pass`): for a model built of a chain
  of blocks (`find_blocks`), the same paired pass of the model up to its first block, caching
  the block's inputs of both members; then of each block alone on its cached inputs, whose
  outputs are the next block's inputs; then of the model after its last block, from the last
  block's outputs.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import inspect
import threading
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from qjax.layers import LayerKind
from qjax.rules import path_name

__all__ = [
    "PAIR_AXIS",
    "Adapter",
    "BlockCall",
    "Blocks",
    "InputChecks",
    "Layer",
    "LayerQuantizer",
    "ModelCall",
    "ModuleCall",
    "PairedPass",
    "StackedInputs",
    "Static",
    "call_error",
    "find_blocks",
    "paired_kernel",
    "run_paired",
]

PAIR_AXIS = "qjax_pair"

# quantizer(kernel, x, x_tilde, data) -> (Q, errors): the engine's traced per-layer step (one
# slice of a stacked layer); errors = (relative error, MSQ's, 1 if the statistics are finite).
# Hashable, so that compiled passes are reused; `data` holds its numbers that are not part of the
# program (a scale constant C), a pytree of arrays or None.
LayerQuantizer = Callable[[jax.Array, jax.Array, jax.Array, Any], tuple[jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class Layer:
    """One kernel-owning layer of a model, as the adapter found it.

    Attributes:
      path: its name, "a/b/c" (see `qjax.rules`).
      kind: how its kernel is a matrix and its input rows (None: qjax cannot quantize it).
      type_name: the module's class name.
      stack_shape: leading kernel axes added by `scan` (empty for an ordinary layer).
      problem: why it cannot be quantized ("is never called", ...), or None.
      param: the name of its kernel parameter ("kernel", or a registered layer's own name).
    """

    path: str
    kind: LayerKind | None
    type_name: str
    stack_shape: tuple[int, ...] = ()
    problem: str | None = None
    param: str = "kernel"

    @classmethod
    def called(
        cls,
        path: str,
        kind: LayerKind | str,
        type_name: str,
        *,
        stored_shape: tuple[int, ...],
        seen_shape: tuple[int, ...],
        calls: int,
        param: str = "kernel",
    ) -> Layer:
        """A layer the forward pass called `calls` times, whose kernel has `stored_shape` in the
        variables and `seen_shape` inside the call (the difference: the axes added by `scan`);
        `kind` is its kind or why it has none."""
        stack = tuple(stored_shape[: len(stored_shape) - len(seen_shape)])
        problem = kind if isinstance(kind, str) else None
        if not stack and calls > 1:
            problem = "is called more than once (shared layers are not supported)"
        kind = None if isinstance(kind, str) else kind
        return cls(path, kind, type_name, stack, problem, param)


@dataclasses.dataclass(frozen=True, eq=False)
class Static:
    """A static argument of a compiled program (a model, a graph definition, a call).

    Compared by value (`==`), so a second call with an equal module reuses the program; hashed
    by value when the value hashes, and by its type otherwise: a module with a list, a dict or a
    `config` object among its attributes is never hashed, and equal ones still share a program.
    A value whose `==` fails (arrays among its attributes) is compared by identity.
    """

    value: Any

    def __hash__(self):
        try:
            return hash(self.value)
        except TypeError:
            return hash(type(self.value))

    def __eq__(self, other):
        if not isinstance(other, Static):
            return NotImplemented
        if self.value is other.value:
            return True
        if type(self.value) is not type(other.value):
            return False
        try:
            return bool(self.value == other.value)
        except Exception:
            return False


def is_array(value: Any) -> bool:
    """Whether `value` is an array (data of a batch, never a key of a compiled program)."""
    return isinstance(value, jax.Array | np.ndarray | np.generic)


@dataclasses.dataclass(frozen=True)
class ModelCall:
    """How the model is run on one calibration batch, inside every compiled pass.

    A batch reaches `__call__` as the pair (data, shared): `shared` holds the array keyword
    arguments common to all batches (from `apply_kwargs`). With a `hook`, the model is run as
    `hook(model, data)`; otherwise `data` is (args, kwargs) and the model is run as
    `model(*args, **kwargs, **shared, **kwargs of this call)`.

    Attributes:
      hook: the user's `call(model, batch) -> output`, or None.
      kwargs: the keyword arguments that are not arrays (`train=False`, ...), as sorted
        (name, `Static`) pairs: they key the compiled programs, whatever their type.
    """

    hook: Callable[[Any, Any], Any] | None = None
    kwargs: tuple[tuple[str, Static], ...] = ()

    @classmethod
    def make(
        cls, hook: Callable[[Any, Any], Any] | None, kwargs: Mapping[str, Any] | None
    ) -> tuple[ModelCall, dict[str, Any]]:
        """(the call, the array keyword arguments shared by every batch) from `apply_kwargs`."""
        kwargs = dict(kwargs or {})
        shared = {k: v for k, v in kwargs.items() if is_array(v)}
        static = tuple(sorted((k, Static(v)) for k, v in kwargs.items() if k not in shared))
        return cls(Static(hook) if hook is not None else None, static), shared

    def pop(self, name: str, default: Any = None) -> tuple[Any, ModelCall]:
        """(the keyword argument `name` or `default`, this call without it)."""
        kept = tuple((k, v) for k, v in self.kwargs if k != name)
        found = [v.value for k, v in self.kwargs if k == name]
        return (found[0] if found else default), dataclasses.replace(self, kwargs=kept)

    @property
    def keywords(self) -> dict[str, Any]:
        """The non-array keyword arguments."""
        return {k: v.value for k, v in self.kwargs}

    def __call__(self, model: Any, batch: Any) -> Any:
        data, shared = batch
        if self.hook is not None:
            return self.hook.value(model, data)
        args, kwargs = data
        return model(*args, **kwargs, **shared, **self.keywords)


@dataclasses.dataclass(frozen=True)
class ModuleCall:
    """One module call seen while tracing a forward pass (`Adapter.module_calls`).

    Attributes:
      path: the module's path ("layers/3"; "" for the model itself).
      type: the module's class.
      depth: how many module calls enclose it.
      args, kwargs: what it was called with (tracers for arrays).
      output: what it returned.
    """

    path: str
    type: type
    depth: int
    args: tuple
    kwargs: dict
    output: Any


@dataclasses.dataclass(frozen=True)
class BlockCall:
    """How every block of a chain is called: `block(x, *rest, **kwargs)`, where x is one array
    (the previous block's output) and the arrays among `rest` and `kwargs` (a mask, positions,
    rotary tables) are the same for every block.

    Attributes:
      treedef: the structure of (args, kwargs).
      arrays: how many array leaves it has (the first one is x).
      statics: the other leaves (None-free Python values), as (leaf index, `Static`) pairs.
    """

    treedef: Any
    arrays: int
    statics: tuple[tuple[int, Static], ...]

    @classmethod
    def of(cls, args: tuple, kwargs: dict) -> BlockCall:
        leaves, treedef = jax.tree.flatten((tuple(args), dict(kwargs)))
        statics = tuple((i, Static(v)) for i, v in enumerate(leaves) if not _is_traced(v))
        return cls(treedef, len(leaves) - len(statics), statics)

    def arguments(self, arrays: list) -> tuple[tuple, dict]:
        """(args, kwargs) of a block call from its array leaves (x first)."""
        arrays, statics = iter(arrays), dict(self.statics)
        leaves = [
            statics[i].value if i in statics else next(arrays)
            for i in range(self.arrays + len(self.statics))
        ]
        return jax.tree.unflatten(self.treedef, leaves)


def _is_traced(value: Any) -> bool:
    return isinstance(value, jax.Array | np.ndarray) or hasattr(value, "aval")


def _array_leaves(args: tuple, kwargs: dict) -> list:
    return [v for v in jax.tree.leaves((tuple(args), dict(kwargs))) if _is_traced(v)]


@dataclasses.dataclass(frozen=True)
class Blocks:
    """A model built of a chain of blocks, as `find_blocks` found it.

    Attributes:
      paths: the blocks' paths, in call order ("layers/0", "layers/1", ...).
      call: how each block is called (`BlockCall`).
      layers: per block, the paths of its layers, in call order.
      before: the layers called before the first block (an input projection).
      after: the layers called after the last block (a final head).
    """

    paths: tuple[str, ...]
    call: BlockCall
    layers: tuple[tuple[str, ...], ...]
    before: tuple[str, ...]
    after: tuple[str, ...]


def _inside(path: str, block: str) -> bool:
    return path.startswith(block + "/") if block else bool(path)


def find_blocks(calls: list[ModuleCall], layers: list[Layer]) -> Blocks | None:
    """The model's chain of blocks in a traced forward pass, or None.

    A chain is a run of calls of sibling modules (one parent, one class; a Python list or an
    `nnx.List` of blocks, a Linen list attribute, `Block_0, Block_1, ...`), each called once,
    with nothing called between them at their level, each on the previous one's output (the
    same object, no computation in between) and with the same other arguments, each returning
    one array shaped as its input x, each owning quantizable layers and no stacked (scanned)
    one, and every layer of the model called before the first block, inside one, or after the
    last. The longest such chain of at least two blocks (the first of equal ones) is the one.
    """
    called = [layer for layer in layers if layer.problem != "is never called"]
    layer_paths = {layer.path for layer in called}
    ends = []
    for i, c in enumerate(calls):  # the first call after c's own sub-calls
        j = i + 1
        while j < len(calls) and calls[j].depth > c.depth:
            j += 1
        ends.append(j)

    def block_like(c: ModuleCall) -> bool:
        leaves = jax.tree.leaves((tuple(c.args), dict(c.kwargs)))
        x = c.args[0] if c.args else None
        return (
            c.path not in layer_paths
            and bool(leaves)
            and leaves[0] is x
            and _is_traced(x)
            and _is_traced(c.output)
            and np.shape(c.output) == np.shape(x)
            and c.output.dtype == x.dtype
            and any(_inside(p, c.path) for p in layer_paths)
        )

    def follows(prev: ModuleCall, nxt: ModuleCall) -> bool:
        parent = lambda c: c.path.rpartition("/")[0]
        if not (
            nxt.depth == prev.depth
            and nxt.type is prev.type
            and parent(nxt) == parent(prev)
            and nxt.path != prev.path
            and block_like(nxt)
            and nxt.args[0] is prev.output
        ):
            return False
        a, a_def = jax.tree.flatten((tuple(prev.args), dict(prev.kwargs)))
        b, b_def = jax.tree.flatten((tuple(nxt.args), dict(nxt.kwargs)))
        return a_def == b_def and all(
            (u is v) if _is_traced(u) else Static(u) == Static(v)
            for u, v in zip(a[1:], b[1:], strict=True)
        )

    best: list[int] = []
    for start, c in enumerate(calls):
        if not block_like(c):
            continue
        chain = [start]
        while ends[chain[-1]] < len(calls) and follows(calls[chain[-1]], calls[ends[chain[-1]]]):
            chain.append(ends[chain[-1]])
        if len(chain) > max(len(best), 1):
            best = chain
    if not best:
        return None
    paths = tuple(calls[i].path for i in best)
    if len(set(paths)) != len(paths):
        return None
    owner = [
        next((k for k, p in enumerate(paths) if _inside(layer.path, p)), None) for layer in called
    ]
    if any(k is not None and layer.stack_shape for k, layer in zip(owner, called, strict=True)):
        return None
    inside = [k for k in owner if k is not None]
    first = owner.index(0) if 0 in owner else None
    last = len(owner) - owner[::-1].index(len(paths) - 1) if len(paths) - 1 in owner else None
    if first is None or last is None or inside != sorted(inside):
        return None
    if any(k is None for k in owner[first:last]):
        return None  # a layer outside the blocks called between them
    per_block = [[] for _ in paths]
    for k, layer in zip(owner, called, strict=True):
        if k is not None:
            per_block[k].append(layer.path)
    if not all(per_block):
        return None
    head = calls[best[0]]
    return Blocks(
        paths,
        BlockCall.of(head.args, head.kwargs),
        tuple(map(tuple, per_block)),
        tuple(layer.path for layer in called[:first]),
        tuple(layer.path for layer in called[last:]),
    )


class InputChecks:
    """What a checking forward pass saw, sent to the host by callbacks (also from inside
    `scan`): per layer, whether all its inputs were finite; per embedding, the range of the
    token ids it looked up."""

    _lock = threading.Lock()
    finite: dict[str, bool] = {}  # noqa: RUF012 (one shared sink, as `StackedInputs`)
    ids: dict[str, tuple[int, int, int]] = {}  # noqa: RUF012

    @classmethod
    def record_input(cls, path: str, x: jax.Array) -> None:
        """Called inside the traced pass with a quantizable layer's input."""
        if jnp.issubdtype(x.dtype, jnp.inexact):
            jax.debug.callback(functools.partial(cls._finite, path), jnp.all(jnp.isfinite(x)))

    @classmethod
    def record_ids(cls, path: str, ids: jax.Array, num_embeddings: int) -> None:
        """Called inside the traced pass with an embedding's token ids."""
        if jnp.issubdtype(ids.dtype, jnp.integer) and ids.size:
            jax.debug.callback(
                functools.partial(cls._ids, path, num_embeddings), jnp.min(ids), jnp.max(ids)
            )

    @classmethod
    def _finite(cls, path, finite) -> None:
        cls.finite[path] = cls.finite.get(path, True) and bool(finite)

    @classmethod
    def _ids(cls, path, num_embeddings, low, high) -> None:
        old_low, old_high, _ = cls.ids.get(path, (int(low), int(high), num_embeddings))
        cls.ids[path] = (min(old_low, int(low)), max(old_high, int(high)), num_embeddings)

    @classmethod
    def collect(cls, run) -> tuple[dict[str, bool], dict[str, tuple[int, int, int]]]:
        """Runs `run()` (a forward pass calling `record_*`); returns (finite, ids)."""
        with cls._lock:
            cls.finite, cls.ids = {}, {}
            run()
            jax.effects_barrier()
            out = cls.finite, cls.ids
            cls.finite, cls.ids = {}, {}
        return out


# Operations after which an array still is the parameter it came from (a view of it), and the
# matrix products a parameter may enter.
_VIEWS = frozenset(
    {
        "transpose",
        "reshape",
        "convert_element_type",
        "squeeze",
        "expand_dims",
        "broadcast_in_dim",
        "copy",
        "copy_p",
        "reduce_precision",
        "slice",
        "dynamic_slice",
        "rev",
    }
)
_PRODUCTS = frozenset({"dot_general", "conv_general_dilated", "ragged_dot"})


def _sub_jaxprs(eqn) -> list:
    """The jaxprs an equation calls (jit, scan, checkpoint, custom derivatives, cond branches)."""
    found = []
    for value in eqn.params.values():
        for item in value if isinstance(value, tuple | list) else (value,):
            item = getattr(item, "jaxpr", item)  # a ClosedJaxpr's Jaxpr
            if hasattr(item, "eqns") and hasattr(item, "invars"):
                found.append(item)
    return found


def multiplied_leaves(fn: Callable[[Any, Any], Any], state: Any, batch: Any) -> set[int]:
    """The indices (in `jax.tree.leaves(state)` order) of the leaves of `state` that enter a
    matrix product (`dot_general`, a convolution), directly or through views (transposes,
    reshapes, casts, slices: a scanned stack's slice), when `fn(state, batch)` runs."""
    jaxpr = jax.make_jaxpr(fn)(state, batch).jaxpr
    count = len(jax.tree.leaves(state))
    multiplied: set[int] = set()

    def walk(jaxpr, origin: dict) -> None:
        for eqn in jaxpr.eqns:
            ins = [origin.get(v) if type(v).__name__ != "Literal" else None for v in eqn.invars]
            if eqn.primitive.name in _PRODUCTS:
                multiplied.update(i for i in ins if i is not None)
            elif eqn.primitive.name in _VIEWS and ins and ins[0] is not None:
                origin.update(dict.fromkeys(eqn.outvars, ins[0]))
            for sub in _sub_jaxprs(eqn):
                args = ins if len(sub.invars) == len(ins) else ins[len(ins) - len(sub.invars) :]
                if len(args) == len(sub.invars):
                    walk(
                        sub, {v: i for v, i in zip(sub.invars, args, strict=True) if i is not None}
                    )

    walk(jaxpr, {v: i for i, v in enumerate(jaxpr.invars[:count])})
    return multiplied


_TRAIN_FLAGS = {"train": False, "training": False, "is_training": False, "deterministic": True}


def call_error(error: Exception, model_type: type, batch: Any) -> str:
    """What to tell the user when the model cannot run on a calibration batch: the error, and
    the argument to pass when it comes from a model left in training mode (BatchNorm updating
    its statistics, or a required `train` flag)."""
    text = str(error)
    shapes = jax.tree.map(lambda leaf: tuple(np.shape(leaf)), batch[0])
    message = f"calibration batches of shapes {shapes} do not fit the model: {text}"
    training = (
        "use_running_average" in text
        or ("batch_stats" in text and "immutable" in text)
        or any(f"argument: '{flag}'" in text for flag in _TRAIN_FLAGS)
    )
    if not training:
        return message
    try:
        parameters = inspect.signature(model_type.__call__).parameters
    except (TypeError, ValueError):
        parameters = {}
    flags = {name: value for name, value in _TRAIN_FLAGS.items() if name in parameters}
    hint = (
        f"pass apply_kwargs={flags!r}"
        if flags
        else "pass the argument of your model that sets BatchNorm's use_running_average=True "
        "in apply_kwargs (e.g. apply_kwargs={'train': False})"
    )
    return (
        f"the model runs in training mode on the calibration batches (BatchNorm must use its "
        f"running statistics): {hint}. ({text})"
    )


class Adapter(abc.ABC):
    """The framework side of `quantize_model`. `state` is the adapter's own representation of the
    model's variables (Linen: the variables dict; NNX: an `nnx.State`); `call` is how a batch is
    fed to the model (less the framework's own keyword arguments, such as Linen's `mutable`)."""

    call: ModelCall

    @abc.abstractmethod
    def layers(self, batch: Any) -> list[Layer]:
        """The kernel-owning layers, in the order the forward pass on `batch` calls them."""

    @property
    @abc.abstractmethod
    def state(self) -> Any:
        """The model's float variables."""

    @abc.abstractmethod
    def kernel(self, state: Any, layer: Layer) -> jax.Array:
        """The layer's kernel in `state` (with its stack axes)."""

    @abc.abstractmethod
    def with_kernel(self, state: Any, layer: Layer, kernel: jax.Array) -> Any:
        """`state` with the layer's kernel replaced."""

    @abc.abstractmethod
    def inputs(self, state: Any, layer: Layer, index: tuple[int, ...], batch: Any) -> jax.Array:
        """The input of `layer` (slice `index` of a stacked layer) when the model with variables
        `state` runs on `batch`."""

    @abc.abstractmethod
    def forward(self, state: Any, batch: Any) -> Any:
        """The model's output on `batch` with variables `state` (traceable)."""

    @abc.abstractmethod
    def kernel_name(self, layer: Layer) -> str:
        """The path of the layer's kernel in `state` (`qjax.rules.path_name`)."""

    def not_reached(self, layers: list[Layer], batch: Any) -> list[tuple[str, tuple[int, ...]]]:
        """(path, shape) of the floating variables that enter a matrix product in the forward
        pass on `batch` but are not the kernel of one of `layers` (a custom layer's own
        parameter, a tied embedding): what quantization does not reach."""
        leaves = jax.tree_util.tree_leaves_with_path(self.state)
        reached = {self.kernel_name(layer) for layer in layers}
        out = []
        for index in sorted(multiplied_leaves(self.forward, self.state, batch)):
            keypath, leaf = leaves[index]
            name = path_name(keypath)
            if name not in reached and jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
                out.append((name, tuple(np.shape(leaf))))
        return out

    @abc.abstractmethod
    def check_inputs(
        self, layers: list[Layer], batch: Any
    ) -> tuple[dict[str, bool], dict[str, tuple[int, int, int]]]:
        """One float forward pass on `batch` (`InputChecks.collect`): ({layer path: whether all
        its inputs are finite} for `layers`, {embedding path: (lowest id, highest id, number of
        embeddings)})."""

    @abc.abstractmethod
    def paired_pass(
        self,
        layers: list[Layer],
        quantizers: Mapping[str, LayerQuantizer],
        batch: Any,
        *,
        sequential: bool,
        data: Mapping[str, Any],
        blocks: Blocks | None = None,
        carried: Any = None,
    ) -> tuple[Any, dict[str, np.ndarray], Any]:
        """One forward pass on `batch` (`run_paired`) quantizing, in call order, every layer of
        `quantizers` (by path) with `paired_kernel`, given its quantizer's `data` (by path:
        arguments of the compiled pass, not part of it).

        With `blocks`, no block runs: the first one's array arguments are captured, and it
        returns `carried` (each member's output of the last block: the pass then reaches the
        layers after the blocks) or its input x; every later block returns its input.

        Returns:
          (the float state with those layers' kernels quantized, {path: errors of shape
          stack_shape + (3,)}, the first block's array arguments of each member (pair axis
          first when sequential) or None without `blocks`).
        """

    @abc.abstractmethod
    def block_pass(
        self,
        blocks: Blocks,
        index: int,
        quantizers: Mapping[str, LayerQuantizer],
        inputs: list[jax.Array],
        *,
        sequential: bool,
        data: Mapping[str, Any],
    ) -> tuple[Any, dict[str, np.ndarray], jax.Array, int]:
        """A paired pass of block `index` alone, on each member's array arguments `inputs`
        (`BlockCall`; pair axis first when sequential), quantizing the layers of `quantizers`
        (by their paths in the model). Blocks of one structure and specs share a compiled
        program.

        Returns:
          (the float state with those layers' kernels quantized, {path: errors (3,)}, each
          member's output of the block, the compiled pass's memory in bytes: arguments,
          outputs and temporaries).
        """

    @abc.abstractmethod
    def module_calls(self, batch: Any) -> list[ModuleCall]:
        """Every module call of a traced forward pass on `batch`, in call order."""

    @abc.abstractmethod
    def result(self, state: Any) -> Any:
        """What `quantize_model` returns for `state` (variables, or a new module)."""


class StackedInputs:
    """Collects, through an ordered host callback, every input a stacked layer receives during
    one forward pass (call k is slice k, the stack axes flattened in order)."""

    _lock = threading.Lock()
    _calls: list[np.ndarray] = []  # noqa: RUF012 (one shared sink: compiled programs refer to it)

    @classmethod
    def record(cls, x: jax.Array) -> None:
        """Called inside the traced forward pass with the layer's input."""
        io_callback(cls._append, None, x, ordered=True)

    @classmethod
    def _append(cls, x) -> None:
        cls._calls.append(np.asarray(x))

    @classmethod
    def collect(cls, run, flat_index: int) -> np.ndarray:
        """Runs `run()` (a forward pass calling `record`); returns call `flat_index`'s input."""
        with cls._lock:
            cls._calls.clear()
            run()
            jax.effects_barrier()
            calls, cls._calls = cls._calls, []
        if flat_index >= len(calls):
            raise ValueError(
                f"the stacked layer was called {len(calls)} times in one forward pass, but its "
                f"kernel has a slice {flat_index}: is it applied under scan over all its slices?"
            )
        return calls[flat_index]


class PairedPass:
    """Progress of a running paired pass: `listener(errors)` (set by the engine) is called on the
    host as each layer (slice) is quantized."""

    listener: Callable[[np.ndarray], None] | None = None

    @classmethod
    def _layer_done(cls, errors) -> None:
        if cls.listener is not None:
            cls.listener(np.asarray(errors))


def paired_kernel(
    kernel: jax.Array, x: jax.Array, quantizer: LayerQuantizer, data: Any, *, sequential: bool
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Inside `run_paired`, at one layer call: the kernel this member computes with, Q, and the
    layer's errors.

    Args:
      kernel: the layer's float kernel W (the slice, under scan), the same in both members.
      x: this member's input of the layer: X in member 0 (float), X~ in member 1; not
        sequential, the float model's input X (then X~ = X).
      quantizer: the engine's step for this layer.
      data: the quantizer's numbers (see `LayerQuantizer`).
      sequential: as in `run_paired`.

    Returns:
      (W in member 0 and Q in member 1, or W when not sequential; Q; the errors (3,)).
    """
    if sequential:
        both = jax.lax.all_gather(x, PAIR_AXIS)  # one value, not per member: quantized once
        q, errors = quantizer(kernel, both[0], both[1], data)
        member = jax.lax.axis_index(PAIR_AXIS)
        used = jnp.where(member == 0, kernel, q.astype(kernel.dtype))
    else:
        q, errors = quantizer(kernel, x, x, data)
        used = kernel
    jax.debug.callback(PairedPass._layer_done, errors)
    return used, q.astype(kernel.dtype), errors


KEPT_PAIRED_PASSES = 4


def compiled_per_spec(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn(model, quantizers, call, sequential, state, batch, data)` jit-compiled once per
    distinct static first four arguments, keeping only the `KEPT_PAIRED_PASSES` most recently
    used compilations.

    Every set of layer specs (a method, an alphabet size and layout) is its own program; numbers
    that do not change it (a scale constant C) are `data`, so a sweep over C compiles once. A
    plain `jax.jit` keeps each one for the life of the process, and a sweep over a few dozen
    specs then runs out of memory for compiled code (on CPU, the 64-spec CIFAR-10 CNN sweep of
    `experiments/gpfq` failed at its 64th). Dropping a jitted function frees its programs.
    """

    @functools.lru_cache(maxsize=KEPT_PAIRED_PASSES)
    def compiled(*static: Any) -> Callable[..., Any]:
        return jax.jit(functools.partial(fn, *static))

    @functools.wraps(fn)
    def run(model, quantizers, call, sequential, state, batch, data):
        return compiled(model, quantizers, call, sequential)(state, batch, data)

    def memory(model, quantizers, call, sequential, state, batch, data) -> int:
        """Bytes of the compiled program (arguments, outputs, temporaries) as XLA plans them."""
        lowered = compiled(model, quantizers, call, sequential).lower(state, batch, data)
        stats = lowered.compile().memory_analysis()
        if stats is None:
            return 0
        return int(
            stats.argument_size_in_bytes
            + stats.output_size_in_bytes
            + stats.temp_size_in_bytes
            - stats.alias_size_in_bytes
        )

    run.cache_info = compiled.cache_info
    run.memory = memory
    return run


def run_paired(
    member: Callable[[Any, Any], tuple[Any, Any]],
    state: Any,
    paired: Any = None,
    *,
    sequential: bool,
) -> tuple[Any, Any]:
    """Runs `member(state, paired) -> (out, carried)`, a forward pass whose layer calls use
    `paired_kernel`.

    Sequential: twice side by side, `jax.vmap` over a pair axis named `PAIR_AXIS` (member 0 the
    float model, member 1 the model being quantized), `state` shared and `paired` split along
    its leading pair axis (each member's own inputs, e.g. a block's cached X and X~); returns
    (member 1's `out`, both members' `carried` with the pair axis). Otherwise once, the float
    model, on `paired` without a pair axis.
    """
    if not sequential:
        return member(state, paired)
    out, carried = jax.vmap(member, in_axes=(None, 0), axis_name=PAIR_AXIS, axis_size=2)(
        state, paired
    )
    return jax.tree.map(lambda leaf: leaf[1], out), carried
