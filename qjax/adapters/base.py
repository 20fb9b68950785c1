"""What the engine needs from a framework: find the layers, read and write kernels, capture inputs.

An adapter wraps one model (a Linen module and its variables, or an NNX module) and knows its
framework; `qjax.quantize_model` drives any adapter the same way and never asks which framework
it is. Adding a framework is one new adapter file.

Layers applied under `nn.scan` / `nnx.scan` own stacked kernels (L, ...): each slice l is its own
layer with its own inputs X and X~, quantized in order. Their inputs are captured from inside the
scan by an ordered host callback (the l-th call of the layer in a forward pass is slice l).
"""

from __future__ import annotations

import abc
import dataclasses
import threading
from typing import Any

import jax
import numpy as np
from jax.experimental import io_callback

from qjax.layers import LayerKind

__all__ = ["Adapter", "Layer", "StackedInputs"]


@dataclasses.dataclass(frozen=True)
class Layer:
    """One kernel-owning layer of a model, as the adapter found it.

    Attributes:
      path: its name, "a/b/c" (see `qjax.rules`).
      kind: how its kernel is a matrix and its input rows (None: qjax cannot quantize it).
      type_name: the module's class name.
      stack_shape: leading kernel axes added by `scan` (empty for an ordinary layer).
      problem: why it cannot be quantized ("is never called", ...), or None.
    """

    path: str
    kind: LayerKind | None
    type_name: str
    stack_shape: tuple[int, ...] = ()
    problem: str | None = None

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
    ) -> Layer:
        """A layer the forward pass called `calls` times, whose kernel has `stored_shape` in the
        variables and `seen_shape` inside the call (the difference: the axes added by `scan`);
        `kind` is its kind or why it has none."""
        stack = tuple(stored_shape[: len(stored_shape) - len(seen_shape)])
        problem = kind if isinstance(kind, str) else None
        if not stack and calls > 1:
            problem = "is called more than once (shared layers are not supported)"
        return cls(path, None if isinstance(kind, str) else kind, type_name, stack, problem)


class Adapter(abc.ABC):
    """The framework side of `quantize_model`. `state` is the adapter's own representation of the
    model's variables (Linen: the variables dict; NNX: an `nnx.State`)."""

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
