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
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qjax import layers as kinds
from qjax.adapters.base import (
    Adapter,
    InputChecks,
    Layer,
    ModelCall,
    StackedInputs,
    Static,
    call_error,
    compiled_per_spec,
    paired_kernel,
    run_paired,
)
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


@contextlib.contextmanager
def _recording(hook, extra=()):
    """Makes every call of a quantizable NNX layer (built in or registered, and of the classes
    `extra`) call `hook(module, args, kwargs)` first."""
    types = [*_LAYER_TYPES, *kinds.registered_classes(), *extra]
    types = [
        cls
        for cls in dict.fromkeys(types)
        if issubclass(cls, nnx.Module) and "__call__" in vars(cls)
    ]
    originals = {cls: cls.__call__ for cls in types}

    def wrap(cls):
        original = originals[cls]

        @functools.wraps(original)
        def call(self, *args, **kwargs):
            hook(self, args, kwargs)
            return original(self, *args, **kwargs)

        return call

    try:
        for cls in types:
            cls.__call__ = wrap(cls)
        yield
    finally:
        for cls, original in originals.items():
            cls.__call__ = original


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
        self._paths: dict[str, tuple[Any, ...]] = {}
        self._params: dict[str, str] = {}
        for keypath, sub in nnx.iter_graph(copy):
            if isinstance(sub, nnx.Module) and (hasattr(sub, _param(sub)) or _is_embed(sub)):
                name = path_name(keypath)
                object.__setattr__(sub, _PATH_ATTRIBUTE, name)
                if hasattr(sub, _param(sub)):
                    self._paths[name] = tuple(keypath)
                    self._params[name] = _param(sub)
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
            if name is not None:
                shape = tuple(np.shape(_value(getattr(module, self._params[name]))))
                calls.setdefault(name, (module, shape, dict(kwargs)))
                counts[name] = counts.get(name, 0) + 1

        def forward(state, batch):
            return self.call(nnx.merge(self.graphdef, state), batch)

        try:
            with _recording(hook):
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
            with _recording(_capture_hook):
                return _layer_input(self._graphdef, layer.path, self.call, state, batch)
        flat = int(np.ravel_multi_index(index, layer.stack_shape))

        def run():
            with _recording(_capture_hook):
                _stacked_pass(self._graphdef, layer.path, self.call, state, batch)

        return jax.numpy.asarray(StackedInputs.collect(run, flat))

    def check_inputs(self, layers, batch):
        paths = frozenset(layer.path for layer in layers)

        def run():
            with _recording(_check_hook, (nnx.Embed,)):
                _checking_pass(self._graphdef, paths, self.call, self._state, batch)

        return InputChecks.collect(run)

    def paired_pass(self, layers, quantizers, batch, *, sequential, data):
        stacks = {layer.path: layer.stack_shape for layer in layers}
        module = nnx.merge(self.graphdef, self._state)
        for path in quantizers:  # slots for each layer's Q and errors, scanned like its kernel
            owner = _submodule(module, self._paths[path])
            kernel = _value(getattr(owner, self._params[path]))
            setattr(owner, _Q_ATTRIBUTE, _PassOutput(jnp.zeros_like(kernel)))
            setattr(owner, _ERRORS_ATTRIBUTE, _PassOutput(jnp.zeros((*stacks[path], 3))))
        graphdef, state = nnx.split(module)
        out = _paired_pass(
            Static(graphdef),
            tuple(
                (path, self._paths[path], self._params[path], q) for path, q in quantizers.items()
            ),
            self.call,
            sequential,
            state,
            batch,
            {path: data[path] for path in quantizers},
        )
        current, errors = self._state, {}
        for path, (kernel, error) in out.items():
            current = self.with_kernel(current, Layer(path, None, ""), kernel)
            errors[path] = np.asarray(error)
        return current, errors

    def result(self, state) -> nnx.Module:
        return nnx.merge(self.graphdef, state)


def _submodule(module: nnx.Module, keys: tuple[Any, ...]) -> nnx.Module:
    """The module at a key path of `nnx.iter_graph` (attribute names, list indices)."""
    for key in keys:
        module = module[key] if isinstance(key, int) else getattr(module, key)
    return module


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
def _paired_pass(graphdef, quantizers, call, sequential, state, batch, data):
    """`NNXAdapter.paired_pass` as one compiled program: {path: (Q, errors)}."""
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

    def member(state):
        module = nnx.merge(graphdef.value, state)
        with _recording(hook):
            call(module, batch)
        out = {}
        for path, keys, _, _ in quantizers:
            owner = _submodule(module, keys)
            out[path] = (
                _value(getattr(owner, _Q_ATTRIBUTE)),
                _value(getattr(owner, _ERRORS_ATTRIBUTE)),
            )
        return out

    return run_paired(member, state, sequential=sequential)
