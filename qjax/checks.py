"""Input checks shared by qjax's functions: a clear `ValueError` naming the argument.

Shape and dtype checks are static, so they hold under `jax.jit`, `jax.vmap` and `jax.lax.scan`.
Value checks (NaN/Inf) look only at concrete arrays, through NumPy, so a traced argument (or an
array closed over by a jitted function) is never converted to a Python bool; host-level drivers
such as `qjax.quantize_model` check every batch they read.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from qjax.alphabets import Alphabet, UniformAlphabet

__all__ = ["check_alphabet", "check_finite", "check_matrix", "check_positive_int"]


def check_matrix(name: str, value: ArrayLike, *, batch_ndim: int | None = None) -> jax.Array:
    """`value` as a floating array of rank batch_ndim + 2 (or at least 2 when None)."""
    array = value if isinstance(value, jax.Array) else jnp.asarray(value)
    if not jnp.issubdtype(array.dtype, jnp.floating):
        raise ValueError(f"{name} must be a floating-point array, got dtype {array.dtype}")
    if batch_ndim is None:
        if array.ndim < 2:
            raise ValueError(
                f"{name} must have at least 2 dimensions (..., m, N0), got {array.shape}"
            )
    elif array.ndim != batch_ndim + 2:
        raise ValueError(f"{name} must have {batch_ndim + 2} dimensions, got shape {array.shape}")
    return array


def check_positive_int(name: str, value) -> None:
    if not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def is_concrete(value) -> bool:
    """Whether `value` holds known numbers (not a tracer): its values can be checked."""
    return not isinstance(value, jax.core.Tracer)


def check_finite(name: str, value) -> None:
    """Raises if a concrete `value` holds NaN or Inf; a traced value passes unchecked."""
    if is_concrete(value) and not np.all(np.isfinite(np.asarray(value))):
        raise ValueError(f"{name} contains NaN or Inf")


def check_alphabet(alphabet) -> None:
    if not isinstance(alphabet, UniformAlphabet | Alphabet):
        raise ValueError(
            f"alphabet must be a qjax.alphabets alphabet, got {type(alphabet).__name__}"
        )
    if alphabet.size < 1:
        raise ValueError("alphabet is empty")
    for leaf in jax.tree.leaves(alphabet):
        check_finite("alphabet", leaf)
