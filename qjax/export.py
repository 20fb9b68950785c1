"""Deployable output: quantized weights as packed integer codes plus scales.

After quantization every weight is a letter of a uniform alphabet,

    a_k = δ·(k − z),    k = 0..n−1,

(`qjax.alphabets.UniformAlphabet`; `bits` = b means n = 2^b letters, b = 1 binary {±δ/2}) with
the zero point z = (n−1)/2 (zero-centred, qjax's default), z = ⌊n/2⌋ (the signed integers
{−2^(b−1)..2^(b−1)−1}·δ of integer formats) or an integer z per scale group (asymmetric formats),
but it is still stored as a float. `quantize_array` replaces such a weight tensor by a
`QuantizedArray`: the codes k, packed into bytes, the steps δ (the "scales") and, for asymmetric
alphabets, the zero points z (same shape as the scales). The container
is the smallest that holds b = ⌈log₂ n⌉ bits: 1 bit → 8 codes per byte, 2 bits (3 letters,
ternary, or 4) → 4 per byte, 3–4 bits → 2 per byte, 5–8 bits → one byte per code.

Scale layouts. A kernel is read as its matrix view, as the quantization engine reads it: a
kernel (*stack, *inputs, *outputs) (stack: the leading axes of layers stacked by `scan`) is the
matrix (*stack, N0, N1), N0 = prod(inputs), N1 = prod(outputs), by a row-major reshape (Dense
(N0, N1), DenseGeneral/LinearGeneral (d, heads, head_dim) or (heads, head_dim, d), Conv
(kh, kw, cin, cout), Einsum kernels ordered (batch, contracted, neurons); not grouped
convolutions, whose matrix view is a transpose: pack those per tensor or per channel). The scale
is

* per tensor: a scalar `()`;
* per channel (no groups): an array with the tensor's rank, broadcastable against it: the full
  size on the axes that have one step per index (e.g. (1, 1, 1, cout) for a Conv kernel,
  (L, 1, heads, head_dim) for a stacked attention projection quantized per slice and output
  channel), 1 on the axes it is shared over;
* group-wise (`QuantizedArray.group_size` = g, the LLM standard: one step per g consecutive
  inputs of each output column): (*stack, ⌈N0/g⌉, N1), exactly the step of the
  `UniformAlphabet(step, n, group_size=g)` that quantized the matrix view; input t uses step
  row ⌊t/g⌋. The matrix view is recovered from the scale's shape, so no other metadata is kept.

A given alphabet's step says the layout: () per tensor, (*stack, N1) per output channel, or
group-wise (*stack, ⌈N0/g⌉, N1). Without an alphabet (e.g. after `qjax.quantize_model`, which
does not return its alphabets: pass its `group_size`) the grid is read off the weights: per
scale group, the largest unit h that makes every weight the rounding of an integer multiple m·h
gives the zero-centred grid {−K..K}·h (n = 2K+1 letters, 0 included) or, when every multiple is odd,
{±1, ±3, ...}·h (n even, no 0 letter, δ = 2h); h is chosen so that the letters are the weights
bit for bit. With `channel_axis="auto"` every layout "one step per index of some leading
(stack) axes and some trailing (output) axes, shared over the axes between them" is tried (per
tensor, per output channel, per row of an embedding, per slice and output channel of a stacked
kernel), and with `group_size` also their group-wise forms; the smallest export (codes and
scales) wins. Weights off every grid, NaN, or an explicit letter set that is not uniform and
zero-centred raise a `ValueError` that names the parameter's path and says what to do.

Parameter trees: Flax Linen variables (nested dicts) and Flax NNX state (`nnx.state(module)`,
`nnx.split(module)`, `nnx.state(module, nnx.Param)`) alike. Leaves are named by
`qjax.rules.path_name` ("Dense_0/kernel", "params/Dense_0/kernel", "blocks/attn/query/kernel":
keys joined by "/", NNX's trailing "value" dropped); `alphabets=` is keyed by these names, and
`mask=` may be a pattern that must match a whole name (`re.fullmatch`, ".*/(kernel|embedding)").

`QuantizedArray` is a pytree (codes and scale are its leaves; shape, number of letters and group
size are static), so a tree holding them goes through `jax.jit` as is; `dequantize` unpacks and
rescales inside the jitted function, and `quantized_apply` wraps a Linen `apply` or an NNX
`GraphDef` so that the model runs on the packed tree and only the packed form is held between
calls. `save` / `restore` write and read such a tree with orbax, bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import ArrayLike

from qjax.alphabets import Alphabet, AnyAlphabet, UniformAlphabet
from qjax.rules import compile_pattern, path_name

__all__ = [
    "MAX_LETTERS",
    "QuantizedArray",
    "container_bits",
    "dequantize",
    "export_params",
    "is_quantized",
    "kernel_mask",
    "pack_codes",
    "quantize_array",
    "quantized_apply",
    "restore",
    "save",
    "tree_nbytes",
    "unpack_codes",
]

MAX_LETTERS = 256  # codes must fit one byte
# A weight is on a given alphabet when it is within this many roundings (machine epsilons of its
# dtype, relative to the letter, or to the step for letters near 0) of a letter. Letters computed
# as δ·(k − c) in float32 are within one rounding; bfloat16 weights holding float32 letters within
# one bfloat16 rounding. Anything further off is not a letter. An inferred grid is stricter: each
# weight must be the rounding of its letter to the weight's dtype, up to this many float32
# roundings (letters computed by other float32 arithmetic).
GRID_TOLERANCE_ULPS = 8


def _tolerance(dtype: np.dtype) -> float:
    """The largest relative distance of a weight of `dtype` from its letter."""
    return GRID_TOLERANCE_ULPS * float(jnp.finfo(dtype).eps)


def _scale_dtype(dtype: Any) -> np.dtype:
    """The dtype of the scales (and of the decoding arithmetic): at least float32."""
    return np.dtype(jax.dtypes.canonicalize_dtype(jnp.promote_types(dtype, jnp.float32)))


ChannelAxis = int | tuple[int, ...] | None | Literal["auto"]


def container_bits(num_letters: int) -> int:
    """Bits of the container that holds one code of an n-letter alphabet: 1, 2, 4 or 8.

    Args:
      num_letters: the alphabet size n, 1 to 256.

    Returns:
      1 for n ≤ 2 (8 codes per byte), 2 for n ≤ 4 (ternary: 4 per byte), 4 for n ≤ 16
      (2 per byte), else 8 (one byte per code).
    """
    if not isinstance(num_letters, int | np.integer) or not 1 <= num_letters <= MAX_LETTERS:
        raise ValueError(
            f"num_letters must be an integer in [1, {MAX_LETTERS}], got {num_letters!r}"
        )
    bits = max(1, math.ceil(math.log2(num_letters)))
    return next(width for width in (1, 2, 4, 8) if bits <= width)


def pack_codes(codes: ArrayLike, bits: int) -> jax.Array:
    """Packs integer codes into bytes, 8 // bits codes per byte, the first code in the low bits.

    Packing is part of the export, on the host, in NumPy; `unpack_codes` is its jit-friendly
    inverse.

    Args:
      codes: integers in [0, 2^bits), any shape (flattened in row-major order).
      bits: the container width, 1, 2, 4 or 8.

    Returns:
      A uint8 vector of ⌈codes.size · bits / 8⌉ bytes (the last byte zero-padded).
    """
    if bits not in (1, 2, 4, 8):
        raise ValueError(f"bits must be 1, 2, 4 or 8, got {bits!r}")
    codes = np.asarray(codes).reshape(-1)
    if codes.size and not (codes.min() >= 0 and codes.max() < 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits}) for {bits} bits")
    per_byte = 8 // bits
    padded = np.pad(codes.astype(np.uint8), (0, -codes.size % per_byte)).reshape(-1, per_byte)
    shifts = np.arange(per_byte, dtype=np.uint8) * np.uint8(bits)
    # The codes of one byte occupy disjoint bits, so their sum is their bitwise or.
    return jnp.asarray(np.sum(padded << shifts, axis=1, dtype=np.uint8))


def unpack_codes(packed: ArrayLike, bits: int, shape: tuple[int, ...]) -> jax.Array:
    """Inverse of `pack_codes`: the uint8 codes of the given shape (jit-friendly, shape static)."""
    if bits not in (1, 2, 4, 8):
        raise ValueError(f"bits must be 1, 2, 4 or 8, got {bits!r}")
    packed = jnp.asarray(packed)
    size = math.prod(shape)
    per_byte = 8 // bits
    if packed.shape != (-(-size // per_byte),):
        raise ValueError(
            f"packed must have shape ({-(-size // per_byte)},) for {size} codes of {bits} bits, "
            f"got {packed.shape}"
        )
    shifts = jnp.arange(per_byte, dtype=jnp.uint8) * jnp.uint8(bits)
    mask = jnp.uint8((1 << bits) - 1)
    codes = (packed[:, None] >> shifts) & mask
    return codes.reshape(-1)[:size].reshape(shape)


def _decoding_view(
    shape: tuple[int, ...], scale_shape: tuple[int, ...], group_size: int | None
) -> tuple[int, ...]:
    """The shape the scale applies to: the tensor's own, or group-wise its matrix view
    (*stack, N0, N1), read off the scale (*stack, ⌈N0/g⌉, N1)."""
    if group_size is None:
        return shape
    *stack, _, n1 = scale_shape
    return (*stack, math.prod(shape) // (math.prod(stack) * n1), n1)


@dataclasses.dataclass(frozen=True)
class QuantizedArray:
    """A tensor of letters δ·(k − z) stored as packed codes k, the steps δ and the zero points.

    A pytree: `packed` and `scale` are its leaves, the rest is static (part of the tree
    structure), so it passes through `jax.jit`, `jax.device_put` and orbax unchanged.

    Attributes:
      packed: uint8 vector, the codes k (row-major) packed `8 // container_bits` per byte.
      scale: the steps δ (see the module docstring): a scalar (per tensor); without groups an
        array with the tensor's rank that broadcasts against it (per channel, per slice); with
        `group_size` g, (*stack, ⌈N0/g⌉, N1) for the tensor's matrix view (*stack, N0, N1).
      shape: the tensor's shape.
      num_letters: the alphabet size n (1 to 256).
      dtype: the float dtype of the dequantized tensor, by name.
      group_size: g for group-wise scales, else None.
      zero_point: None, or the integer zero points z (as floats) of an asymmetric alphabet, one
        per step (the shape of `scale`).
      signed: z = ⌊n/2⌋ (the signed integer grid) instead of (n−1)/2, when `zero_point` is None.
    """

    packed: jax.Array
    scale: jax.Array
    shape: tuple[int, ...]
    num_letters: int
    dtype: str
    group_size: int | None = None
    zero_point: jax.Array | None = None
    signed: bool = False

    @property
    def alphabet(self) -> UniformAlphabet:
        """The alphabet of the codes, with the scale's layout."""
        return UniformAlphabet(
            self.scale,
            self.num_letters,
            self.group_size,
            zero_point=self.zero_point,
            signed=self.signed,
        )

    @property
    def bits(self) -> int:
        """The width of one code's container: 1, 2, 4 or 8."""
        return container_bits(self.num_letters)

    @property
    def codes(self) -> jax.Array:
        """The unpacked codes k, uint8 of shape `shape`."""
        return unpack_codes(self.packed, self.bits, self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes held: the packed codes plus the scales (and zero points)."""
        zero = 0 if self.zero_point is None else self.zero_point.nbytes
        return int(self.packed.nbytes + self.scale.nbytes + zero)

    def dequantize(self) -> jax.Array:
        """The letters δ·(k − z), shape `shape`, dtype `dtype`: `UniformAlphabet.decode` of the
        codes, so quantized weights come back bit for bit."""
        alphabet = self.alphabet
        view = _decoding_view(self.shape, tuple(self.scale.shape), self.group_size)
        return alphabet.decode(self.codes.reshape(view)).reshape(self.shape).astype(self.dtype)


jax.tree_util.register_dataclass(
    QuantizedArray,
    data_fields=["packed", "scale", "zero_point"],
    meta_fields=["shape", "num_letters", "dtype", "group_size", "signed"],
)


def is_quantized(x: Any) -> bool:
    """Whether `x` is a `QuantizedArray` (use as `is_leaf` in `jax.tree.map`)."""
    return isinstance(x, QuantizedArray)


# --------------------------------------------------------------------------------------------
# Scale layouts and grids: from an alphabet, or inferred from the weights.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Which weights share a step: one step per index of `channel_axes`, shared over the other
    (reduced) axes entirely, or, with `group_size` g, over blocks of g consecutive entries of
    the reduced axes (which must be contiguous: the inputs of the matrix view)."""

    shape: tuple[int, ...]
    channel_axes: tuple[int, ...]  # sorted, in [0, ndim)
    group_size: int | None = None

    @property
    def reduced(self) -> tuple[int, ...]:
        return tuple(a for a in range(len(self.shape)) if a not in self.channel_axes)

    @property
    def view(self) -> tuple[int, ...]:
        """What the scale broadcasts against: the tensor, or the matrix view (*stack, N0, N1)."""
        if self.group_size is None:
            return self.shape
        start, stop = self.reduced[0], self.reduced[-1] + 1
        return (
            *self.shape[:start],
            math.prod(self.shape[start:stop]),
            math.prod(self.shape[stop:]),
        )

    @property
    def scale_shape(self) -> tuple[int, ...]:
        if self.group_size is not None:
            *stack, n0, n1 = self.view
            return (*stack, -(-n0 // self.group_size), n1)
        if not self.channel_axes:
            return ()
        return tuple(n if a in self.channel_axes else 1 for a, n in enumerate(self.shape))

    def describe(self) -> str:
        if self.group_size is not None:
            return f"groups of {self.group_size} along axes {self.reduced}"
        return (
            f"one step per index of axes {self.channel_axes}" if self.channel_axes else "per tensor"
        )

    def groups(self, w: np.ndarray) -> np.ndarray:
        """w as (number of steps, weights per step), float64, NaN where a last group is short."""
        w = w.astype(np.float64)
        if self.group_size is None:
            moved = np.transpose(w, (*self.channel_axes, *self.reduced))
            return moved.reshape(math.prod(self.scale_shape), -1)
        *_, n0, n1 = self.view
        g, num_groups = self.group_size, self.scale_shape[-2]
        matrices = np.pad(
            w.reshape(-1, n0, n1),
            ((0, 0), (0, num_groups * g - n0), (0, 0)),
            constant_values=np.nan,
        )
        return matrices.reshape(-1, num_groups, g, n1).transpose(0, 1, 3, 2).reshape(-1, g)

    def ungroup(self, values: np.ndarray) -> np.ndarray:
        """Inverse of `groups`: (number of steps, weights per step) back to the tensor's shape."""
        if self.group_size is None:
            order = (*self.channel_axes, *self.reduced)
            moved = values.reshape([self.shape[a] for a in order])
            return np.transpose(moved, np.argsort(order))
        *_, n0, n1 = self.view
        g, num_groups = self.group_size, self.scale_shape[-2]
        matrices = values.reshape(-1, num_groups, n1, g).transpose(0, 1, 3, 2)
        return matrices.reshape(-1, num_groups * g, n1)[:, :n0].reshape(self.shape)

    def broadcast(self, scale: np.ndarray) -> np.ndarray:
        """The step of every weight, shape `shape`."""
        if self.group_size is None:
            return np.broadcast_to(scale, self.shape)
        *_, n0, _ = self.view
        return np.repeat(scale, self.group_size, axis=-2)[..., :n0, :].reshape(self.shape)


def _layout(shape: tuple[int, ...], channel_axes, group_size: int | None, name: str) -> _Layout:
    """A `_Layout` with normalized axes, or a `ValueError` naming the parameter."""
    ndim = len(shape)
    axes = (channel_axes,) if isinstance(channel_axes, int | np.integer) else tuple(channel_axes)
    if any(not -ndim <= a < ndim for a in axes) or len({a % ndim for a in axes}) < len(axes):
        raise ValueError(
            f"channel_axis {channel_axes} is out of range or repeats an axis for {name!r} of "
            f"shape {shape}"
        )
    layout = _Layout(shape, tuple(sorted(a % ndim for a in axes)), group_size)
    reduced = layout.reduced
    if group_size is not None and (not reduced or reduced[-1] - reduced[0] + 1 != len(reduced)):
        raise ValueError(
            f"group-wise steps for {name!r} of shape {shape} need the axes without a step of "
            f"their own (the inputs) to be contiguous and non-empty; channel_axis {channel_axes} "
            f"leaves {reduced}"
        )
    return layout


def _candidate_layouts(shape: tuple[int, ...], group_size: int | None) -> list[_Layout]:
    """channel_axis="auto": a step per index of leading axes axes[:i] (stack, rows) and trailing
    axes axes[j:] (outputs), shared over axes[i:j] (entirely, or in groups), for all i < j."""
    ndim = len(shape)
    if ndim == 0:
        return [_Layout(shape, ())]
    pairs = sorted(
        ((i, j) for i in range(ndim) for j in range(i + 1, ndim + 1)),
        key=lambda pair: (pair[0], -pair[1]),  # per tensor first, then per output channel, ...
    )
    return [
        _Layout(shape, (*range(i), *range(j, ndim)), size)
        for i, j in pairs
        for size in ((None,) if group_size is None else (None, group_size))
    ]


@dataclasses.dataclass(frozen=True)
class _Grid:
    """Codes (int, the weights' shape), the scale (`layout.scale_shape`), the alphabet size, and
    the zero points (None: zero-centred, or ⌊n/2⌋ if `signed`)."""

    codes: np.ndarray
    scale: np.ndarray
    num_letters: int
    layout: _Layout
    zero_point: np.ndarray | None = None
    signed: bool = False

    @property
    def nbytes(self) -> int:
        zero = 0 if self.zero_point is None else self.zero_point.nbytes
        return (
            -(-self.codes.size * container_bits(self.num_letters) // 8) + self.scale.nbytes + zero
        )


def _rounding_intervals(values: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """The reals that round to each weight (float64 `values` of `dtype`): between the midpoints
    to its neighbours, widened by GRID_TOLERANCE_ULPS float32 roundings (letters computed by
    other float32 arithmetic, or rounded twice)."""
    weights = values.astype(dtype)
    slack = _tolerance(_scale_dtype(dtype)) * np.abs(values)
    lower, upper = (
        (values + np.nextafter(weights, np.array(limit, dtype)).astype(np.float64)) / 2
        for limit in (-np.inf, np.inf)
    )
    return lower - slack, upper + slack


def _unit_bounds(
    rounding: tuple[np.ndarray, np.ndarray], valid: np.ndarray, multiples: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per group, the interval [low, high] of units h for which each weight is the rounding of
    its letter m·h: empty (low > high) when no unit is; (-inf, inf) for a group of zeros."""
    constrained = valid & (multiples != 0)
    divisor = np.where(constrained, multiples, 1).astype(np.float64)
    ends = [bound / divisor for bound in rounding]
    low = np.where(constrained, np.minimum(*ends), -np.inf).max(axis=1)
    high = np.where(constrained, np.maximum(*ends), np.inf).min(axis=1)
    return low, high


def _exact_steps(
    values: np.ndarray, valid: np.ndarray, offsets: np.ndarray, low: np.ndarray, high: np.ndarray
) -> np.ndarray:
    """Per group, a step in [low, high] whose letters offset·step, decoded as
    `QuantizedArray.dequantize` does (in the scale dtype, then rounded to the weights' dtype),
    are the weights bit for bit: the middle of the interval or a neighbour of it, where one of
    them is (else the middle, within the grid tolerance). Groups of zeros get the step 1."""
    dtype = values.dtype
    scale_dtype = _scale_dtype(dtype)
    bounded = np.isfinite(low) & np.isfinite(high)
    middle = np.where(bounded, (np.where(bounded, low, 1) + np.where(bounded, high, 1)) / 2, 1)
    middle = middle.astype(scale_dtype)
    step, found = middle, np.zeros(len(values), bool)
    for candidate in (
        middle,
        np.nextafter(middle, scale_dtype.type(-np.inf)),
        np.nextafter(middle, scale_dtype.type(np.inf)),
    ):
        letters = (offsets * candidate[:, None]).astype(dtype)
        exact = ~found & np.all(~valid | (letters == values), axis=1)
        step, found = np.where(exact, candidate, step), found | exact
    return step


# `_infer_grid` first looks for units on at most this many weights of this many groups: a part
# of a grid is on a grid, so a layout that fails there fails, and most wrong layouts fail there.
_SAMPLE = 256


def _units(
    values: np.ndarray,
    valid: np.ndarray,
    rounding: tuple[np.ndarray, np.ndarray],
    dtype: np.dtype,
) -> np.ndarray | None:
    """Per group, the largest unit h = u/j (u the smallest nonzero |w|, j = 1, 2, ...) for which
    some unit near h makes every weight the rounding of a letter m·h (`_unit_bounds`); 1 for a
    group of zeros; None as soon as a group has none with at most MAX_LETTERS letters."""
    magnitudes = np.abs(values)
    largest = magnitudes.max(axis=1)
    smallest = np.where(magnitudes > 0, magnitudes, np.inf).min(axis=1)
    unit = np.where(largest > 0, np.nan, 1.0)  # an all-zero group fits any unit
    # A divisor j makes the grid u/j; beyond max_divisor the grid would exceed MAX_LETTERS.
    max_divisor = np.where(largest > 0, (MAX_LETTERS - 1) * smallest / largest, 0)
    max_divisor = max_divisor * (1 + _tolerance(dtype))
    for divisor in range(1, MAX_LETTERS):
        if np.any(np.isnan(unit) & (divisor > max_divisor)):
            return None
        pending = np.flatnonzero(np.isnan(unit))
        if pending.size == 0:
            break
        candidate = smallest[pending] / divisor
        multiples = np.round(values[pending] / candidate[:, None])
        low, high = _unit_bounds(
            (rounding[0][pending], rounding[1][pending]), valid[pending], multiples
        )
        on_grid = low <= high
        unit[pending[on_grid]] = candidate[on_grid]
    return None if np.any(np.isnan(unit)) else unit


def _infer_grid(w: np.ndarray, layout: _Layout) -> _Grid | None:
    """The uniform grid with the fewest letters holding every weight, or None.

    Per group of `layout`, the unit h of `_units`. If every multiple m of every group is odd the
    grid is {±1, ±3, ...}·h (δ = 2h, even n); otherwise {−K..K}·h (δ = h, n = 2K+1), or the
    signed grid {−K'..K'−1}·h (n = 2K', zero point K') when its codes take fewer bits (int4
    weights {−8..7}·h: 16 letters, 4 bits, not 17 in a byte). The steps are then chosen so that
    the letters are the weights bit for bit.
    """
    groups = layout.groups(w)
    valid = ~np.isnan(groups)
    values = np.where(valid, groups, 0.0)
    sample = values[:_SAMPLE, :_SAMPLE], valid[:_SAMPLE, :_SAMPLE]
    if _units(*sample, _rounding_intervals(sample[0], w.dtype), w.dtype) is None:
        return None
    rounding = _rounding_intervals(values, w.dtype)
    unit = _units(values, valid, rounding, w.dtype)
    if unit is None:
        return None
    multiples = np.round(values / unit[:, None]).astype(np.int64)
    low, high = _unit_bounds(rounding, valid, multiples)
    signed = False
    if np.all((multiples % 2 == 1) | ~valid):  # every letter present is odd: no zero letter
        num_letters = int(np.abs(multiples).max()) + 1
        codes, low, high = (multiples + num_letters - 1) // 2, 2 * low, 2 * high
    else:
        half = int(np.abs(multiples).max())
        num_letters, codes = 2 * half + 1, multiples + half
        signed_half = max(-int(multiples.min()), int(multiples.max()) + 1)
        signed = container_bits(min(2 * signed_half, MAX_LETTERS)) < container_bits(
            min(num_letters, MAX_LETTERS)
        )
        if signed:
            num_letters, codes = 2 * signed_half, multiples + signed_half
    if num_letters > MAX_LETTERS:
        return None
    scale_dtype = _scale_dtype(w.dtype)
    zero = num_letters // 2 if signed else (num_letters - 1) / 2
    offsets = codes.astype(scale_dtype) - scale_dtype.type(zero)
    step = _exact_steps(np.where(valid, groups, 0).astype(w.dtype), valid, offsets, low, high)
    return _Grid(
        codes=layout.ungroup(codes),
        scale=step.reshape(layout.scale_shape),
        num_letters=num_letters,
        layout=layout,
        signed=signed,
    )


def _off_grid_advice(name: str) -> str:
    return (
        f"quantize this parameter first, or pass its alphabet (alphabets={{{name!r}: ...}}), or "
        "leave it out of the export (mask=). After ProxQuant, weights are on a zero-centred "
        "uniform grid only with qjax.prox.ternary_quantizer(symmetric=True) or "
        "qjax.prox.multibit_quantizer(uniform=True); the default ternary (asymmetric) and "
        "multi-bit (greedy) quantizers give weights that cannot be stored as codes and one scale"
    )


def _best_inferred_grid(
    w: np.ndarray, channel_axis: ChannelAxis, group_size: int | None, name: str
) -> _Grid:
    if channel_axis == "auto":
        layouts = _candidate_layouts(w.shape, group_size)
    else:
        axes = () if channel_axis is None else channel_axis
        layouts = [_layout(w.shape, axes, group_size, name)]
    grids = [grid for layout in layouts if (grid := _infer_grid(w, layout)) is not None]
    if not grids:
        if channel_axis != "auto":
            tried = layouts[0].describe()
        elif group_size is None:
            tried = "per tensor, channel or slice; pass group_size= if it has group-wise steps"
        else:
            tried = f"per tensor, channel or slice, or in groups of {group_size}"
        raise ValueError(
            f"weights of {name!r} are off the alphabet: no zero-centred uniform grid of at most "
            f"{MAX_LETTERS} letters ({tried}) holds them; they take {np.unique(w).size} distinct "
            f"values in {w.size} entries, so they look unquantized; {_off_grid_advice(name)}"
        )
    # The smallest export (codes and scales), then the fewest letters, then (among groupings
    # that put the same weights together) the scale that keeps the most of the tensor's axes.
    return min(grids, key=lambda g: (g.nbytes, g.num_letters, -g.scale.ndim))


def _as_uniform(alphabet: AnyAlphabet, name: str) -> UniformAlphabet:
    """A `UniformAlphabet` equal to `alphabet`; a `ValueError` if its letters are not uniform."""
    if isinstance(alphabet, UniformAlphabet):
        return alphabet
    if not isinstance(alphabet, Alphabet):
        raise ValueError(f"alphabet for {name!r} must be an alphabet, got {type(alphabet)}")
    letters = np.asarray(alphabet.letters, np.float64)
    n = letters.shape[-1]
    if n == 1:
        if np.any(letters != 0):
            raise ValueError(f"the one-letter alphabet for {name!r} must be {{0}}, got {letters}")
        return UniformAlphabet(step=jnp.ones(letters.shape[:-1], alphabet.letters.dtype), size=1)
    step = (letters[..., -1] - letters[..., 0]) / (n - 1)
    expected = (np.arange(n) - (n - 1) / 2) * step[..., None]
    tolerance = _tolerance(alphabet.letters.dtype) * np.maximum(np.abs(letters), step[..., None])
    if not np.all(np.abs(letters - expected) <= tolerance):
        raise ValueError(
            f"the letters of the alphabet for {name!r} are not uniform and zero-centred "
            f"(δ·(k − (n−1)/2)), so they have no integer codes with one scale: {letters}"
        )
    return UniformAlphabet(step=jnp.asarray(step, alphabet.letters.dtype), size=n)


def _alphabet_layout(shape: tuple[int, ...], alphabet: UniformAlphabet, name: str) -> _Layout:
    """The layout a step says: () per tensor, (*stack, N1) per output channel, (*stack,
    ⌈N0/g⌉, N1) group-wise, for weights (*stack, *inputs, *outputs) with prod(outputs) = N1."""
    step_shape, g = tuple(np.shape(alphabet.step)), alphabet.group_size
    ndim = len(shape)
    stack = len(step_shape) - (1 if g is None else 2)
    if g is None and not step_shape:
        return _Layout(shape, ())
    if stack >= 0 and shape[:stack] == step_shape[:stack]:
        # The outputs: the fewest trailing axes whose sizes multiply to N1.
        for start in range(ndim, stack - (g is None), -1):
            if math.prod(shape[start:]) != step_shape[-1]:
                continue
            layout = _Layout(shape, (*range(stack), *range(start, ndim)), g)
            if g is None or layout.scale_shape == step_shape:
                return layout
            break
    expected = (
        "() (per tensor) or (*stack, N1) (per output channel)"
        if g is None
        else f"(*stack, ⌈N0/{g}⌉, N1) (groups of {g} inputs per output channel)"
    )
    raise ValueError(
        f"the alphabet for {name!r} has step of shape {step_shape}; expected {expected} for "
        f"weights {shape} = (*stack, *inputs, *outputs), N0 = prod(inputs), N1 = prod(outputs)"
    )


def _alphabet_grid(w: np.ndarray, alphabet: AnyAlphabet, name: str) -> _Grid:
    alphabet = _as_uniform(alphabet, name)
    if alphabet.size > MAX_LETTERS:
        raise ValueError(
            f"the alphabet for {name!r} has {alphabet.size} letters; "
            f"at most {MAX_LETTERS} fit a byte"
        )
    layout = _alphabet_layout(w.shape, alphabet, name)
    step = np.asarray(alphabet.step)
    scale = step.astype(_scale_dtype(step.dtype)).reshape(layout.scale_shape)
    zero = alphabet.zero_point
    if zero is not None:
        zero = np.asarray(zero).astype(scale.dtype).reshape(layout.scale_shape)
    stored = UniformAlphabet(
        jnp.asarray(scale),
        alphabet.size,
        alphabet.group_size,
        zero_point=None if zero is None else jnp.asarray(zero),
        signed=alphabet.signed,
    )
    codes = np.asarray(stored.codes(w.reshape(layout.view))).reshape(w.shape)
    letters = np.asarray(stored.decode(codes.reshape(layout.view)), np.float64).reshape(w.shape)
    steps = layout.broadcast(scale).astype(np.float64)
    distance = np.abs(letters - w.astype(np.float64))
    off = distance > _tolerance(w.dtype) * np.maximum(np.abs(w), steps)
    if np.any(off):
        first = np.unravel_index(np.argmax(distance / steps), w.shape)
        raise ValueError(
            f"weights of {name!r} are off the alphabet: {int(off.sum())} of {w.size} entries, "
            f"e.g. w{list(map(int, first))} = {w[first]} is {distance[first] / steps[first]:.3g} "
            f"steps from its nearest letter {letters[first]}; {_off_grid_advice(name)}"
        )
    return _Grid(
        codes=codes,
        scale=scale,
        num_letters=alphabet.size,
        layout=layout,
        zero_point=zero,
        signed=alphabet.signed,
    )


def quantize_array(
    w: ArrayLike,
    alphabet: AnyAlphabet | None = None,
    *,
    channel_axis: ChannelAxis = "auto",
    group_size: int | None = None,
    name: str = "array",
) -> QuantizedArray:
    """Packs a tensor whose entries are letters of a uniform alphabet.

    Args:
      w: the quantized weights (float), e.g. a Flax kernel (*stack, *inputs, *outputs).
      alphabet: the alphabet the weights were quantized to (`UniformAlphabet` on any grid, with
        its zero points, or an `Alphabet` whose letters are uniform and zero-centred); its step
        says the scale layout: () per
        tensor, (*stack, N1) per output channel, or, with `group_size` g, (*stack, ⌈N0/g⌉, N1)
        for the matrix view (*stack, N0, N1) (see the module docstring). None: infer a
        zero-centred grid from the letters present.
      channel_axis: without an alphabet, the axes with one step per index: None (one step for
        the tensor), an axis or a tuple of axes (e.g. -1: per output channel; 0: per row of an
        embedding; (0, -1): per slice and output channel of a stacked Dense kernel), or "auto":
        try every layout with a step per index of some leading and some trailing axes and keep
        the one that packs smallest (then with the fewest letters).
      group_size: without an alphabet, g: group-wise steps, one per g consecutive entries of the
        axes that `channel_axis` leaves out (the inputs, which must be contiguous); with "auto",
        group-wise layouts are tried besides the others.
      name: the parameter's path, for error messages.

    Returns:
      The `QuantizedArray`; its `dequantize()` gives back `w` bit for bit (inferred steps are
      chosen so that it does; were no float32 step to reproduce the weights exactly, they come
      back within a few roundings).

    Raises:
      ValueError: `w` is not float, holds NaN or Inf, is off the alphabet, or the alphabet is not
        uniform or its step does not fit `w`; the message names `name`.
    """
    if isinstance(w, jax.core.Tracer):
        raise ValueError(f"{name!r}: export needs concrete weights; call it outside jax.jit")
    if group_size is not None and not (isinstance(group_size, int | np.integer) and group_size > 0):
        raise ValueError(f"group_size must be a positive integer or None, got {group_size!r}")
    w = np.asarray(w)
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"{name!r} must be a float array to export, got dtype {w.dtype}")
    if w.size == 0:
        raise ValueError(f"{name!r} is empty (shape {w.shape})")
    if not np.all(np.isfinite(w)):
        bad = "NaN" if np.any(np.isnan(w)) else "Inf"
        raise ValueError(f"{name!r} contains {bad} ({int(np.sum(~np.isfinite(w)))} entries)")
    if alphabet is None:
        grid = _best_inferred_grid(w, channel_axis, group_size, name)
    else:
        grid = _alphabet_grid(w, alphabet, name)
    return QuantizedArray(
        packed=pack_codes(grid.codes, container_bits(grid.num_letters)),
        scale=jnp.asarray(grid.scale),
        shape=tuple(w.shape),
        num_letters=grid.num_letters,
        dtype=w.dtype.name,
        group_size=grid.layout.group_size,
        zero_point=None if grid.zero_point is None else jnp.asarray(grid.zero_point),
        signed=grid.signed,
    )


# --------------------------------------------------------------------------------------------
# Parameter trees: Linen variables and NNX state.
# --------------------------------------------------------------------------------------------


def kernel_mask(params: Any) -> Any:
    """The default export mask: True at the leaves named "kernel" or "embedding".

    Args:
      params: Linen parameters or variables, or NNX state.

    Returns:
      A tree of bools with the structure of `params` (Dense/Conv kernels and Embed tables True;
      biases, normalization and everything else False).
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, _: path_name(path).rsplit("/", 1)[-1] in ("kernel", "embedding"), params
    )


MaskLike = str | Callable[[Any], Any] | Any


def _selected(params: Any, mask: MaskLike | None, names: Sequence[str]) -> list[bool]:
    """Whether each leaf of `params` (in `jax.tree.leaves` order, named `names`) is packed."""
    if isinstance(mask, str):
        pattern = compile_pattern(mask)
        selected = [pattern.fullmatch(name) is not None for name in names]
        what = f"mask pattern {mask!r} (re.fullmatch on the leaf paths)"
    else:
        make = kernel_mask if mask is None else mask
        mask_tree = make(params) if callable(make) else make
        if jax.tree.structure(mask_tree) != jax.tree.structure(params):
            raise ValueError(
                "mask must have the structure of params: got "
                f"{jax.tree.structure(mask_tree)} for {jax.tree.structure(params)}"
            )
        selected = [bool(keep) for keep in jax.tree.leaves(mask_tree)]
        what = "the default mask (leaves named kernel or embedding)" if mask is None else "mask"
    if not any(selected):
        raise ValueError(f"{what} selects no leaf to export; leaves: {', '.join(names)}")
    return selected


def export_params(
    params: Any,
    *,
    alphabets: Mapping[str, AnyAlphabet] | None = None,
    mask: MaskLike | None = None,
    channel_axis: ChannelAxis = "auto",
    group_size: int | None = None,
) -> Any:
    """Replaces the quantized leaves of a parameter tree by `QuantizedArray`s.

    Works on Linen variables (`{"params": ..., "batch_stats": ...}` or the params alone) and on
    NNX state (`nnx.state(module)`, the state of `nnx.split(module)`, `nnx.state(module,
    nnx.Param)`): a packed NNX leaf is a `Variable` holding a `QuantizedArray`.

    Args:
      params: the tree (BatchNorm statistics, biases and other unmasked leaves are kept as they
        are).
      alphabets: the alphabet of some or all leaves, by path (`qjax.rules.path_name`:
        "Dense_0/kernel", "params/Dense_0/kernel", "blocks/attn/query/kernel"); the other masked
        leaves get their grid inferred. Every path must name a masked leaf.
      mask: which leaves to pack: a pattern that must match a leaf's whole path (`re.fullmatch`,
        e.g. ".*/(kernel|embedding)"), or, optax style, a tree of bools with the structure of
        `params` or a function of `params` returning one. Default: `kernel_mask` (every leaf
        named "kernel" or "embedding"). It must select at least one leaf.
      channel_axis: for inferred grids, see `quantize_array` ("auto" also finds one step per
        slice and output channel of stacked kernels from scanned layers).
      group_size: for inferred grids, see `quantize_array`.

    Returns:
      `params` with each masked leaf replaced by its `QuantizedArray`.

    Raises:
      ValueError: a masked leaf is off its alphabet or holds NaN (the message names its path and
        what to do), an alphabet names an unknown or unmasked path, or the mask selects nothing
        (the message lists the paths).
    """
    leaves = jax.tree_util.tree_leaves_with_path(params)
    names = [path_name(path) for path, _ in leaves]
    selected = _selected(params, mask, names)
    masked_names = {name for name, keep in zip(names, selected, strict=True) if keep}
    alphabets = dict(alphabets or {})
    unknown = sorted(set(alphabets) - masked_names)
    if unknown:
        raise ValueError(
            f"alphabets name unknown or unmasked layers {unknown}; masked leaves: "
            f"{sorted(masked_names)}"
        )
    exported = [
        quantize_array(
            leaf,
            alphabets.get(name),
            channel_axis=channel_axis,
            group_size=group_size,
            name=name,
        )
        if keep
        else leaf
        for name, (_, leaf), keep in zip(names, leaves, selected, strict=True)
    ]
    return jax.tree.unflatten(jax.tree.structure(params), exported)


def dequantize(tree: Any) -> Any:
    """Replaces every `QuantizedArray` in `tree` by its float tensor (use inside `jax.jit`)."""
    return jax.tree.map(
        lambda x: x.dequantize() if is_quantized(x) else x, tree, is_leaf=is_quantized
    )


def quantized_apply(model: Callable[..., Any] | nnx.GraphDef) -> Callable[..., Any]:
    """A forward pass that takes variables or state holding `QuantizedArray`s.

    The kernels are unpacked and rescaled inside the returned function, so under `jax.jit` they
    exist only as temporaries of the computation, and only the packed tree is held between calls.

    Linen, `model` an `apply` function `apply_fn(variables, *args, **kwargs)`:

        apply = jax.jit(export.quantized_apply(model.apply), static_argnames="train")
        logits = apply({"params": packed_params, "batch_stats": stats}, images, train=False)

    NNX, `model` a `GraphDef`: the function `apply(state, *args, **kwargs)` is
    `nnx.merge(graphdef, dequantize(state))(*args, **kwargs)`, a fresh module per call (so
    mutations such as BatchNorm statistics in training mode are dropped: split a module in
    `eval()` mode). `state` is one state, a tuple of states (`nnx.split(module, nnx.Param,
    ...)`), or the nested dicts `restore` returns:

        module.eval()
        graphdef, state = nnx.split(module)
        apply = jax.jit(export.quantized_apply(graphdef))
        logits = apply(export.export_params(state), tokens)

    For another method than `__call__`, write the same inside a jitted function:
    `nnx.merge(graphdef, export.dequantize(packed)).generate(...)`.

    Args:
      model: a Linen module's `apply` (or any function of variables first), or an NNX `GraphDef`.

    Returns:
      The function (not jitted: leave that to the caller, as optax does).
    """
    if isinstance(model, nnx.GraphDef):

        def apply_graph(state, *args, **kwargs):
            states = state if isinstance(state, tuple) else (state,)
            return nnx.merge(model, *dequantize(states))(*args, **kwargs)

        return apply_graph

    @functools.wraps(model)
    def apply(variables, *args, **kwargs):
        return model(dequantize(variables), *args, **kwargs)

    return apply


def tree_nbytes(tree: Any) -> int:
    """Bytes held by the arrays of a tree (packed codes and scales for `QuantizedArray`s)."""
    return sum(int(np.asarray(leaf).nbytes) for leaf in jax.tree.leaves(tree))


# --------------------------------------------------------------------------------------------
# Checkpoints.
# --------------------------------------------------------------------------------------------

_LAYOUT_KEYS = ("shape", "num_letters", "dtype", "group_size", "signed")


def _to_nested_arrays(tree: Any) -> tuple[Any, dict[str, dict[str, Any]]]:
    """Plain nested arrays for orbax, and the static fields of each `QuantizedArray` by path."""
    layout = {}

    def split(path, leaf):
        if is_quantized(leaf):
            layout[path_name(path)] = {key: getattr(leaf, key) for key in _LAYOUT_KEYS}
            arrays = {"packed": leaf.packed, "scale": leaf.scale}
            if leaf.zero_point is not None:
                arrays["zero_point"] = leaf.zero_point
            return arrays
        return leaf

    arrays = jax.tree_util.tree_map_with_path(split, tree, is_leaf=is_quantized)
    return arrays, layout


def _from_nested_arrays(arrays: Any, layout: dict[str, dict[str, Any]]) -> Any:
    def rebuild(path, node):
        fields = layout.get(path_name(path))
        if fields is None:
            return node
        return QuantizedArray(
            packed=node["packed"],
            scale=node["scale"],
            shape=tuple(fields["shape"]),
            num_letters=int(fields["num_letters"]),
            dtype=str(fields["dtype"]),
            group_size=fields.get("group_size"),  # absent from checkpoints without groups
            zero_point=node.get("zero_point"),
            signed=bool(fields.get("signed", False)),  # absent from older checkpoints
        )

    is_packed_node = lambda node: (
        isinstance(node, Mapping)
        and set(node)
        in (
            {"packed", "scale"},
            {"packed", "scale", "zero_point"},
        )
    )
    return jax.tree_util.tree_map_with_path(rebuild, arrays, is_leaf=is_packed_node)


def save(directory: str, tree: Any, *, force: bool = False) -> None:
    """Writes a tree of arrays and `QuantizedArray`s to an orbax checkpoint at `directory`.

    The packed codes and scales are stored as arrays (uint8 and float), the static fields of each
    `QuantizedArray` as JSON next to them, so `restore` needs no template. An NNX `State` is
    stored as its pure dict (`nnx.to_pure_dict`: the Variables' values, by path).

    Args:
      directory: a new directory (absolute path, or relative to the working directory).
      tree: e.g. the output of `export_params`: Linen variables (nested dicts) or NNX state.
      force: overwrite `directory` if it exists.
    """
    import orbax.checkpoint as ocp

    if isinstance(tree, nnx.State):
        tree = nnx.to_pure_dict(tree)
    arrays, layout = _to_nested_arrays(tree)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        checkpointer.save(
            _absolute(directory),
            ocp.args.Composite(
                arrays=ocp.args.StandardSave(arrays),
                layout=ocp.args.JsonSave(json.loads(json.dumps(layout))),
            ),
            force=force,
        )


def restore(directory: str) -> Any:
    """Reads a tree written by `save`; the arrays come back bit for bit, with their dtypes.

    Returns:
      Nested dicts. An NNX state comes back as its pure dict (list indices as strings), which
      `nnx.merge(graphdef, ...)` and `quantized_apply(graphdef)` take as it is, and
      `nnx.replace_by_pure_dict(state, ...)` puts into a `State`.
    """
    import orbax.checkpoint as ocp

    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        restored = checkpointer.restore(
            _absolute(directory),
            ocp.args.Composite(arrays=ocp.args.StandardRestore(), layout=ocp.args.JsonRestore()),
        )
    return _from_nested_arrays(restored["arrays"], restored["layout"])


def _absolute(directory: str) -> str:
    return os.path.abspath(directory)
