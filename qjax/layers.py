"""Layer kinds: how a layer's kernel is a weight matrix W (N0 × N1) and its inputs are rows of X.

Every quantizable layer multiplies its input by a kernel along some contracted axes. qjax
quantizes the matrix view of that product: W has the contracted axes as its N0 inputs and the
kernel's other axes as its N1 neurons, and X has one row per position of the input (batch,
sequence, image position) with the contracted axes as columns. Kernel axes that are also in the
output but are not contracted (an einsum's per-head axis, a convolution's feature groups) are
batch axes: one independent matrix each.

The kinds are framework-free frozen dataclasses (hashable, so they key compilation); the Linen
and NNX adapters (`qjax.adapters`) build them from the modules they find:

* `Dense`: kernel (N0, N1), input (..., N0): `nn.Dense`, `nnx.Linear`.
* `General`: kernel (*in_shape, *out_shape) contracting the input axes `axis`:
  `nn.DenseGeneral`, `nnx.LinearGeneral` (attention q/k/v (d, heads, head_dim) and out
  (heads, head_dim, d) projections).
* `Einsum`: kernel and input contracted by an einsum string: `nn.Einsum`, `nnx.Einsum`.
* `Conv`: kernel (*window, cin/groups, cout), inputs as image patches: `nn.Conv`, `nnx.Conv`.
  A neuron is an output channel over the whole patch (kh·kw·cin inputs; Zhang & Saab).
* `ConvByChannel`: the same kernel, a neuron per (input channel, output channel) filter over
  that input channel's kh·kw patch (the GPFQ paper's code); `LayerSpec(conv_neurons="channel")`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from qjax.patches import ConvGeometry, conv_patches, kernel_to_matrix, matrix_to_kernel

__all__ = [
    "Conv",
    "ConvByChannel",
    "Dense",
    "Einsum",
    "General",
    "LayerKind",
    "LayerType",
    "register_layer",
    "registered_classes",
    "registered_layer",
]


class LayerKind:
    """Base of the layer kinds: kernel ↔ matrices batch + (N0, N1), input → rows batch + (m, N0)."""

    name: str = "layer"

    def to_matrix(self, kernel: jax.Array) -> jax.Array:
        raise NotImplementedError

    def from_matrix(self, matrix: jax.Array) -> jax.Array:
        raise NotImplementedError

    def rows(self, x: jax.Array) -> jax.Array:
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Dense(LayerKind):
    """y = x·W with W (N0, N1) and x (..., N0).

    Attributes:
      transposed: the kernel is stored as Wᵀ (N1, N0), as in GPT-2's `Conv1D` layers
        (`transformers`' `FlaxConv1D`: y = x·kernelᵀ).
    """

    transposed: bool = False
    name = "Dense"

    def to_matrix(self, kernel):
        return kernel.T if self.transposed else kernel

    def from_matrix(self, matrix):
        return matrix.T if self.transposed else matrix

    def rows(self, x):
        return x.reshape(-1, x.shape[-1])


@dataclasses.dataclass(frozen=True)
class General(LayerKind):
    """A kernel (*in_shape, *out_shape) contracting the input axes `axis` (in that order).

    Attributes:
      in_shape: the contracted axes' sizes (their product is N0).
      out_shape: the output feature axes' sizes (their product is N1).
      axis: the contracted axes of the input, negative (counted from the end).
    """

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    axis: tuple[int, ...]
    name = "DenseGeneral"

    def to_matrix(self, kernel):
        return kernel.reshape(math.prod(self.in_shape), math.prod(self.out_shape))

    def from_matrix(self, matrix):
        return matrix.reshape(*self.in_shape, *self.out_shape)

    def rows(self, x):
        axes = [a % x.ndim for a in self.axis]
        rest = [a for a in range(x.ndim) if a not in axes]
        return jnp.transpose(x, rest + axes).reshape(-1, math.prod(self.in_shape))


@dataclasses.dataclass(frozen=True)
class Einsum(LayerKind):
    """out = einsum(spec, x, kernel), spec "inputs,kernel->output" (e.g. "bsd,dhk->bshk").

    Kernel axes in the input but not the output are contracted (N0); kernel axes in the output
    but not the input are neurons (N1); kernel axes in both are batch axes (one matrix each).

    Attributes:
      spec: the einsum string, without spaces; "..." stands for leading input axes.
      kernel_shape: the kernel's shape.
    """

    spec: str
    kernel_shape: tuple[int, ...]
    name = "Einsum"

    def __post_init__(self):
        self._parts()  # validate

    def _parts(self):
        spec = self.spec.replace(" ", "")
        try:
            operands, output = spec.split("->")
            x_letters, kernel_letters = operands.split(",")
        except ValueError:
            raise ValueError(
                f"einsum {self.spec!r} is not of the form 'inputs,kernel->output'"
            ) from None
        if "..." in kernel_letters:
            raise ValueError(f"einsum {self.spec!r}: the kernel operand cannot use '...'")
        if len(kernel_letters) != len(self.kernel_shape):
            raise ValueError(
                f"einsum {self.spec!r} names {len(kernel_letters)} kernel axes for a kernel of "
                f"shape {self.kernel_shape}"
            )
        x_set = set(x_letters.replace("...", ""))
        out_set = set(output.replace("...", ""))
        contracted = [c for c in kernel_letters if c in x_set and c not in out_set]
        batch = [c for c in kernel_letters if c in x_set and c in out_set]
        neurons = [c for c in kernel_letters if c not in x_set and c in out_set]
        lonely = [c for c in kernel_letters if c not in x_set and c not in out_set]
        if lonely or not contracted or not neurons:
            raise ValueError(
                f"einsum {self.spec!r} is not a weight contraction qjax can quantize: it needs "
                "kernel axes contracted with the input and kernel axes in the output"
            )
        return x_letters, kernel_letters, batch, contracted, neurons

    def _sizes(self, letters):
        _, kernel_letters, *_ = self._parts()
        return [self.kernel_shape[kernel_letters.index(c)] for c in letters]

    def to_matrix(self, kernel):
        _, kernel_letters, batch, contracted, neurons = self._parts()
        order = [kernel_letters.index(c) for c in batch + contracted + neurons]
        shape = (*self._sizes(batch), math.prod(self._sizes(contracted)), -1)
        return jnp.transpose(kernel, order).reshape(shape)

    def from_matrix(self, matrix):
        _, kernel_letters, batch, contracted, neurons = self._parts()
        letters = batch + contracted + neurons
        kernel = matrix.reshape(self._sizes(letters))
        return jnp.transpose(kernel, [letters.index(c) for c in kernel_letters])

    def rows(self, x):
        x_letters, _, batch, contracted, _ = self._parts()
        if "..." in x_letters:
            named = len(x_letters.replace("...", ""))
            ellipsis = "".join(chr(0x100 + i) for i in range(x.ndim - named))
            x_letters = x_letters.replace("...", ellipsis)
        if len(x_letters) != x.ndim:
            raise ValueError(f"einsum {self.spec!r} does not fit an input of shape {x.shape}")
        other = [c for c in x_letters if c not in batch and c not in contracted]
        order = [x_letters.index(c) for c in batch + other + contracted]
        batch_sizes = [x.shape[x_letters.index(c)] for c in batch]
        n0 = math.prod(x.shape[x_letters.index(c)] for c in contracted)
        return jnp.transpose(x, order).reshape(*batch_sizes, -1, n0)


@dataclasses.dataclass(frozen=True)
class Conv(LayerKind):
    """A convolution: each feature group is a matrix over the image patches its kernel sees.

    Attributes:
      geometry: the convolution's `ConvGeometry` (window, strides, padding, dilations, groups).
    """

    geometry: ConvGeometry
    name = "Conv"

    def to_matrix(self, kernel):
        return kernel_to_matrix(kernel, self.geometry)

    def from_matrix(self, matrix):
        return matrix_to_kernel(matrix, self.geometry)

    def rows(self, x):
        return conv_patches(x, self.geometry)


@dataclasses.dataclass(frozen=True)
class ConvByChannel(LayerKind):
    """A convolution seen as in the GPFQ paper's code: one matrix per input channel c, whose
    N0 = kh·kw inputs are channel c's patch and whose N1 neurons are the (c, output channel)
    filters; X are channel c's patches alone, so each filter matches its own contribution.

    Attributes:
      geometry: the convolution's `ConvGeometry`.
    """

    geometry: ConvGeometry
    name = "Conv"

    def _split(self, matrices: jax.Array) -> jax.Array:
        """(groups, window·cin_g, n) → (groups·cin_g, window, n)."""
        groups, rows, n = matrices.shape
        window = self.geometry.window_size
        split = matrices.reshape(groups, window, rows // window, n).transpose(0, 2, 1, 3)
        return split.reshape(-1, window, n)

    def to_matrix(self, kernel):
        return self._split(kernel_to_matrix(kernel, self.geometry))

    def from_matrix(self, matrix):
        groups = self.geometry.feature_group_count
        cin_g = matrix.shape[0] // groups
        merged = matrix.reshape(groups, cin_g, *matrix.shape[1:]).transpose(0, 2, 1, 3)
        return matrix_to_kernel(merged.reshape(groups, -1, matrix.shape[-1]), self.geometry)

    def rows(self, x):
        patches = conv_patches(x, self.geometry)  # (groups, m, window·cin_g)
        return self._split(jnp.swapaxes(patches, 1, 2)).swapaxes(1, 2)


@dataclasses.dataclass(frozen=True)
class LayerType:
    """How qjax quantizes the modules of one class (see `register_layer`).

    Attributes:
      kind: the layer's `LayerKind` (`Dense()`, `Dense(transposed=True)`, ...), or a function
        (module, kernel shape as seen in the call) -> `LayerKind`, or a string saying why such a
        module cannot be quantized.
      param: the name of the parameter (in "params") that is the kernel.
    """

    kind: LayerKind | Callable[[Any, tuple[int, ...]], LayerKind | str]
    param: str = "kernel"

    def kind_of(self, module: Any, kernel_shape: tuple[int, ...]) -> LayerKind | str:
        return self.kind if isinstance(self.kind, LayerKind) else self.kind(module, kernel_shape)


_REGISTERED: dict[type, LayerType] = {}


def register_layer(
    module_class: type,
    kind: LayerKind | Callable[[Any, tuple[int, ...]], LayerKind | str],
    *,
    param: str = "kernel",
) -> None:
    """Tells `qjax.quantize_model` that modules of `module_class` (Linen or NNX, and its
    subclasses) are layers it can quantize: their `__call__`'s first argument is the input X
    and their parameter `param` is the kernel, seen as a matrix by `kind`.

    Examples:
      GPT-2's Conv1D (a Dense whose kernel is stored transposed):
      `register_layer(FlaxConv1D, Dense(transposed=True))`; a custom layer computing
      `jnp.dot(x, self.w)`: `register_layer(MyDense, Dense(), param="w")`; a layer whose
      geometry depends on its attributes: `register_layer(MyEinsum, lambda module, shape:
      Einsum(module.spec, shape), param="w")`.

    Args:
      module_class: the module class.
      kind: its `LayerKind`, or a function (module, kernel shape) -> `LayerKind` (or a string
        saying why that module cannot be quantized).
      param: the kernel's parameter name.
    """
    if not isinstance(module_class, type):
        raise ValueError(f"register_layer takes a module class, got {module_class!r}")
    if not (isinstance(kind, LayerKind) or callable(kind)):
        raise ValueError(f"kind must be a LayerKind or a function returning one, got {kind!r}")
    _REGISTERED[module_class] = LayerType(kind, param)


def registered_classes() -> tuple[type, ...]:
    """The module classes given to `register_layer`."""
    return tuple(_REGISTERED)


def registered_layer(module: Any) -> LayerType | None:
    """The `LayerType` registered for `module`'s class (or the nearest base class), if any."""
    for cls in type(module).__mro__:
        if cls in _REGISTERED:
            return _REGISTERED[cls]
    return None
