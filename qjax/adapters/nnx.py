"""The Flax NNX adapter: layers found and inputs captured by recording their calls.

`nnx.Linear`, `nnx.LinearGeneral` (without `batch_axis`), `nnx.Einsum` and `nnx.Conv` are
quantizable, also inside `nnx.scan` over modules created with `nnx.vmap` (stacked kernels). A
layer's path is its attribute path in the module graph, e.g. "blocks/attn/query" or
"layers/0/mlp/fc1" (the same names as in `nnx.state(module)`, without "kernel").

The adapter never touches the user's module: it works on a copy in evaluation mode
(`Module.eval()`: dropout off, BatchNorm on running statistics), in which every quantizable
layer carries its path as a static attribute, so that the layer can be recognised inside
`nnx.scan`, where NNX rebuilds modules from their graph definition.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qjax import layers as kinds
from qjax.adapters.base import (
    Adapter,
    BlockCall,
    InputChecks,
    Layer,
    ModelCall,
    ModuleCall,
    StackedInputs,
    Static,
    call_error,
    compiled_per_spec,
    paired_kernel,
    run_paired,
)
from qjax.adapters.base import _array_leaves as array_leaves
from qjax.patches import ConvGeometry
from qjax.rules import path_name

__all__ = ["NNXAdapter"]

_PATH_ATTRIBUTE = "_qjax_path"
_LAYER_TYPES = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum, nnx.Conv)


def _kind(module: nnx.Module, kernel_shape, call_kwargs) -> kinds.LayerKind | str:
    registered = kinds.registered_layer(module)
    if registered is not None:
        return registered.kind_of(module, kernel_shape)
    if isinstance(module, nnx.Linear):
        return kinds.Dense()
    if isinstance(module, nnx.LinearGeneral):
        if module.batch_axis:
            return "is an nnx.LinearGeneral with batch_axis (not supported)"
        n_in = len(module.in_features)
        return kinds.General(
            in_shape=tuple(kernel_shape[:n_in]),
            out_shape=tuple(kernel_shape[n_in:]),
            axis=tuple(module.axis),
        )
    if isinstance(module, nnx.Einsum):
        spec = call_kwargs.get("einsum_str") or module.einsum_str
        return kinds.Einsum(spec.replace(" ", ""), tuple(kernel_shape))
    if isinstance(module, nnx.Conv):

        def tupled(value):
            return () if value is None else value

        return kinds.Conv(
            ConvGeometry(
                kernel_size=tuple(kernel_shape[:-2]),
                strides=tupled(module.strides),
                padding=module.padding,
                input_dilation=tupled(module.input_dilation),
                kernel_dilation=tupled(module.kernel_dilation),
                feature_group_count=module.feature_group_count,
            )
        )
    return f"is a {type(module).__name__}"


def _param(module) -> str:
    """The name of a module's kernel attribute."""
    registered = kinds.registered_layer(module)
    return registered.param if registered is not None else "kernel"


def _defining(cls: type) -> type | None:
    """The class of `cls`'s MRO that defines its `__call__` (an NNX module class), or None."""
    for base in cls.__mro__:
        if "__call__" in vars(base):
            return base if issubclass(base, nnx.Module) else None
    return None


@contextlib.contextmanager
def _recording(around, extra=()):
    """Makes every call of a quantizable NNX layer (built in or registered, and of the classes
    `extra`) run as `around(module, call, args, kwargs)`, where `call(*args, **kwargs)` is the
    module's own call."""
    types = [*_LAYER_TYPES, *kinds.registered_classes(), *extra]
    types = [cls for cls in dict.fromkeys(map(_defining, types)) if cls is not None]
    originals = {cls: cls.__call__ for cls in types}

    def wrap(cls):
        original = originals[cls]

        @functools.wraps(original)
        def call(self, *args, **kwargs):
            return around(self, functools.partial(original, self), args, kwargs)

        return call

    try:
        for cls in types:
            cls.__call__ = wrap(cls)
        yield
    finally:
        for cls, original in originals.items():
            cls.__call__ = original


def _before(hook):
    """An `around` for `_recording` that calls `hook(module, args, kwargs)` before the call."""

    def around(module, call, args, kwargs):
        hook(module, args, kwargs)
        return call(*args, **kwargs)

    return around


def _value(variable) -> jax.Array:
    return variable.get_value() if hasattr(variable, "get_value") else variable.value


def _set_value(variable, value) -> None:
    if hasattr(variable, "set_value"):
        variable.set_value(value)
    else:
        variable.value = value


class _PassOutput(nnx.Variable):
    """What a paired pass leaves on a layer: Q (the kernel's shape), or its errors (relative
    error, MSQ's, with the kernel's stack axes)."""


_Q_ATTRIBUTE = "_qjax_q"
_ERRORS_ATTRIBUTE = "_qjax_errors"


class NNXAdapter(Adapter):
    """An NNX module (left untouched: the adapter works on a tagged copy). Variables keep their
    metadata (sharding names) through quantization.

    Args:
      module: the NNX module (any attributes: lists, dicts, config objects), or a layer itself.
      call: how a batch is fed to the module.
    """

    def __init__(self, module: nnx.Module, call: ModelCall):
        if not isinstance(module, nnx.Module):
            raise ValueError(f"expected an nnx.Module, got {type(module).__name__}")
        self._type = type(module)
        copy = nnx.clone(module)
        if hasattr(copy, "eval"):
            copy.eval()
        self._paths: dict[str, tuple[Any, ...]] = {}  # of the kernel-owning layers
        self._params: dict[str, str] = {}
        self._modules: dict[str, tuple[Any, ...]] = {}  # of every module (blocks among them)
        for keypath, sub in _tagged(copy):
            self._modules[sub._qjax_path] = tuple(keypath)
            if hasattr(sub, _param(sub)):
                self._paths[sub._qjax_path] = tuple(keypath)
                self._params[sub._qjax_path] = _param(sub)
        self.graphdef, self._state = nnx.split(copy)
        self._graphdef = Static(self.graphdef)
        self.call = call

    @property
    def state(self):
        return self._state

    def layers(self, batch) -> list[Layer]:
        calls: dict[str, tuple[nnx.Module, tuple[int, ...], dict]] = {}
        counts: dict[str, int] = {}

        def hook(module, args, kwargs):
            name = getattr(module, _PATH_ATTRIBUTE, None)
            if name in self._params:
                shape = tuple(np.shape(_value(getattr(module, self._params[name]))))
                calls.setdefault(name, (module, shape, dict(kwargs)))
                counts[name] = counts.get(name, 0) + 1

        def forward(state, batch):
            return self.call(nnx.merge(self.graphdef, state), batch)

        try:
            with _recording(_before(hook)):
                jax.eval_shape(forward, self._state, batch)
        except (TypeError, ValueError, AssertionError) as error:
            raise ValueError(call_error(error, self._type, batch)) from error

        found = []
        for name, (module, seen_shape, kwargs) in calls.items():
            found.append(
                Layer.called(
                    name,
                    _kind(module, seen_shape, kwargs),
                    type(module).__name__,
                    stored_shape=tuple(np.shape(self._variable(self._state, name))),
                    seen_shape=seen_shape,
                    calls=counts[name],
                    param=self._params[name],
                )
            )
        for name in self._paths:
            if name not in calls:
                found.append(Layer(name, None, "?", (), "is never called"))
        return found

    def _variable(self, state, path: str) -> nnx.Variable:
        node = state
        for key in self._paths[path]:
            node = node[key]
        return node[self._params[path]]

    def forward(self, state, batch):
        return self.call(nnx.merge(self.graphdef, state), batch)

    def kernel_name(self, layer: Layer) -> str:
        return "/".join([*([layer.path] if layer.path else []), layer.param])

    def kernel(self, state, layer: Layer) -> jax.Array:
        return _value(self._variable(state, layer.path))

    def with_kernel(self, state, layer: Layer, kernel: jax.Array):
        target = self._variable(state, layer.path)

        def replace(leaf):
            if leaf is target:
                return leaf.replace(kernel)
            return leaf

        return jax.tree.map(replace, state, is_leaf=lambda x: isinstance(x, nnx.Variable))

    def inputs(self, state, layer: Layer, index, batch) -> jax.Array:
        if not layer.stack_shape:
            with _recording(_before(_capture_hook)):
                return _layer_input(self._graphdef, layer.path, self.call, state, batch)
        flat = int(np.ravel_multi_index(index, layer.stack_shape))

        def run():
            with _recording(_before(_capture_hook)):
                _stacked_pass(self._graphdef, layer.path, self.call, state, batch)

        return jax.numpy.asarray(StackedInputs.collect(run, flat))

    def check_inputs(self, layers, batch):
        paths = frozenset(layer.path for layer in layers)

        def run():
            with _recording(_before(_check_hook), (nnx.Embed,)):
                _checking_pass(self._graphdef, paths, self.call, self._state, batch)

        return InputChecks.collect(run)

    def module_calls(self, batch) -> list[ModuleCall]:
        calls: list[ModuleCall | None] = []
        stack: list[nnx.Module] = []

        def around(module, call, args, kwargs):
            path = getattr(module, _PATH_ATTRIBUTE, None)
            if path is None or (stack and stack[-1] is module):  # a super().__call__
                return call(*args, **kwargs)
            stack.append(module)
            calls.append(None)
            index = len(calls) - 1
            try:
                out = call(*args, **kwargs)
            finally:
                stack.pop()
            calls[index] = ModuleCall(path, type(module), len(stack), args, kwargs, out)
            return out

        module = nnx.merge(self.graphdef, self._state)
        types = {type(sub) for _, sub in nnx.iter_graph(module) if isinstance(sub, nnx.Module)}
        with _recording(around, types):
            jax.eval_shape(self.forward, self._state, batch)
        return [c for c in calls if c is not None]

    def paired_pass(
        self, layers, quantizers, batch, *, sequential, data, blocks=None, carried=None
    ):
        stacks = {layer.path: layer.stack_shape for layer in layers}
        module = nnx.merge(self.graphdef, self._state)
        run = _Whole(self.call)
        if blocks is not None:
            classes = (type(_submodule(module, self._modules[p])) for p in blocks.paths)
            run = _Whole(self.call, blocks.paths, tuple(dict.fromkeys(classes)))
        entries = [(path, self._paths[path], self._params[path]) for path in quantizers]
        graphdef, named, state = _with_slots(module, entries, stacks, quantizers)
        out, captured = _paired_pass(
            graphdef, named, run, sequential, state, (batch, carried), dict(data)
        )
        current, errors = self._written(out, lambda path: path)
        return current, errors, captured

    def block_pass(self, blocks, index, quantizers, inputs, *, sequential, data):
        root = blocks.paths[index]
        block = _submodule(nnx.merge(self.graphdef, self._state), self._modules[root])
        _tagged(block)  # paths inside the block: blocks of one structure share a program
        relative = lambda path: path[len(root) + 1 :] if root else path
        depth = len(self._modules[root])
        entries = [
            (relative(path), self._paths[path][depth:], self._params[path]) for path in quantizers
        ]
        graphdef, named, state = _with_slots(
            block, entries, {}, {relative(p): q for p, q in quantizers.items()}
        )
        args = (
            graphdef,
            named,
            _Alone(blocks.call),
            sequential,
            state,
            (None, inputs),
            {relative(path): data[path] for path in quantizers},
        )
        out, outputs = _paired_pass(*args)
        memory = _paired_pass.memory(*args)
        full = {relative(path): path for path in quantizers}
        current, errors = self._written(out, full.__getitem__)
        return current, errors, outputs, memory

    def _written(self, out, full_path) -> tuple[nnx.State, dict[str, np.ndarray]]:
        """The float state with the pass's Q written in, and the errors, by full layer path."""
        current, errors = self._state, {}
        for path, (kernel, error) in out.items():
            current = self.with_kernel(current, Layer(full_path(path), None, ""), kernel)
            errors[full_path(path)] = np.asarray(error)
        return current, errors

    def result(self, state) -> nnx.Module:
        return nnx.merge(self.graphdef, state)


def _submodule(module: nnx.Module, keys: tuple[Any, ...]) -> nnx.Module:
    """The module at a key path of `nnx.iter_graph` (attribute names, list indices)."""
    for key in keys:
        module = module[key] if isinstance(key, int) else getattr(module, key)
    return module


def _tagged(root: nnx.Module) -> list[tuple[tuple[Any, ...], nnx.Module]]:
    """Gives every module under `root` its path from `root` as a static attribute (recognised
    inside compiled passes and `nnx.scan`); returns (key path, module) pairs."""
    found = []
    for keypath, sub in nnx.iter_graph(root):
        if isinstance(sub, nnx.Module):
            object.__setattr__(sub, _PATH_ATTRIBUTE, path_name(keypath))
            found.append((keypath, sub))
    return found


def _with_slots(root, entries, stacks, quantizers):
    """(graph definition, quantizers, state) of `root` with slots for each layer's Q and errors,
    scanned like its kernel; `entries` are (path, key path from root, parameter name)."""
    for path, keys, param in entries:
        owner = _submodule(root, keys)
        kernel = _value(getattr(owner, param))
        setattr(owner, _Q_ATTRIBUTE, _PassOutput(jnp.zeros_like(kernel)))
        setattr(owner, _ERRORS_ATTRIBUTE, _PassOutput(jnp.zeros((*stacks.get(path, ()), 3))))
    graphdef, state = nnx.split(root)
    named = tuple((path, keys, param, quantizers[path]) for path, keys, param in entries)
    return Static(graphdef), named, state


@dataclasses.dataclass(frozen=True)
class _Whole:
    """A paired pass's forward computation: the whole model on a batch. With `blocks` (their
    paths; `classes` those of their modules), no block runs (see `Adapter.paired_pass`):
    returns the first block's array arguments."""

    call: ModelCall
    blocks: tuple[str, ...] = ()
    classes: tuple[type, ...] = ()

    def __call__(self, module, layer_around, batch, carried):
        captured = []

        def around(sub, call, args, kwargs):
            path = getattr(sub, _PATH_ATTRIBUTE, None)
            if path is None or path not in self.blocks:
                return layer_around(sub, call, args, kwargs)
            if path != self.blocks[0]:
                return args[0]
            captured.append(array_leaves(args, kwargs))
            return args[0] if carried is None else carried

        with _recording(around, self.classes):
            self.call(module, batch)
        return captured[0] if self.blocks else None


@dataclasses.dataclass(frozen=True)
class _Alone:
    """A paired pass's forward computation: one block on its array arguments; returns its
    output."""

    call: BlockCall

    def __call__(self, module, layer_around, batch, inputs):
        args, kwargs = self.call.arguments(inputs)
        with _recording(layer_around):
            return module(*args, **kwargs)


class _Target:
    """The layer being captured during one trace, and what it received."""

    path: str | None = None
    stacked: bool = False
    checked: frozenset[str] = frozenset()
    captured: list = []  # noqa: RUF012


def _capture_hook(module, args, kwargs):
    if getattr(module, _PATH_ATTRIBUTE, None) == _Target.path:
        if _Target.stacked:
            StackedInputs.record(args[0])
        else:
            _Target.captured.append(args[0])


def _is_embed(module) -> bool:
    return isinstance(module, nnx.Embed)


def _check_hook(module, args, kwargs):
    name = getattr(module, _PATH_ATTRIBUTE, None)
    if name is None or not args:
        return
    if _is_embed(module):
        InputChecks.record_ids(name, args[0], module.num_embeddings)
    elif name in _Target.checked:
        InputChecks.record_input(name, args[0])


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _checking_pass(graphdef, paths, call, state, batch):
    """A float forward pass sending the layers' inputs and embeddings' ids to `InputChecks`."""
    _Target.checked = paths
    call(nnx.merge(graphdef.value, state), batch)
    _Target.checked = frozenset()


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _layer_input(graphdef, path, call, state, batch):
    """The input of the layer at `path` on one batch (compiled once per layer)."""
    _Target.path, _Target.stacked, _Target.captured = path, False, []
    call(nnx.merge(graphdef.value, state), batch)
    captured, _Target.captured, _Target.path = _Target.captured, [], None
    return captured[0]


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _stacked_pass(graphdef, path, call, state, batch):
    """A forward pass sending every input of the stacked layer at `path` to `StackedInputs`."""
    _Target.path, _Target.stacked = path, True
    call(nnx.merge(graphdef.value, state), batch)
    _Target.path = None


@compiled_per_spec
def _paired_pass(graphdef, quantizers, run, sequential, state, inputs, data):
    """`NNXAdapter.paired_pass` and `block_pass` as one compiled program: ({path: (Q, errors)},
    what `run` returns). `inputs` is (the batch, each member's own inputs)."""
    by_path = {path: (param, quantizer) for path, _, param, quantizer in quantizers}

    def hook(module, args, kwargs):
        module_path = getattr(module, _PATH_ATTRIBUTE, None)
        found = by_path.get(module_path)
        if found is not None:
            param, quantizer = found
            kernel, q, errors = paired_kernel(
                _value(getattr(module, param)),
                args[0],
                quantizer,
                data[module_path],
                sequential=sequential,
            )
            _set_value(getattr(module, param), kernel)
            _set_value(getattr(module, _Q_ATTRIBUTE), q)
            _set_value(getattr(module, _ERRORS_ATTRIBUTE), errors)

    batch, paired = inputs

    def member(state, own):
        module = nnx.merge(graphdef.value, state)
        carried = run(module, _before(hook), batch, own)
        out = {}
        for path, keys, _, _ in quantizers:
            owner = _submodule(module, keys)
            out[path] = (
                _value(getattr(owner, _Q_ATTRIBUTE)),
                _value(getattr(owner, _ERRORS_ATTRIBUTE)),
            )
        return out, carried

    return run_paired(member, state, paired, sequential=sequential)
