"""What a post-training quantization method is: hyperparameters plus one pure function.

A method is a small frozen dataclass carrying its hyperparameters, whose `quantize_matrix(w,
stats, alphabet)` maps one weight matrix W (N0 inputs × N1 neurons) and the `GramStats` of the
layer's calibration inputs to Q, every entry a letter of the alphabet. It is pure and traceable
(`jax.jit`, `jax.vmap`, `jax.lax.scan`, any argument closed over). `quantize` adds what every
method shares: static shape checks, leading batch axes (convolution feature groups, attention
heads of an einsum) mapped with `vmap`, compilation keyed on the hyperparameters.

Adding a method is one new file in `qjax/methods/` with one subclass: the model-level engine
(`qjax.quantize_model`) and the rules find it by its `name`.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from qjax._mesh import check_finite_here
from qjax.alphabets import Alphabet, AnyAlphabet
from qjax.checks import check_alphabet, check_finite, is_concrete
from qjax.stats import GramStats, combined

__all__ = ["QuantizationMethod", "functional_form", "get", "names", "nearest_letter"]

_REGISTRY: dict[str, type[QuantizationMethod]] = {}


class QuantizationMethod(abc.ABC):
    """Base class of the methods (subclasses are frozen dataclasses).

    Class attributes:
      name: the method's name in rules, reports and results ("gpfq", "gptq", ...).
      uses_float_inputs: whether the method reads H = X~ᵀX (it matches the float network's output
        XW, as GPFQ does) or only G = X~ᵀX~ (it matches X~W, as GPTQ does).
    """

    name: ClassVar[str]
    uses_float_inputs: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            _REGISTRY[cls.name] = cls

    @abc.abstractmethod
    def quantize_matrix(self, w: jax.Array, stats: GramStats, alphabet: AnyAlphabet) -> jax.Array:
        """Q for one matrix: w (N0, N1), stats of shape (N0, N0), alphabet for this matrix."""

    def quantize(self, w: ArrayLike, stats: GramStats, alphabet: AnyAlphabet) -> jax.Array:
        """Quantizes w, batch_shape + (N0, N1), from statistics for batch_shape + (N0, N0).

        Args:
          w: the weights W (Flax layout: inputs × neurons), with optional leading batch axes.
          stats: `GramStats` of the layer's calibration inputs, per device or not (then
            `quantize_per_device` reads them).
          alphabet: the alphabet A: per tensor, per neuron (N1,), group-wise (⌈N0/g⌉, N1), each
            with the batch axes in front where they differ per batch entry.

        Returns:
          Q, same shape and dtype as w, every entry a letter of A.

        Raises:
          ValueError: on bad shapes, NaN or Inf in w or the statistics, or when the method's
            arithmetic fails on finite inputs (NaN codes; the message says what to do).
        """
        w = jnp.asarray(w)
        if not jnp.issubdtype(w.dtype, jnp.floating):
            raise ValueError(f"w must be a floating-point array, got dtype {w.dtype}")
        total_shape = stats.gram.shape[stats.count.ndim :]  # per-device sums lead with D
        if w.ndim < 2 or total_shape != (*w.shape[:-1], w.shape[-2]):
            raise ValueError(
                f"w has shape {w.shape} (batch_shape + (N0, N1)) but the statistics are for "
                f"batch_shape + (N0, N0) = {total_shape}"
            )
        check_alphabet(alphabet)
        check_finite("w", w)
        check_finite_here("stats.gram", stats.gram)
        check_finite_here("stats.cross", stats.cross)
        w_stats = w.astype(stats.gram.dtype)
        if stats.per_device:
            q = self.quantize_per_device(w_stats, stats, alphabet)
        else:
            q = _quantize_batched(self, w_stats, stats, alphabet)
        if is_concrete(q) and q.is_fully_addressable and bool(jnp.any(jnp.isnan(q))):
            raise ValueError(
                f"{self.name}: the codes of the weight matrix of shape {w.shape} (batch_shape + "
                f"(N0, N1)) came out NaN from finite weights and statistics: "
                f"{self.numerical_failure(stats.gram.dtype)}"
            )
        return q.astype(w.dtype)

    def numerical_failure(self, dtype: jnp.dtype) -> str:
        """Why this method's arithmetic can fail on finite inputs, and what to do (the message of
        the error raised when it does).

        Args:
          dtype: the dtype of the statistics the method read.
        """
        del dtype
        return (
            "an intermediate overflowed in "
            f"{self.name}'s arithmetic; accumulate the statistics in float64 "
            "(gram_stats_init(..., dtype=jnp.float64) with jax_enable_x64)"
        )

    def quantize_per_device(
        self, w: jax.Array, stats: GramStats, alphabet: AnyAlphabet
    ) -> jax.Array:
        """`quantize` from per-device partial sums over a mesh (`GramStats.per_device`).

        By default the method sees the combined statistics (`qjax.stats.combined`, replicated on
        the mesh). A method that splits its own work over the devices overrides this (GPFQ: its
        neurons, reading H by column blocks).

        Args:
          w: the checked weights, in the statistics' dtype.
          stats: per-device `GramStats`.
          alphabet: the checked alphabet.

        Returns:
          Q, same shape as w.
        """
        return _quantize_batched(self, w, combined(stats), alphabet)


def batch_axes(alphabet: AnyAlphabet, batch_ndim: int):
    """vmap axes of an alphabet's leaves over one leading batch axis (None: shared)."""
    if isinstance(alphabet, Alphabet):
        base = 2  # letters (N1, n)
    elif getattr(alphabet, "group_size", None) is not None:
        base = 2  # step (G, N1)
    else:
        base = 1  # step (N1,) or a scalar
    return jax.tree.map(lambda leaf: 0 if jnp.ndim(leaf) >= base + batch_ndim else None, alphabet)


@functools.partial(jax.jit, static_argnums=0)
def _quantize_batched(method: QuantizationMethod, w, stats: GramStats, alphabet):
    quantize = method.quantize_matrix
    for level in range(w.ndim - 2):
        axes = batch_axes(alphabet, level + 1)
        stats_axes = GramStats(0, 0, None, None if stats.float_gram is None else 0)
        quantize = jax.vmap(quantize, in_axes=(0, stats_axes, axes))
    return quantize(w, stats, alphabet)


def nearest_letter(alphabet: AnyAlphabet, x: jax.Array) -> jax.Array:
    """Q(x), the nearest letter of each entry, but NaN where x is not finite: a method never
    turns a NaN weight (or a failed factorization) into a finite letter."""
    return jnp.where(jnp.isfinite(x), alphabet.project(x), jnp.nan).astype(x.dtype)


def functional_form(cls: type[QuantizationMethod]) -> Callable[..., jax.Array]:
    """`name_from_stats(w, stats, alphabet, **options)`: the method `cls(**options).quantize`.

    The function's keyword-only options are the dataclass's fields, with their defaults; its
    docstring lists them from the class's Attributes.
    """
    fields = [f for f in dataclasses.fields(cls) if f.init]

    def quantize(w: ArrayLike, stats: GramStats, alphabet: AnyAlphabet, **options) -> jax.Array:
        return cls(**options).quantize(w, stats, alphabet)

    positional = inspect.Parameter.POSITIONAL_OR_KEYWORD
    parameters = [
        inspect.Parameter("w", positional, annotation=ArrayLike),
        inspect.Parameter("stats", positional, annotation=GramStats),
        inspect.Parameter("alphabet", positional, annotation=AnyAlphabet),
        *(
            inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default)
            for f in fields
        ),
    ]
    quantize.__signature__ = inspect.Signature(parameters, return_annotation=jax.Array)
    quantize.__name__ = quantize.__qualname__ = f"{cls.name}_from_stats"
    quantize.__module__ = cls.__module__
    doc = inspect.cleandoc(cls.__doc__ or "")
    summary = doc.splitlines()[0] if doc else ""
    attributes = doc.partition("Attributes:\n")[2].rstrip()
    quantize.__doc__ = (
        f"{cls.__name__} of one layer from its statistics: "
        f"`{cls.__name__}(**options).quantize(w, stats, alphabet)`.\n\n"
        f"{summary}\n\n"
        "Args:\n"
        "  w: weights, shape batch_shape + (N0, N1) (Flax layout, batch_shape as in `stats`).\n"
        "  stats: `GramStats` of the layer's calibration inputs.\n"
        "  alphabet: the alphabet A: per tensor, per neuron, or group-wise.\n"
        f"{attributes}\n\n"
        "Returns:\n"
        "  Q, same shape and dtype as w, every entry a letter of A.\n"
    )
    return quantize


def get(method: str | QuantizationMethod) -> QuantizationMethod:
    """A method object: `method` itself, or the default-configured method of that name."""
    if isinstance(method, QuantizationMethod):
        return method
    if isinstance(method, str) and method in _REGISTRY:
        return _REGISTRY[method]()
    raise ValueError(f"unknown quantization method {method!r}; known: {names()}")


def names() -> list[str]:
    """The registered methods' names."""
    return sorted(_REGISTRY)
