"""Deployable output: quantized weights as packed integer codes plus scales.

After GPFQ or ProxQuant every quantized weight is a letter of a zero-centred uniform alphabet,

    a_k = δ·(k − (n−1)/2),    k = 0..n−1,

(`qjax.alphabets.UniformAlphabet`), but it is still stored as a float. `quantize_array` replaces
such a weight tensor by a `QuantizedArray`: the codes k, packed into bytes, and the step δ (the
"scale"), one per tensor or one per channel. The container is the smallest that holds
b = ⌈log₂ n⌉ bits: 1 bit → 8 codes per byte, 2 bits (ternary) → 4 per byte, 3–4 bits → 2 per
byte, 5–8 bits → one byte per code.

When the alphabet is not given, it is read off the weights: the letters present determine the
largest step h that makes every weight an integer multiple of h, and the grid is
{−K..K}·h (n = 2K+1 letters, 0 included) or, when every multiple is odd, {±1, ±3, ...}·h
(n even, no 0 letter, δ = 2h). Weights off that grid, NaN, or an explicit letter set that is not
uniform and zero-centred raise a `ValueError` that names the parameter's path.

`QuantizedArray` is a pytree (codes and scale are its leaves; shape and number of letters are
static), so a parameter tree holding them goes through `jax.jit` as is; `dequantize` unpacks and
rescales inside the jitted function, and `quantized_apply` wraps a Flax `apply` so that the model
runs on the packed tree and only the packed form is held between calls. `save` / `restore` write
and read such a tree with orbax, bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Callable, Mapping
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from qjax.alphabets import Alphabet, AnyAlphabet, UniformAlphabet

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
# A weight is on the grid when it is within this many roundings (machine epsilons of its dtype,
# relative to the letter, or to the step for letters near 0) of a letter. Letters computed as
# δ·(k − c) in float32 are within one rounding; bfloat16 weights holding float32 letters within
# one bfloat16 rounding. Anything further off is not a letter.
GRID_TOLERANCE_ULPS = 8


def _tolerance(dtype: np.dtype) -> float:
    """The largest relative distance of a weight of `dtype` from its letter."""
    return GRID_TOLERANCE_ULPS * float(jnp.finfo(dtype).eps)


ChannelAxis = int | None | Literal["auto"]


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


@dataclasses.dataclass(frozen=True)
class QuantizedArray:
    """A tensor of letters δ·(k − (n−1)/2) stored as packed codes k and the step δ.

    A pytree: `packed` and `scale` are its leaves, the rest is static (part of the tree
    structure), so it passes through `jax.jit`, `jax.device_put` and orbax unchanged.

    Attributes:
      packed: uint8 vector, the codes k (row-major) packed `8 // container_bits` per byte.
      scale: the step δ, broadcastable against `shape`: a scalar (per tensor) or an array with
        the tensor's rank that is 1 except on the channel axis (per channel).
      shape: the tensor's shape.
      num_letters: the alphabet size n (1 to 256).
      dtype: the float dtype of the dequantized tensor, by name.
    """

    packed: jax.Array
    scale: jax.Array
    shape: tuple[int, ...]
    num_letters: int
    dtype: str

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
        """Bytes held: the packed codes plus the scales."""
        return int(self.packed.nbytes + self.scale.nbytes)

    def dequantize(self) -> jax.Array:
        """The letters δ·(k − (n−1)/2), shape `shape`, dtype `dtype` (the same arithmetic as
        `UniformAlphabet.decode`, so the weights come back bit for bit)."""
        center = (self.num_letters - 1) / 2
        return ((self.codes.astype(self.scale.dtype) - center) * self.scale).astype(self.dtype)


jax.tree_util.register_dataclass(
    QuantizedArray,
    data_fields=["packed", "scale"],
    meta_fields=["shape", "num_letters", "dtype"],
)


def is_quantized(x: Any) -> bool:
    """Whether `x` is a `QuantizedArray` (use as `is_leaf` in `jax.tree.map`)."""
    return isinstance(x, QuantizedArray)


# --------------------------------------------------------------------------------------------
# Grids: from an alphabet, or inferred from the weights.
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Grid:
    """Codes (int, the weights' shape), the step δ (broadcastable) and the number of letters."""

    codes: np.ndarray
    step: np.ndarray
    num_letters: int


def _channel_groups(w: np.ndarray, channel_axis: int | None) -> np.ndarray:
    """(G, m): one row per scale group (G = 1 per tensor, G = w.shape[axis] per channel)."""
    if channel_axis is None:
        return w.reshape(1, -1)
    return np.moveaxis(w, channel_axis, 0).reshape(w.shape[channel_axis], -1)


def _scale_shape(shape: tuple[int, ...], channel_axis: int | None) -> tuple[int, ...]:
    if channel_axis is None:
        return ()
    return tuple(n if axis == channel_axis % len(shape) else 1 for axis, n in enumerate(shape))


def _infer_grid(w: np.ndarray, channel_axis: int | None) -> _Grid | None:
    """The zero-centred uniform grid with the fewest letters holding every weight, or None.

    Per group: u = the smallest nonzero |w|; the unit h is the largest u/j (j = 1, 2, ...) that
    makes every w/h an integer (within GRID_TOLERANCE_ULPS roundings). If every multiple w/h of
    every group is odd the grid is {±1, ±3, ...}·h (δ = 2h, even n); otherwise {−K..K}·h
    (δ = h, n = 2K+1).
    """
    groups = _channel_groups(w.astype(np.float64), channel_axis)
    magnitudes = np.abs(groups)
    largest = magnitudes.max(axis=1)
    smallest = np.where(magnitudes > 0, magnitudes, np.inf).min(axis=1)
    unit = np.where(largest > 0, np.nan, 1.0)  # an all-zero group fits any unit
    # A divisor j makes the grid u/j; beyond max_divisor the grid would exceed MAX_LETTERS.
    max_divisor = np.where(largest > 0, (MAX_LETTERS - 1) * smallest / largest, 0)
    for divisor in range(1, MAX_LETTERS):
        pending = np.flatnonzero(
            np.isnan(unit) & (divisor <= max_divisor * (1 + _tolerance(w.dtype)))
        )
        if pending.size == 0:
            break
        candidate = smallest[pending] / divisor
        ratios = groups[pending] / candidate[:, None]
        tolerance = _tolerance(w.dtype) * np.maximum(np.abs(ratios), 1)
        on_grid = np.all(np.abs(ratios - np.round(ratios)) <= tolerance, axis=1)
        unit[pending[on_grid]] = candidate[on_grid]
    if np.any(np.isnan(unit)):
        return None
    multiples = np.round(groups / unit[:, None]).astype(np.int64)
    if np.all(multiples % 2 == 1):  # every letter present is an odd multiple: no zero letter
        num_letters = int(np.abs(multiples).max()) + 1
        codes, step = (multiples + num_letters - 1) // 2, 2 * unit
    else:
        half = int(np.abs(multiples).max())
        num_letters, codes, step = 2 * half + 1, multiples + half, unit
    if num_letters > MAX_LETTERS:
        return None
    if channel_axis is None:
        codes = codes.reshape(w.shape)
    else:
        moved_shape = (w.shape[channel_axis], *np.delete(w.shape, channel_axis))
        codes = np.moveaxis(codes.reshape(moved_shape), 0, channel_axis)
    step = step.astype(jnp.promote_types(w.dtype, jnp.float32)).reshape(
        _scale_shape(w.shape, channel_axis)
    )
    return _Grid(codes=codes, step=step, num_letters=max(num_letters, 1))


def _best_inferred_grid(w: np.ndarray, channel_axis: ChannelAxis, name: str) -> _Grid:
    if channel_axis == "auto":
        axes = [None] + ([-1, 0] if w.ndim >= 2 else [])
    else:
        if channel_axis is not None and not -w.ndim <= channel_axis < w.ndim:
            raise ValueError(
                f"channel_axis {channel_axis} is out of range for {name!r} of shape {w.shape}"
            )
        axes = [channel_axis]
    grids = [grid for axis in axes if (grid := _infer_grid(w, axis)) is not None]
    if not grids:
        per = "per tensor or per channel" if channel_axis == "auto" else f"axis {channel_axis}"
        raise ValueError(
            f"weights of {name!r} are off the alphabet: no zero-centred uniform grid of at most "
            f"{MAX_LETTERS} letters ({per}) holds them; quantize this parameter first or leave it "
            "out of the export"
        )
    # The smallest container first, then the fewest scales.
    return min(grids, key=lambda g: (container_bits(g.num_letters), g.step.size, g.num_letters))


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


def _alphabet_grid(w: np.ndarray, alphabet: AnyAlphabet, name: str) -> _Grid:
    alphabet = _as_uniform(alphabet, name)
    step = np.asarray(alphabet.step)
    if step.ndim > 1 or (step.ndim == 1 and (w.ndim == 0 or step.shape[0] != w.shape[-1])):
        raise ValueError(
            f"the alphabet for {name!r} has step of shape {step.shape}; expected () or "
            f"({w.shape[-1] if w.ndim else 1},) (one per output channel) for weights {w.shape}"
        )
    if alphabet.size > MAX_LETTERS:
        raise ValueError(
            f"the alphabet for {name!r} has {alphabet.size} letters; "
            f"at most {MAX_LETTERS} fit a byte"
        )
    codes = np.asarray(alphabet.codes(w))
    error = np.abs(np.asarray(alphabet.decode(codes), np.float64) - w)
    off = error > _tolerance(w.dtype) * np.maximum(np.abs(w), np.broadcast_to(step, w.shape))
    if np.any(off):
        first = np.unravel_index(np.argmax(off), w.shape)
        raise ValueError(
            f"weights of {name!r} are off the alphabet: {int(off.sum())} of {w.size} entries, "
            f"e.g. w{list(map(int, first))} = {w[first]} (nearest letter "
            f"{np.asarray(alphabet.decode(codes[first]))}); quantize them first"
        )
    return _Grid(
        codes=codes,
        step=step.reshape(_scale_shape(w.shape, -1 if step.ndim else None)),
        num_letters=alphabet.size,
    )


def quantize_array(
    w: ArrayLike,
    alphabet: AnyAlphabet | None = None,
    *,
    channel_axis: ChannelAxis = "auto",
    name: str = "array",
) -> QuantizedArray:
    """Packs a tensor whose entries are letters of a zero-centred uniform alphabet.

    Args:
      w: the quantized weights (float), e.g. a Flax kernel (..., N1).
      alphabet: the alphabet the weights were quantized to (`UniformAlphabet`, or an `Alphabet`
        whose letters are uniform and zero-centred), per tensor or per output channel (step of
        shape (N1,)). None: infer the grid from the letters present.
      channel_axis: without an alphabet, where the scales live: None (one per tensor), an axis
        (one per slice along it), or "auto" (per tensor, per last axis or per first axis,
        whichever needs the smallest container, then the fewest scales).
      name: the parameter's path, for error messages.

    Returns:
      The `QuantizedArray`; its `dequantize()` gives back `w` (bit for bit when the alphabet is
      given; within a few ulps when it is inferred).

    Raises:
      ValueError: `w` is not float, holds NaN or Inf, is off the alphabet, or the alphabet is not
        uniform; the message names `name`.
    """
    if isinstance(w, jax.core.Tracer):
        raise ValueError(f"{name!r}: export needs concrete weights; call it outside jax.jit")
    w = np.asarray(w)
    if not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"{name!r} must be a float array to export, got dtype {w.dtype}")
    if w.size == 0:
        raise ValueError(f"{name!r} is empty (shape {w.shape})")
    if not np.all(np.isfinite(w)):
        bad = "NaN" if np.any(np.isnan(w)) else "Inf"
        raise ValueError(f"{name!r} contains {bad} ({int(np.sum(~np.isfinite(w)))} entries)")
    if alphabet is None:
        grid = _best_inferred_grid(w, channel_axis, name)
    else:
        grid = _alphabet_grid(w, alphabet, name)
    bits = container_bits(grid.num_letters)
    return QuantizedArray(
        packed=pack_codes(grid.codes, bits),
        # Scales at least float32: bfloat16 weights are decoded in float32, then rounded.
        scale=jnp.asarray(grid.step, dtype=jnp.promote_types(grid.step.dtype, jnp.float32)),
        shape=tuple(w.shape),
        num_letters=grid.num_letters,
        dtype=w.dtype.name,
    )


# --------------------------------------------------------------------------------------------
# Parameter trees.
# --------------------------------------------------------------------------------------------


def _path_name(path: tuple[Any, ...]) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def kernel_mask(params: Any) -> Any:
    """The default export mask: True at the leaves named "kernel" or "embedding".

    Args:
      params: a Flax parameter tree.

    Returns:
      A tree of bools with the structure of `params` (Dense/Conv kernels and Embed tables True;
      biases, BatchNorm and everything else False).
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, _: _path_name(path).rsplit("/", 1)[-1] in ("kernel", "embedding"), params
    )


def export_params(
    params: Any,
    *,
    alphabets: Mapping[str, AnyAlphabet] | None = None,
    mask: Any | Callable[[Any], Any] | None = None,
    channel_axis: ChannelAxis = "auto",
) -> Any:
    """Replaces the quantized leaves of a parameter tree by `QuantizedArray`s.

    Args:
      params: a Flax parameter tree (or whole variables: BatchNorm statistics, biases and other
        unmasked leaves are kept as they are).
      alphabets: the alphabet of some or all leaves, by path ("Dense_0/kernel"); the other
        masked leaves get their grid inferred. Every path must name a masked leaf.
      mask: which leaves to pack, optax style: a tree of bools with the structure of `params`,
        or a function of `params` returning one. Default: every leaf named "kernel" or
        "embedding".
      channel_axis: for inferred grids, see `quantize_array`.

    Returns:
      `params` with each masked leaf replaced by its `QuantizedArray`.

    Raises:
      ValueError: a masked leaf is off its alphabet or holds NaN (the message names its path), or
        an alphabet names an unknown or unmasked path.
    """
    if mask is None:
        mask = kernel_mask
    mask_tree = mask(params) if callable(mask) else mask
    if jax.tree.structure(mask_tree) != jax.tree.structure(params):
        raise ValueError(
            "mask must have the structure of params: got "
            f"{jax.tree.structure(mask_tree)} for {jax.tree.structure(params)}"
        )
    leaves = jax.tree_util.tree_leaves_with_path(params)
    selected = jax.tree.leaves(mask_tree)
    masked_paths = {
        _path_name(path) for (path, _), keep in zip(leaves, selected, strict=True) if keep
    }
    alphabets = dict(alphabets or {})
    unknown = sorted(set(alphabets) - masked_paths)
    if unknown:
        raise ValueError(
            f"alphabets name unknown or unmasked layers {unknown}; masked leaves: "
            f"{sorted(masked_paths)}"
        )
    exported = [
        quantize_array(
            leaf, alphabets.get(name := _path_name(path)), channel_axis=channel_axis, name=name
        )
        if keep
        else leaf
        for (path, leaf), keep in zip(leaves, selected, strict=True)
    ]
    return jax.tree.unflatten(jax.tree.structure(params), exported)


def dequantize(tree: Any) -> Any:
    """Replaces every `QuantizedArray` in `tree` by its float tensor (use inside `jax.jit`)."""
    return jax.tree.map(
        lambda x: x.dequantize() if is_quantized(x) else x, tree, is_leaf=is_quantized
    )


def quantized_apply(apply_fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps `apply_fn(variables, *args, **kwargs)` to take variables holding `QuantizedArray`s.

    The kernels are unpacked and rescaled inside the wrapped function, so under `jax.jit` they
    exist only as temporaries of the computation, and only the packed tree is held between calls:

        apply = jax.jit(export.quantized_apply(model.apply), static_argnames="train")
        logits = apply({"params": packed_params, "batch_stats": stats}, images, train=False)

    Args:
      apply_fn: e.g. a Flax module's `apply`.

    Returns:
      The wrapped function (not jitted: leave that to the caller, as optax does).
    """

    @functools.wraps(apply_fn)
    def apply(variables, *args, **kwargs):
        return apply_fn(dequantize(variables), *args, **kwargs)

    return apply


def tree_nbytes(tree: Any) -> int:
    """Bytes held by the arrays of a tree (packed codes and scales for `QuantizedArray`s)."""
    return sum(int(np.asarray(leaf).nbytes) for leaf in jax.tree.leaves(tree))


# --------------------------------------------------------------------------------------------
# Checkpoints.
# --------------------------------------------------------------------------------------------

_LAYOUT_KEYS = ("shape", "num_letters", "dtype")


def _to_nested_arrays(tree: Any) -> tuple[Any, dict[str, dict[str, Any]]]:
    """Plain nested arrays for orbax, and the static fields of each `QuantizedArray` by path."""
    layout = {}

    def split(path, leaf):
        if is_quantized(leaf):
            layout[_path_name(path)] = {key: getattr(leaf, key) for key in _LAYOUT_KEYS}
            return {"packed": leaf.packed, "scale": leaf.scale}
        return leaf

    arrays = jax.tree_util.tree_map_with_path(split, tree, is_leaf=is_quantized)
    return arrays, layout


def _from_nested_arrays(arrays: Any, layout: dict[str, dict[str, Any]]) -> Any:
    def rebuild(path, node):
        fields = layout.get(_path_name(path))
        if fields is None:
            return node
        return QuantizedArray(
            packed=node["packed"],
            scale=node["scale"],
            shape=tuple(fields["shape"]),
            num_letters=int(fields["num_letters"]),
            dtype=str(fields["dtype"]),
        )

    is_packed_node = lambda node: isinstance(node, Mapping) and set(node) == {"packed", "scale"}
    return jax.tree_util.tree_map_with_path(rebuild, arrays, is_leaf=is_packed_node)


def save(directory: str, tree: Any, *, force: bool = False) -> None:
    """Writes a tree of arrays and `QuantizedArray`s to an orbax checkpoint at `directory`.

    The packed codes and scales are stored as arrays (uint8 and float), the static fields of each
    `QuantizedArray` as JSON next to them, so `restore` needs no template.

    Args:
      directory: a new directory (absolute path, or relative to the working directory).
      tree: e.g. the output of `export_params` (nested dicts, as Flax variables are).
      force: overwrite `directory` if it exists.
    """
    import orbax.checkpoint as ocp

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
    """Reads a tree written by `save`; the arrays come back bit for bit, with their dtypes."""
    import orbax.checkpoint as ocp

    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        restored = checkpointer.restore(
            _absolute(directory),
            ocp.args.Composite(arrays=ocp.args.StandardRestore(), layout=ocp.args.JsonRestore()),
        )
    return _from_nested_arrays(restored["arrays"], restored["layout"])


def _absolute(directory: str) -> str:
    return os.path.abspath(directory)
