"""The Flax Linen adapter: layers found and inputs captured with method interceptors.

`nn.Dense`, `nn.DenseGeneral` (without `batch_dims`), `nn.Einsum` and `nn.Conv` are quantizable,
also when applied under `nn.scan` (stacked kernels). A layer's path is its module path, e.g.
"Block_0/MultiHeadDotProductAttention_0/query"; its kernel is `variables["params"][path]["kernel"]`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import flax.errors
import flax.linen as nn
import jax
import numpy as np

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

__all__ = ["LinenAdapter"]


def _kind(module: nn.Module, kernel_shape: tuple[int, ...]) -> kinds.LayerKind | str:
    """The layer kind of a Linen module (`qjax.layers.register_layer` first), or why it has
    none."""
    registered = kinds.registered_layer(module)
    if registered is not None:
        return registered.kind_of(module, kernel_shape)
    if isinstance(module, nn.Dense):
        return kinds.Dense()
    if isinstance(module, nn.DenseGeneral):
        if module.batch_dims:
            return "is an nn.DenseGeneral with batch_dims (not supported)"
        axis = (module.axis,) if isinstance(module.axis, int) else tuple(module.axis)
        return kinds.General(
            in_shape=tuple(kernel_shape[: len(axis)]),
            out_shape=tuple(kernel_shape[len(axis) :]),
            axis=axis,
        )
    if isinstance(module, nn.Einsum):
        return kinds.Einsum(module.einsum_str.replace(" ", ""), tuple(kernel_shape))
    if isinstance(module, nn.Conv):
        return kinds.Conv(ConvGeometry.from_module(module))
    return f"is a {type(module).__name__}"


class LinenAdapter(Adapter):
    """A Linen module with its variables.

    Boxed parameters (`nn.with_logical_partitioning`, `nn.Partitioned`) are read through: the
    adapter works on their values, and `result` puts the quantized values back in the boxes, with
    their sharding names.

    Args:
      model: the Linen module (any attributes: lists, config objects).
      variables: its variables ({"params": ..., "batch_stats": ..., ...}).
      call: how a batch is fed to `model.apply` (its keyword argument `mutable`, if any, is
        `apply`'s).
    """

    def __init__(self, model: nn.Module, variables: Mapping[str, Any], call: ModelCall):
        if not isinstance(variables, Mapping) or "params" not in variables:
            keys = list(variables) if isinstance(variables, Mapping) else type(variables).__name__
            raise ValueError(f"variables must have a 'params' collection, got {keys}")
        self.model = model
        self._model = Static(model)
        self._boxed = variables
        self._variables = nn.meta.unbox(variables)
        self.mutable, self.call = call.pop("mutable", False)
        self._keys: dict[str, tuple[str, ...]] = {}
        self._param: dict[str, str] = {}  # the kernel parameter's name, by layer path
        self._definitions: dict[str, nn.Module] = {}  # unbound copies of the modules called

    @property
    def state(self):
        return self._variables

    def layers(self, batch) -> list[Layer]:
        calls: dict[tuple[str, ...], tuple[nn.Module, tuple[int, ...], str]] = {}
        counts: dict[tuple[str, ...], int] = {}

        def record(next_fun, args, kwargs, context):
            if context.method_name == "__call__":
                module = context.module
                registered = kinds.registered_layer(module)
                param = registered.param if registered is not None else "kernel"
                params = module.variables.get("params", {})
                if param in params:
                    path = tuple(module.path)
                    kernel = nn.meta.unbox(params[param])
                    calls.setdefault(path, (module, tuple(np.shape(kernel)), param))
                    counts[path] = counts.get(path, 0) + 1
            return next_fun(*args, **kwargs)

        try:
            with nn.intercept_methods(record):
                jax.eval_shape(
                    functools.partial(_run, self.model, self.call, self.mutable),
                    self._variables,
                    batch,
                )
        except (TypeError, ValueError, AssertionError, flax.errors.FlaxError) as error:
            raise ValueError(call_error(error, type(self.model), batch)) from error

        found = []
        flat = _flat(self._variables["params"])
        kernel_paths = {path[:-1] for path in flat if path[-1] == "kernel"}
        for path, (module, seen_shape, param) in calls.items():
            if (*path, param) not in flat:
                continue
            name = "/".join(path)
            self._keys[name], self._param[name] = path, param
            found.append(
                Layer.called(
                    name,
                    _kind(module, seen_shape),
                    type(module).__name__,
                    stored_shape=tuple(flat[(*path, param)].shape),
                    seen_shape=seen_shape,
                    calls=counts[path],
                    param=param,
                )
            )
        for path in sorted(kernel_paths - set(calls)):
            name = "/".join(path)
            self._keys[name] = path
            found.append(Layer(name, None, "?", (), "is never called"))
        return found

    def forward(self, state, batch):
        return _run(self.model, self.call, self.mutable, state, batch)

    def kernel_name(self, layer: Layer) -> str:
        return "/".join(("params", *self._keys[layer.path], layer.param))

    def kernel(self, state, layer: Layer) -> jax.Array:
        node = state["params"]
        for key in self._keys[layer.path]:
            node = node[key]
        return node[layer.param]

    def with_kernel(self, state, layer: Layer, kernel: jax.Array):
        target = ("params", *self._keys[layer.path], layer.param)

        def replace(keypath, leaf):
            return kernel if tuple(k.key for k in keypath) == target else leaf

        return jax.tree_util.tree_map_with_path(replace, state)

    def inputs(self, state, layer: Layer, index, batch) -> jax.Array:
        path = self._keys[layer.path]
        static = (self._model, path, self.call, Static(self.mutable))
        if not layer.stack_shape:
            return _layer_input(*static, state, batch)
        flat = int(np.ravel_multi_index(index, layer.stack_shape))
        run = lambda: _stacked_pass(*static, state, batch)
        return jax.numpy.asarray(StackedInputs.collect(run, flat))

    def check_inputs(self, layers, batch):
        paths = frozenset(self._keys[layer.path] for layer in layers)
        static = (self._model, paths, self.call, Static(self.mutable))
        return InputChecks.collect(lambda: _checking_pass(*static, self._variables, batch))

    def module_calls(self, batch) -> list[ModuleCall]:
        calls: list[ModuleCall | None] = []
        depth = [0]

        def record(next_fun, args, kwargs, context):
            if context.method_name != "__call__":
                return next_fun(*args, **kwargs)
            module = context.module
            path = "/".join(module.path)
            calls.append(None)
            index = len(calls) - 1
            depth[0] += 1
            try:
                out = next_fun(*args, **kwargs)
            finally:
                depth[0] -= 1
            calls[index] = ModuleCall(path, type(module), depth[0], args, kwargs, out)
            if path not in self._definitions:
                self._definitions[path] = module.clone(parent=None, name=None)
            return out

        with nn.intercept_methods(record):
            jax.eval_shape(self.forward, self._variables, batch)
        return [c for c in calls if c is not None]

    def paired_pass(
        self, layers, quantizers, batch, *, sequential, data, blocks=None, carried=None
    ):
        todo = [layer for layer in layers if layer.path in quantizers]
        run = _Whole(self.call, Static(self.mutable), blocks.paths if blocks else ())
        out, captured = _paired_pass(
            self._model,
            tuple((self._keys[x.path], x.param, quantizers[x.path]) for x in todo),
            run,
            sequential,
            self._variables,
            (batch, carried),
            tuple(data[x.path] for x in todo),
        )
        current, errors = self._variables, {}
        for layer in todo:
            kernel, error = out[self._keys[layer.path]]
            current = self.with_kernel(current, layer, kernel)
            errors[layer.path] = np.asarray(error)
        return current, errors, captured

    def block_pass(self, blocks, index, quantizers, inputs, *, sequential, data):
        root = tuple(blocks.paths[index].split("/"))
        todo = [(path, self._keys[path]) for path in quantizers]
        variables = {}
        for collection, tree in self._variables.items():
            node = tree
            for key in root:
                node = node.get(key) if isinstance(node, Mapping) else None
            if node is not None:
                variables[collection] = node
        args = (
            Static(self._definitions[blocks.paths[index]]),
            tuple((keys[len(root) :], self._param[path], quantizers[path]) for path, keys in todo),
            _Alone(blocks.call, Static(self.mutable)),
            sequential,
            variables,
            (None, inputs),
            tuple(data[path] for path, _ in todo),
        )
        out, outputs = _paired_pass(*args)
        memory = _paired_pass.memory(*args)
        current, errors = self._variables, {}
        for path, keys in todo:
            kernel, error = out[keys[len(root) :]]
            layer = Layer(path, None, "", param=self._param[path])
            current = self.with_kernel(current, layer, kernel)
            errors[path] = np.asarray(error)
        return current, errors, outputs, memory

    def result(self, state):
        """The variables, boxed as they were given (sharding names kept)."""
        is_box = lambda leaf: isinstance(leaf, nn.meta.AxisMetadata)
        return jax.tree.map(
            lambda old, new: old.replace_boxed(new) if is_box(old) else new,
            self._boxed,
            state,
            is_leaf=is_box,
        )


def _flat(tree) -> dict[tuple[str, ...], Any]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(str(k.key) for k in keypath): leaf for keypath, leaf in leaves}


def _run(model, call, mutable, variables, batch):
    """`call(model bound to variables, batch)`, through `model.apply`."""
    return model.apply(variables, batch, method=call, mutable=mutable)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _layer_input(model, path, call, mutable, variables, batch):
    """The input of the layer at `path` on one batch (compiled once per layer)."""
    captured = []

    def capture(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and tuple(context.module.path) == path:
            captured.append(args[0])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(capture):
        _run(model.value, call, mutable.value, variables, batch)
    return captured[0]


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _stacked_pass(model, path, call, mutable, variables, batch):
    """A forward pass sending every input of the stacked layer at `path` to `StackedInputs`."""

    def capture(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and tuple(context.module.path) == path:
            StackedInputs.record(args[0])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(capture):
        _run(model.value, call, mutable.value, variables, batch)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _checking_pass(model, paths, call, mutable, variables, batch):
    """A float forward pass sending the layers' inputs and embeddings' ids to `InputChecks`."""

    def check(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name == "__call__" and args:
            if tuple(module.path) in paths:
                InputChecks.record_input("/".join(module.path), args[0])
            if isinstance(module, nn.Embed):
                InputChecks.record_ids("/".join(module.path), args[0], module.num_embeddings)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(check):
        _run(model.value, call, mutable.value, variables, batch)


# What a paired pass leaves on a layer, beside its kernel (stacked like it under nn.scan).
_Q_NAME, _ERRORS_NAME = "_qjax_q", "_qjax_errors"


def _with_params(mutable):
    """The caller's mutable collections, and "params" (the kernels are swapped in)."""
    if mutable is True:
        return True
    return ["params", *([mutable] if isinstance(mutable, str) else (mutable or []))]


@dataclasses.dataclass(frozen=True)
class _Whole:
    """A paired pass's forward computation: the whole model on a batch. With `blocks` (their
    paths), no block runs (see `Adapter.paired_pass`): returns the first block's array
    arguments."""

    call: ModelCall
    mutable: Static
    blocks: tuple[str, ...] = ()

    def __call__(self, model, variables, batch, carried):
        captured = []

        def stub(next_fun, args, kwargs, context):
            path = "/".join(context.module.path)
            if context.method_name != "__call__" or path not in self.blocks:
                return next_fun(*args, **kwargs)
            if path != self.blocks[0]:
                return args[0]
            captured.append(array_leaves(args, kwargs))
            return args[0] if carried is None else carried

        with nn.intercept_methods(stub):
            _, mutated = _run(model, self.call, _with_params(self.mutable.value), variables, batch)
        return (captured[0] if self.blocks else None), mutated


@dataclasses.dataclass(frozen=True)
class _Alone:
    """A paired pass's forward computation: one block (an unbound copy) on its array
    arguments; returns its output."""

    call: BlockCall
    mutable: Static

    def __call__(self, model, variables, batch, inputs):
        args, kwargs = self.call.arguments(inputs)
        return model.apply(variables, *args, **kwargs, mutable=_with_params(self.mutable.value))


@compiled_per_spec
def _paired_pass(model, quantizers, run, sequential, variables, inputs, data):
    """`LinenAdapter.paired_pass` and `block_pass` as one compiled program: ({module path: (Q,
    errors)}, what `run` returns). The kernels are swapped in with `put_variable`, so the
    "params" collection is mutable during the pass (also under `nn.scan`, whose variable axes
    then stack Q and the errors). `inputs` is (the batch, each member's own inputs)."""
    by_path = {
        path: (param, quantizer, numbers)
        for (path, param, quantizer), numbers in zip(quantizers, data, strict=True)
    }

    def swap(next_fun, args, kwargs, context):
        module = context.module
        found = by_path.get(tuple(module.path)) if context.method_name == "__call__" else None
        if found is not None:
            param, quantizer, numbers = found
            kernel = module.get_variable("params", param)
            kernel, q, errors = paired_kernel(
                kernel, args[0], quantizer, numbers, sequential=sequential
            )
            module.put_variable("params", param, kernel)
            module.put_variable("params", _Q_NAME, q)
            module.put_variable("params", _ERRORS_NAME, errors)
        return next_fun(*args, **kwargs)

    batch, paired = inputs

    def member(variables, own):
        with nn.intercept_methods(swap):
            carried, mutated = run(model.value, variables, batch, own)
        out = {}
        for path, _, _ in quantizers:
            node = mutated["params"]
            for key in path:
                node = node[key]
            out[path] = (node[_Q_NAME], node[_ERRORS_NAME])
        return out, carried

    return run_paired(member, variables, paired, sequential=sequential)
