"""Quantization alphabets: the finite letter sets A that weights are rounded to.

An alphabet is a pytree, so it can be passed through `jax.jit` and `jax.vmap`. Two kinds:

* `UniformAlphabet`: equally spaced letters step·(k - z), k = 0..size-1, on one of three grids:
  - "centered" (z = (size-1)/2, qjax's default): zero-centred letters. This covers the symmetric
    alphabets {-K..K}·δ of the GPFQ papers (K = 1 is ternary), binary {±δ}, and the reference
    code's radius·linspace(-1, 1, n); an even size has no zero letter (mid-rise).
  - "signed" (z = ⌊size/2⌋): the signed integers {-2^(b-1), ..., 2^(b-1)-1}·s of integer serving
    formats with a symmetric scale (int4 is {-8..7}·s; GPTQ, compressed-tensors).
  - "asymmetric" (z an integer per scale group, `zero_point`): (k - z)·s, k = 0..2^b-1, the
    zero-point formats (GPTQ's and compressed-tensors' asymmetric int4/int8).
  Projection is a rounding of x / step + z, with no search over letters.
* `Alphabet`: any sorted set of letters.

Granularity. `step` (or `letters`) is a scalar (one alphabet for the tensor), or carries a last
axis of length N1 (one alphabet per output neuron, "per channel"), broadcasting against a kernel of
shape (..., N1). A `UniformAlphabet` with `group_size` g is group-wise, the LLM standard: its step
has shape (..., ⌈N0/g⌉, N1), one step per block of g consecutive inputs per neuron, and it
projects matrices (..., N0, N1) whose input t uses step row ⌊t/g⌋ (`for_input`; `per_input`
repeats every leaf, zero points included, to one row per input).

Bits. Throughout qjax, `bits` = b means an alphabet of 2^b letters, so that its codes fill b bits:
binary at b = 1, R·linspace(-1, 1, 2^b) beyond (the GPFQ reference code's alphabets). Alphabets
with a zero letter are asked for by their number of letters (3: ternary, 2^b - 1: {-K..K}·δ).

Ties. Q(x) is the nearest letter; a value exactly halfway between two letters goes to the lower
one, for every alphabet kind (as `qjax.reference.nearest_letter`).

Scale rules. The scale constant C sets the step through a radius R, δ = 2R/(n - 1):

* rule "median": R = C·median|w| (Lybrand & Saab's reference code, ternary {-1, 0, 1}·C·median|w|);
* rule "max": R = C·max|w| (Zhang & Saab: δ = C·max|w| / K for letters {-K..K}·δ). On the signed
  grid, C = 1 is the absmax scale of GPTQ tools and compressed-tensors, s = max|w| / ((2^b - 1)/2)
  (int4: max|w| / 7.5, letters -8s..7s).
* on the asymmetric grid, "max" is the min-max rule of GPTQ tools: the range [C·min(w, 0),
  C·max(w, 0)] gives s = C·(max(w, 0) - min(w, 0)) / (2^b - 1) and z = round(-C·min(w, 0) / s)
  (clipped to the codes); "median" has no asymmetric form.

c=None chooses C per scale group by the rounding error, for every grid.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal, get_args

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

__all__ = [
    "GRIDS",
    "Alphabet",
    "Grid",
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


Grid = Literal["centered", "signed", "asymmetric"]
GRIDS: tuple[str, ...] = get_args(Grid)


@dataclasses.dataclass(frozen=True)
class UniformAlphabet:
    """Equally spaced letters a_k = step·(k - z), k = 0..size-1.

    The zero point z is (size-1)/2 (zero-centred: odd sizes give {-K..K}·δ with 0, even sizes
    {±δ/2, ±3δ/2, ...} without 0), ⌊size/2⌋ when `signed` (the signed integers {-2^(b-1), ...,
    2^(b-1)-1}·δ of integer formats), or the integers `zero_point`, one per scale group
    (asymmetric formats). A letter is one product of `step` and a small integer or half-integer,
    so it is bit-identical wherever it is computed.

    Attributes:
      step: the spacing δ between letters: a scalar, (N1,) per neuron, or (⌈N0/g⌉, N1) per
        group of g inputs per neuron.
      size: the number of letters (static: it is part of the pytree's structure).
      group_size: g for a group-wise alphabet, else None (static).
      zero_point: None, or z (integers in [0, size-1], as floats) with the shape of `step`: a
        pytree leaf, so it is mapped, sliced and padded wherever `step` is.
      signed: z = ⌊size/2⌋ (static); ignored when `zero_point` is given.
    """

    step: jax.Array
    size: int
    group_size: int | None = None
    zero_point: jax.Array | None = None
    signed: bool = False

    @property
    def grid(self) -> str:
        """The grid: "asymmetric" (a zero point per scale group), "signed" or "centered"."""
        if self.zero_point is not None:
            return "asymmetric"
        return "signed" if self.signed else "centered"

    @property
    def _zero(self) -> float | jax.Array:
        """z: an array with step's shape, or a number shared by all scale groups."""
        if self.zero_point is not None:
            return jnp.asarray(self.zero_point)
        return float(self.size // 2) if self.signed else (self.size - 1) / 2

    @property
    def letters(self) -> jax.Array:
        """The letters, shape step.shape + (size,)."""
        step = jnp.asarray(self.step)
        zero = jnp.asarray(self._zero, step.dtype)
        offsets = jnp.arange(self.size, dtype=step.dtype) - zero[..., None]  # exact
        return offsets * step[..., None]

    def for_input(self, t: ArrayLike) -> UniformAlphabet:
        """The alphabet of input t (row t of a weight matrix): itself unless group-wise.

        For a group-wise alphabet the step's (and zero point's) group axis (-2, or -1 once the
        neuron axis has been mapped away) is indexed at ⌊t/g⌋; `t` may be traced.
        """
        if self.group_size is None:
            return self
        step = jnp.asarray(self.step)
        axis = -2 if step.ndim >= 2 else -1
        group = jnp.minimum(t // self.group_size, step.shape[axis] - 1)
        zero = self.zero_point
        if zero is not None:
            zero = jnp.take(jnp.asarray(zero), group, axis=axis)
        return UniformAlphabet(
            jnp.take(step, group, axis=axis), self.size, zero_point=zero, signed=self.signed
        )

    def _rows(self, value: jax.Array, x: jax.Array) -> jax.Array:
        """A step-shaped `value` broadcast against x; group-wise, repeated over its group's rows."""
        value = jnp.asarray(value)
        if self.group_size is None:
            return value
        if x.ndim < 2:
            raise ValueError(
                f"a group-wise alphabet projects matrices (..., N0, N1), got shape {x.shape}"
            )
        rows = jnp.repeat(value, self.group_size, axis=-2)
        if rows.shape[-2] < x.shape[-2]:
            raise ValueError(
                f"group-wise alphabet with {value.shape[-2]} groups of {self.group_size} inputs "
                f"cannot cover N0 = {x.shape[-2]} inputs"
            )
        return rows[..., : x.shape[-2], :]

    def per_input(self, x: ArrayLike) -> UniformAlphabet:
        """The alphabet of the matrix x (..., N0, N1) with one scale row per input.

        Group-wise, every leaf (the step and the zero point) is repeated over its group's rows to
        shape (..., N0, N1) and the group size becomes 1, so that the rows can be reordered or
        sliced like the inputs (`jax.tree.map`) without losing a leaf. Otherwise itself.
        """
        if self.group_size is None:
            return self
        x = jnp.asarray(x)
        rows = jax.tree.map(lambda leaf: self._rows(leaf, x), self)
        return dataclasses.replace(rows, group_size=1)

    def _zero_for(self, x: jax.Array) -> float | jax.Array:
        zero = self._zero
        return zero if self.zero_point is None else self._rows(zero, x)

    def codes(self, x: ArrayLike) -> jax.Array:
        """Index k (int32) of the letter nearest to each entry of x; ties go to the lower k."""
        x = jnp.asarray(x)
        k = jnp.ceil(x / self._rows(self.step, x) + self._zero_for(x) - 0.5)
        return jnp.clip(k, 0, self.size - 1).astype(jnp.int32)

    def decode(self, codes: ArrayLike) -> jax.Array:
        """Letters a_k for integer codes k (per-neuron steps broadcast on the last axis)."""
        codes = jnp.asarray(codes)
        step = self._rows(self.step, codes)
        return (codes.astype(step.dtype) - self._zero_for(codes)) * step

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

    def for_input(self, t: ArrayLike) -> Alphabet:
        """The alphabet of input t: the same for every input."""
        del t
        return self

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


for _cls, _data in ((UniformAlphabet, ["step", "zero_point"]), (Alphabet, ["letters"])):
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
    """The number of letters of a b-bit alphabet: 2^b (its codes fill b bits)."""
    if not isinstance(bits, int | np.integer) or not 1 <= bits <= 16:
        raise ValueError(f"bits must be an integer in [1, 16], got {bits!r}")
    return 2**bits


def by_bits(bits: int, delta: ArrayLike) -> UniformAlphabet:
    """The b-bit alphabet with step δ: 2^b letters δ·(k - (2^b - 1)/2), k = 0..2^b - 1.

    b = 1 gives {±δ/2}; b = 2 gives {±δ/2, ±3δ/2}. There is no zero letter (use `symmetric`).
    """
    delta = jnp.asarray(delta, dtype=jnp.result_type(float))
    _check_positive_finite("delta", delta)
    return UniformAlphabet(step=delta, size=num_letters_for_bits(bits))


def midrise(bits: int, radius: ArrayLike) -> UniformAlphabet:
    """The b-bit alphabet radius·linspace(-1, 1, 2^b) of the GPFQ reference code."""
    return uniform(num_letters_for_bits(bits), radius)


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


Granularity = Literal["tensor", "channel", "group"]
_STATISTICS = {"median": jnp.nanmedian, "max": jnp.nanmax}
# c=None: the constants tried for each scale group, as multiples of the rule's statistic.
_MSE_SEARCH = {"max": np.linspace(0.3, 1.0, 36), "median": np.linspace(0.5, 8.0, 31)}


def _scale_groups(w: jax.Array, *, per_channel: bool, group_size: int | None) -> jax.Array:
    """w arranged so that a reduction over axis -2 gives one statistic per scale group.

    Returns w as (size, 1) per tensor, (rows, N1) per channel (w's leading axes flattened), or
    (..., G, g, N1) group-wise (w a matrix (..., N0, N1), N0 padded to G·g with NaN, which the
    reductions ignore).
    """
    if group_size is not None:
        if w.ndim < 2:
            raise ValueError(f"group-wise scales need a matrix (..., N0, N1), got {w.shape}")
        n0 = w.shape[-2]
        groups = -(-n0 // group_size)
        pad = [(0, 0)] * w.ndim
        pad[-2] = (0, groups * group_size - n0)
        padded = jnp.pad(w, pad, constant_values=jnp.nan)
        return padded.reshape(*w.shape[:-2], groups, group_size, w.shape[-1])
    if per_channel:
        return w.reshape(-1, w.shape[-1])
    return w.reshape(-1, 1)


def _check_scale_options(w: jax.Array, rule: str, per_channel: bool, group_size, grid) -> None:
    if w.ndim < 1 or w.size == 0:
        raise ValueError(f"w must be a non-empty array, got shape {w.shape}")
    if rule not in _STATISTICS:
        raise ValueError(f"unknown scale rule {rule!r}; expected one of {sorted(_STATISTICS)}")
    if grid not in GRIDS:
        raise ValueError(f"unknown grid {grid!r}; expected one of {GRIDS}")
    if grid == "asymmetric" and rule != "max":
        raise ValueError(
            f"the asymmetric grid takes rule='max' (min-max range), not {rule!r}: a zero point "
            "is set by the range's ends"
        )
    if group_size is not None and (not isinstance(group_size, int | np.integer) or group_size < 1):
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")


def _reduce(groups: jax.Array, rule: str) -> jax.Array:
    """The rule's statistic of |w| per scale group (axis -2 reduced)."""
    return _STATISTICS[rule](jnp.abs(groups), axis=-2)


def _positive(radius: jax.Array) -> jax.Array:
    # An all-zero channel or group would give a zero radius: use the smallest positive one.
    tiny = jnp.finfo(radius.dtype).tiny
    return jnp.where(radius > 0, radius, jnp.maximum(jnp.max(radius), tiny))


def scale_radius(
    w: ArrayLike,
    c: float,
    *,
    rule: Literal["median", "max"] = "median",
    per_channel: bool = False,
    group_size: int | None = None,
) -> jax.Array:
    """The radius R = C·median|w| or C·max|w|, per tensor, output channel or group.

    Args:
      w: a kernel whose last axis indexes output neurons (Flax layout: (N0, N1) or
        (kh, kw, cin, cout)); a matrix (..., N0, N1) when `group_size` is given.
      c: the scale constant C > 0.
      rule: "median" or "max".
      per_channel: if True, one radius per output neuron, shape (N1,); else a scalar.
      group_size: g: one radius per g consecutive inputs per neuron, shape (..., ⌈N0/g⌉, N1)
        (group-wise scales are per output channel whatever `per_channel` says).

    Returns:
      R: a scalar, (N1,), or (..., ⌈N0/g⌉, N1).
    """
    w = jnp.asarray(w)
    _check_scale_options(w, rule, per_channel, group_size, "centered")
    if not c > 0:
        raise ValueError(f"the scale constant c must be positive, got {c}")
    statistic = _reduce(_scale_groups(w, per_channel=per_channel, group_size=group_size), rule)
    per_tensor = not per_channel and group_size is None
    return _positive(c * (statistic[..., 0] if per_tensor else statistic))


def _grid_parameters(
    groups: jax.Array, c, *, num_letters: int, rule: str, grid: str
) -> tuple[jax.Array, jax.Array | None]:
    """(step, zero point or None) per scale group of `groups` for the constant(s) c."""
    if grid == "asymmetric":
        low = c * jnp.minimum(jnp.nanmin(groups, axis=-2), 0)
        high = c * jnp.maximum(jnp.nanmax(groups, axis=-2), 0)
        step = _positive((high - low) / (num_letters - 1))
        return step, jnp.clip(jnp.round(-low / step), 0, num_letters - 1)
    return 2 * _positive(c * _reduce(groups, rule)) / (num_letters - 1), None


@functools.partial(jax.jit, static_argnames=("num_letters", "rule", "grid", "per_tensor"))
def _mse_parameters(
    groups: jax.Array, *, num_letters: int, rule: str, grid: str, per_tensor: bool
) -> tuple[jax.Array, jax.Array | None]:
    """The (step, zero point) of the C on a grid minimising Σ (w - Q(w))² in each scale group."""
    valid = ~jnp.isnan(groups)
    values = jnp.nan_to_num(groups)
    signed = grid == "signed"

    def error(c):
        step, zero = _grid_parameters(groups, c, num_letters=num_letters, rule=rule, grid=grid)
        zero = None if zero is None else zero[..., None, :]
        alphabet = UniformAlphabet(step[..., None, :], num_letters, zero_point=zero, signed=signed)
        residual = jnp.where(valid, values - alphabet.project(values), 0.0)
        squares = jnp.sum(residual**2, axis=-2)
        return jnp.sum(squares, axis=-1, keepdims=True) if per_tensor else squares

    candidates = jnp.asarray(_MSE_SEARCH[rule], values.dtype)
    errors = jax.lax.map(error, candidates)  # (num_candidates, ...)
    best = candidates[jnp.argmin(errors, axis=0)]
    return _grid_parameters(groups, best, num_letters=num_letters, rule=rule, grid=grid)


def for_weights(
    w: ArrayLike,
    *,
    c: float | None,
    bits: int | None = None,
    num_letters: int | None = None,
    rule: Literal["median", "max"] = "median",
    per_channel: bool = False,
    group_size: int | None = None,
    grid: Grid = "centered",
) -> UniformAlphabet:
    """A uniform alphabet scaled to the weights `w`.

    Centered and signed grids: step δ = 2R/(n - 1) with R = `scale_radius(w, c, ...)` (centered:
    the letters R·linspace(-1, 1, n)). Asymmetric grid: the min-max range [C·min(w, 0),
    C·max(w, 0)] in n letters with an integer zero point (see the module docstring). Give exactly
    one of `bits` (n = 2^b) or `num_letters` (e.g. 3 for ternary, 2^b - 1 for {-K..K}·δ).

    Args:
      w: the kernel, output neurons on the last axis (a matrix (..., N0, N1) when group-wise).
      c: the scale constant C; None chooses, in each scale group (tensor, channel or group), the C
        on a grid (0.3..1 for "max", 0.5..8 for "median") whose rounding Q(w) is closest to w in
        squared error, a data-free choice that gives good alphabets at every size.
      bits: bit width b.
      num_letters: number of letters n >= 2.
      rule: "median" or "max", see `scale_radius` ("max" only on the asymmetric grid).
      per_channel: one alphabet per output neuron.
      group_size: one alphabet per g consecutive inputs per output neuron (group-wise).
      grid: "centered" (z = (n-1)/2), "signed" (z = ⌊n/2⌋: {-2^(b-1)..2^(b-1)-1}·s) or
        "asymmetric" (an integer zero point per scale group).

    Returns:
      A `UniformAlphabet` with scalar, (N1,) or (..., ⌈N0/g⌉, N1) steps (and zero points).
    """
    if (bits is None) == (num_letters is None):
        raise ValueError("give exactly one of bits or num_letters")
    n = num_letters_for_bits(bits) if bits is not None else num_letters
    if not isinstance(n, int | np.integer) or n < 2:
        raise ValueError(f"num_letters must be an integer >= 2, got {n!r}")
    w = jnp.asarray(w)
    _check_scale_options(w, rule, per_channel, group_size, grid)
    if c is not None and not c > 0:
        raise ValueError(f"the scale constant c must be positive, got {c}")
    groups = _scale_groups(w, per_channel=per_channel, group_size=group_size)
    per_tensor = not per_channel and group_size is None
    options = dict(num_letters=int(n), rule=rule, grid=grid)
    if c is not None:
        step, zero = _grid_parameters(groups, c, **options)
        _check_positive_finite("step", step)
    else:
        step, zero = _mse_parameters(groups, per_tensor=per_tensor, **options)
    if per_tensor:
        step, zero = step[0], None if zero is None else zero[0]
    return UniformAlphabet(
        step=step, size=int(n), group_size=group_size, zero_point=zero, signed=grid == "signed"
    )
