"""MSQ, memoryless scalar quantization: every weight rounded to its nearest letter (RTN).

The baseline of both GPFQ papers, and "round to nearest" (RTN) in the LLM literature. It reads no
calibration data.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from qjax.alphabets import AnyAlphabet
from qjax.checks import check_finite
from qjax.methods.base import QuantizationMethod, nearest_letter
from qjax.stats import GramStats

__all__ = ["MSQ", "msq"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class MSQ(QuantizationMethod):
    """Round each weight to its nearest letter: Q(w), the statistics unused (NaN stays NaN)."""

    name: ClassVar[str] = "msq"
    uses_float_inputs: ClassVar[bool] = False

    def quantize_matrix(self, w: jax.Array, stats: GramStats, alphabet: AnyAlphabet) -> jax.Array:
        del stats
        return nearest_letter(alphabet, w)


def msq(w: ArrayLike, alphabet: AnyAlphabet) -> jax.Array:
    """Memoryless scalar quantization: each weight rounded to its nearest letter (the baseline).

    Args:
      w: weights, output neurons on the last axis (per-neuron alphabets broadcast along it; a
        group-wise alphabet needs the matrix (..., N0, N1)).
      alphabet: the alphabet A.

    Returns:
      Q(w), same shape and dtype as w (NaN where a traced w is NaN).
    """
    w = jnp.asarray(w)
    check_finite("w", w)
    return nearest_letter(alphabet, w)
