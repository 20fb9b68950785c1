"""Quantization alphabets: the finite letter sets A that weights are rounded to.

An alphabet is a pytree, so it can be passed through `jax.jit` and `jax.vmap`. Two kinds:

* `UniformAlphabet`: zero-centred, equally spaced letters step·(k - (size-1)/2), k = 0..size-1.
  This covers the symmetric alphabets {-K..K}·δ of the GPFQ papers (K = 1 is ternary), binary
  {±δ}, and the reference code's radius·linspace(-1, 1, n). Projection is a rounding of
  x / step, with no search over letters.
* `Alphabet`: any sorted set of letters.

`step` (or `letters`) is either a scalar (one alphabet for the layer) or carry a last
axis of length N1 (one alphabet per output neuron, "per channel"); it broadcasts against a Flax
kernel of shape (..., N1).

Scale rules. The scale constant C sets the largest letter, the radius R:

* rule "median": R = C·median|w| (Lybrand & Saab's reference code, ternary {-1, 0, 1}·C·median|w|);
* rule "max": R = C·max|w| (Zhang & Saab: δ = C·max|w| / K for letters {-K..K}·δ).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

__all__ = [
    "Alphabet",
    "UniformAlphabet",
    "binary",
    "by_bits",
    "for_weights",
    "from_letters",
    "midrise",
    "num_letters_for_bits",
    "project",
    "scale_radius",
    "symmetric",
    "uniform",
]


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_positive_finite(name: str, value: jax.Array) -> None:
    if _is_concrete(value):
        v = np.asarray(value)
        if not np.all(np.isfinite(v)):
            raise ValueError(f"{name} must be finite, got {v}")
        if not np.all(v > 0):
            raise ValueError(f"{name} must be positive, got {v}")


@dataclasses.dataclass(frozen=True)
class UniformAlphabet:
    """Zero-centred, equally spaced letters a_k = step·(k - (size-1)/2), k = 0..size-1.

    Odd sizes give {-K..K}·δ (with 0), even sizes {±δ/2, ±3δ/2, ...} (no 0). A letter is one
    product of `step` and a small half-integer, so it is bit-identical wherever it is computed.

    Attributes:
      step: the spacing δ between letters, a scalar or an array of shape (N1,) (per neuron).
      size: the number of letters (static: it is part of the pytree's structure).
    """

    step: jax.Array
    size: int

    @property
    def _center(self) -> float:
        return (self.size - 1) / 2

    @property
    def letters(self) -> jax.Array:
        """The letters, shape step.shape + (size,)."""
        step = jnp.asarray(self.step)
        offsets = jnp.arange(self.size, dtype=step.dtype) - self._center  # exact half-integers
        return offsets * step[..., None]

    def codes(self, x: ArrayLike) -> jax.Array:
        """Index k (int32) of the letter nearest to each entry of x; ties round half to even k."""
        x = jnp.asarray(x)
        k = jnp.round(x / self.step + self._center)
        return jnp.clip(k, 0, self.size - 1).astype(jnp.int32)

    def decode(self, codes: ArrayLike) -> jax.Array:
        """Letters a_k for integer codes k (per-neuron steps broadcast on the last axis)."""
        step = jnp.asarray(self.step)
        return (jnp.asarray(codes, dtype=step.dtype) - self._center) * step

    def project(self, x: ArrayLike) -> jax.Array:
        """Nearest letter Q(x) for each entry of x, in x's dtype."""
        x = jnp.asarray(x)
        return self.decode(self.codes(x)).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class Alphabet:
    """An arbitrary sorted letter set.

    Attributes:
      letters: increasing letters, shape (n,) or (N1, n) for one alphabet per neuron.
    """

    letters: jax.Array

    @property
    def size(self) -> int:
        return self.letters.shape[-1]

    def codes(self, x: ArrayLike) -> jax.Array:
        """Index (int32) of the nearest letter; a tie goes to the lower letter."""
        x = jnp.asarray(x)
        midpoints = 0.5 * (self.letters[..., 1:] + self.letters[..., :-1])
        # Per-neuron letters (N1, n) broadcast against x (..., N1) on x's last axis.
        return jnp.sum(x[..., None] > midpoints, axis=-1, dtype=jnp.int32)

    def decode(self, codes: ArrayLike) -> jax.Array:
        codes = jnp.asarray(codes)
        if self.letters.ndim == 1:
            return self.letters[codes]
        return jnp.take_along_axis(
            jnp.broadcast_to(self.letters, (*codes.shape, self.size)), codes[..., None], axis=-1
        )[..., 0]

    def project(self, x: ArrayLike) -> jax.Array:
        x = jnp.asarray(x)
        return self.decode(self.codes(x)).astype(x.dtype)


for _cls, _data in ((UniformAlphabet, ["step"]), (Alphabet, ["letters"])):
    jax.tree_util.register_dataclass(
        _cls,
        data_fields=_data,
        meta_fields=[f.name for f in dataclasses.fields(_cls) if f.name not in _data],
    )

AnyAlphabet = UniformAlphabet | Alphabet


def project(alphabet: AnyAlphabet, x: ArrayLike) -> jax.Array:
    """Q(x): the nearest letter of `alphabet` to each entry of `x` (memoryless scalar rounding)."""
    return alphabet.project(x)


def uniform(num_letters: int, radius: ArrayLike) -> UniformAlphabet:
    """`num_letters` letters radius·linspace(-1, 1, num_letters).

    Args:
      num_letters: at least 2.
      radius: the largest letter R > 0; a scalar or an (N1,) array for per-neuron alphabets.

    Returns:
      The alphabet {-R, -R + 2R/(n-1), ..., R}.
    """
    if not isinstance(num_letters, int | np.integer) or num_letters < 2:
        raise ValueError(f"num_letters must be an integer >= 2, got {num_letters!r}")
    radius = jnp.asarray(radius, dtype=jnp.result_type(float))
    _check_positive_finite("radius", radius)
    return UniformAlphabet(step=2 * radius / (num_letters - 1), size=num_letters)


def symmetric(K: int, delta: ArrayLike) -> UniformAlphabet:
    """The alphabet {-K, ..., -1, 0, 1, ..., K}·δ of 2K+1 letters (K = 1 is ternary).

    Args:
      K: the number of positive letters, an integer >= 1.
      delta: the step δ > 0, a scalar or an (N1,) array.
    """
    if not isinstance(K, int | np.integer) or K < 1:
        raise ValueError(f"K must be an integer >= 1, got {K!r}")
    delta = jnp.asarray(delta, dtype=jnp.result_type(float))
    _check_positive_finite("delta", delta)
    return UniformAlphabet(step=delta, size=2 * K + 1)


def binary(delta: ArrayLike) -> UniformAlphabet:
    """The binary alphabet {-δ, +δ}."""
    delta = jnp.asarray(delta, dtype=jnp.result_type(float))
    _check_positive_finite("delta", delta)
    return UniformAlphabet(step=2 * delta, size=2)


def num_letters_for_bits(bits: int) -> int:
    """Letters of the symmetric b-bit alphabet: 2 for b = 1 (binary), 2^b - 1 for b >= 2.

    For b >= 2 this is {-K..K}·δ with K = 2^(b-1) - 1: it contains 0 and its codes fit b bits
    (b = 2 is ternary).
    """
    if not isinstance(bits, int | np.integer) or not 1 <= bits <= 16:
        raise ValueError(f"bits must be an integer in [1, 16], got {bits!r}")
    return 2 if bits == 1 else 2**bits - 1


def by_bits(bits: int, delta: ArrayLike) -> UniformAlphabet:
    """The symmetric alphabet whose codes fit in `bits` bits, with step δ.

    b = 1 gives {±δ}; b >= 2 gives {-K..K}·δ with K = 2^(b-1) - 1 (b = 2 is ternary).
    """
    n = num_letters_for_bits(bits)
    return binary(delta) if n == 2 else symmetric((n - 1) // 2, delta)


def midrise(bits: int, radius: ArrayLike) -> UniformAlphabet:
    """The GPFQ reference code's alphabet radius·linspace(-1, 1, 2^bits) (no zero letter)."""
    if not isinstance(bits, int | np.integer) or not 1 <= bits <= 16:
        raise ValueError(f"bits must be an integer in [1, 16], got {bits!r}")
    return uniform(2**bits, radius)


def from_letters(letters: ArrayLike) -> Alphabet:
    """An alphabet of arbitrary letters, sorted and de-duplicated.

    Args:
      letters: shape (n,), or (N1, n) for one alphabet per neuron (each row sorted separately).
    """
    arr = np.asarray(letters)
    if arr.ndim not in (1, 2) or arr.shape[-1] == 0:
        raise ValueError(
            f"letters must be a non-empty array of shape (n,) or (N1, n), got {arr.shape}"
        )
    if not np.issubdtype(arr.dtype, np.number) or not np.all(np.isfinite(arr)):
        raise ValueError("letters must be finite numbers")
    arr = np.unique(arr) if arr.ndim == 1 else np.sort(arr, axis=-1)
    return Alphabet(letters=jnp.asarray(arr, dtype=jnp.result_type(float)))


def scale_radius(
    w: ArrayLike,
    c: float,
    *,
    rule: Literal["median", "max"] = "median",
    per_channel: bool = False,
) -> jax.Array:
    """The largest letter R = C·median|w| or C·max|w|, per layer or per output channel.

    Args:
      w: a kernel whose last axis indexes output neurons (Flax layout: (N0, N1) or
        (kh, kw, cin, cout)).
      c: the scale constant C > 0.
      rule: "median" or "max".
      per_channel: if True, one radius per output neuron, shape (N1,); else a scalar.

    Returns:
      R, a scalar or an (N1,) array.
    """
    w = jnp.asarray(w)
    if w.ndim < 1 or w.size == 0:
        raise ValueError(f"w must be a non-empty array, got shape {w.shape}")
    if not c > 0:
        raise ValueError(f"the scale constant c must be positive, got {c}")
    stats = {"median": jnp.median, "max": jnp.max}
    if rule not in stats:
        raise ValueError(f"unknown scale rule {rule!r}; expected one of {sorted(stats)}")
    magnitudes = jnp.abs(w).reshape(-1, w.shape[-1]) if per_channel else jnp.abs(w).reshape(-1)
    radius = c * stats[rule](magnitudes, axis=0)
    # An all-zero channel would give a zero radius: fall back to the smallest positive one.
    tiny = jnp.finfo(radius.dtype).tiny
    return jnp.where(radius > 0, radius, jnp.maximum(jnp.max(radius), tiny))


def for_weights(
    w: ArrayLike,
    *,
    c: float,
    bits: int | None = None,
    num_letters: int | None = None,
    rule: Literal["median", "max"] = "median",
    per_channel: bool = False,
) -> UniformAlphabet:
    """A uniform symmetric alphabet scaled to the weights `w`.

    The letters are R·linspace(-1, 1, n) with R = `scale_radius(w, c, rule=..., per_channel=...)`.
    Give exactly one of `bits` (n = `num_letters_for_bits(bits)`: binary at 1 bit, otherwise
    {-K..K}·δ with K = 2^(b-1) - 1) or `num_letters` (e.g. 3 for ternary, 2^b for the GPFQ
    reference code's alphabets, 2^b + 1 for Zhang & Saab's).

    Args:
      w: the kernel, output neurons on the last axis.
      c: the scale constant C.
      bits: bit width.
      num_letters: number of letters n >= 2.
      rule: "median" or "max", see `scale_radius`.
      per_channel: one alphabet per output neuron.

    Returns:
      A `UniformAlphabet` with scalar or (N1,) parameters.
    """
    if (bits is None) == (num_letters is None):
        raise ValueError("give exactly one of bits or num_letters")
    n = num_letters_for_bits(bits) if bits is not None else num_letters
    return uniform(n, scale_radius(w, c, rule=rule, per_channel=per_channel))
