"""Convolution kernels as matrices: image patches in the kernel's own flatten order.

A Flax `nn.Conv` with kernel of shape (*window, cin/groups, cout) computes, at each output
position, for each feature group g, the product of the patch under the window (restricted to the
group's input channels) with the group's kernel matrix of shape (N0g, N1g), where
N0g = prod(window)·cin/groups and N1g = cout/groups. GPFQ therefore quantizes a conv layer as
`groups` dense layers whose calibration rows are patches.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

__all__ = ["ConvGeometry", "conv_patches", "kernel_to_matrix", "matrix_to_kernel"]

Padding = str | int | Sequence[int] | Sequence[tuple[int, int]]


def _as_tuple(value, ndim: int, name: str) -> tuple[int, ...]:
    if value is None:
        return (1,) * ndim
    if isinstance(value, int):
        return (value,) * ndim
    value = tuple(value)
    if len(value) != ndim or not all(isinstance(v, int) and v >= 1 for v in value):
        raise ValueError(f"{name} must be a positive int or {ndim} positive ints, got {value}")
    return value


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
    """The hyper-parameters of an `nn.Conv` that decide which inputs each output sees.

    Attributes:
      kernel_size: the window (kh, kw) (any number of spatial dimensions).
      strides: window strides, one per spatial dimension.
      padding: "SAME", "VALID", "CIRCULAR", an int, or one (low, high) pair per spatial dimension
        (Flax's conventions).
      input_dilation: dilation of the input (transposed-convolution style).
      kernel_dilation: dilation of the window (atrous convolution).
      feature_group_count: the number of feature groups (cin and cout are split into as many).
    """

    kernel_size: tuple[int, ...]
    strides: tuple[int, ...] = ()
    padding: Padding = "SAME"
    input_dilation: tuple[int, ...] = ()
    kernel_dilation: tuple[int, ...] = ()
    feature_group_count: int = 1

    def __post_init__(self):
        ks = self.kernel_size
        ks = (ks,) if isinstance(ks, int) else tuple(ks)
        if not ks or not all(isinstance(k, int) and k >= 1 for k in ks):
            raise ValueError(f"kernel_size must be positive ints, got {self.kernel_size}")
        ndim = len(ks)
        set_ = lambda name, value: object.__setattr__(self, name, value)
        set_("kernel_size", ks)
        for name in ("strides", "input_dilation", "kernel_dilation"):
            value = getattr(self, name)
            set_(name, _as_tuple(value if value != () else None, ndim, name))
        if not isinstance(self.feature_group_count, int) or self.feature_group_count < 1:
            raise ValueError(f"feature_group_count must be >= 1, got {self.feature_group_count}")
        set_("padding", self._normalized_padding(self.padding, ndim))

    @staticmethod
    def _normalized_padding(padding: Padding, ndim: int):
        if isinstance(padding, str):
            if padding.upper() not in ("SAME", "VALID", "CIRCULAR"):
                raise ValueError(
                    f"padding {padding!r} is not supported; "
                    "use SAME, VALID, CIRCULAR or explicit (low, high) pads"
                )
            return padding.upper()
        if isinstance(padding, int):
            return ((padding, padding),) * ndim
        pads = tuple(padding)
        if len(pads) == ndim and all(isinstance(p, int) for p in pads):
            return tuple((p, p) for p in pads)
        if len(pads) == ndim and all(len(p) == 2 for p in pads):
            return tuple((int(lo), int(hi)) for lo, hi in pads)
        raise ValueError(f"padding must be a string, an int or {ndim} (low, high) pairs: {padding}")

    @classmethod
    def from_module(cls, conv) -> ConvGeometry:
        """The geometry of a Flax `nn.Conv` module instance."""
        for attr in ("kernel_size", "padding", "feature_group_count"):
            if not hasattr(conv, attr):
                raise ValueError(f"{type(conv).__name__} is not an nn.Conv-like module (no {attr})")
        return cls(
            kernel_size=tuple(conv.kernel_size),
            strides=conv.strides if conv.strides is not None else (),
            padding=conv.padding,
            input_dilation=conv.input_dilation if conv.input_dilation is not None else (),
            kernel_dilation=conv.kernel_dilation if conv.kernel_dilation is not None else (),
            feature_group_count=conv.feature_group_count,
        )

    @property
    def window_size(self) -> int:
        return math.prod(self.kernel_size)


@functools.partial(jax.jit, static_argnames=("geometry",))
def conv_patches(images: ArrayLike, geometry: ConvGeometry) -> jax.Array:
    """The patch matrices of a batch of images, one per feature group.

    Args:
      images: inputs of the conv layer, shape (batch, *spatial, cin).
      geometry: the layer's `ConvGeometry`.

    Returns:
      Patches of shape (groups, m, N0g), m = batch·(number of output positions),
      N0g = prod(kernel_size)·cin/groups, each row ordered like the group's kernel flattened with
      `kernel_to_matrix`, so that patches @ kernel_to_matrix(kernel) equals the conv output.
    """
    images = jnp.asarray(images)
    ndim = len(geometry.kernel_size)
    if images.ndim != ndim + 2:
        raise ValueError(
            f"images must have shape (batch, *spatial, cin) with {ndim} spatial dimensions for a "
            f"{geometry.kernel_size} kernel, got shape {images.shape}"
        )
    cin = images.shape[-1]
    groups = geometry.feature_group_count
    if cin % groups:
        raise ValueError(f"{cin} input channels do not split into {groups} feature groups")
    padding = geometry.padding
    if padding == "CIRCULAR":
        # As flax.linen.Conv: wrap-pad so that the output has the input's size, then VALID.
        pads = [
            (((k - 1) * d) // 2, ((k - 1) * d + 1) // 2)
            for k, d in zip(geometry.kernel_size, geometry.kernel_dilation, strict=True)
        ]
        images = jnp.pad(images, [(0, 0), *pads, (0, 0)], mode="wrap")
        padding = "VALID"
    dilated_window = [
        (k - 1) * d + 1 for k, d in zip(geometry.kernel_size, geometry.kernel_dilation, strict=True)
    ]
    if isinstance(padding, str):
        # As lax.conv_general_dilated: string pads are computed on the undilated input.
        padding = jax.lax.padtype_to_pads(
            images.shape[1:-1], dilated_window, geometry.strides, padding
        )
    # Zero padding and input dilation in one op (interior padding inserts the dilation's zeros).
    images = jax.lax.pad(
        images,
        jnp.zeros((), images.dtype),
        [
            (0, 0, 0),
            *(
                (lo, hi, d - 1)
                for (lo, hi), d in zip(padding, geometry.input_dilation, strict=True)
            ),
            (0, 0, 0),
        ],
    )
    out_shape = [
        (n - k) // s + 1
        for n, k, s in zip(images.shape[1:-1], dilated_window, geometry.strides, strict=True)
    ]
    if min(out_shape) < 1:
        raise ValueError(f"the window {geometry.kernel_size} does not fit in images {images.shape}")
    # One strided slice per window offset: memory copies only, in the kernel's (*window, cin)
    # order. (lax.conv_general_dilated_patches would do a convolution with a one-hot kernel,
    # which costs as many flops as the Gram products themselves.)
    slices = [
        jax.lax.slice(
            images,
            (0, *(o * d for o, d in zip(offset, geometry.kernel_dilation, strict=True)), 0),
            (
                images.shape[0],
                *(
                    o * d + (n - 1) * s + 1
                    for o, d, n, s in zip(
                        offset, geometry.kernel_dilation, out_shape, geometry.strides, strict=True
                    )
                ),
                cin,
            ),
            (1, *geometry.strides, 1),
        )
        for offset in np.ndindex(*geometry.kernel_size)
    ]
    patches = jnp.stack(slices, axis=-2)  # (batch, *out, window, cin)
    cin_g = cin // groups
    patches = patches.reshape(-1, geometry.window_size, groups, cin_g)
    return jnp.transpose(patches, (2, 0, 1, 3)).reshape(groups, -1, geometry.window_size * cin_g)


def kernel_to_matrix(kernel: ArrayLike, geometry: ConvGeometry) -> jax.Array:
    """A conv kernel (*window, cin/groups, cout) as `groups` matrices (groups, N0g, N1g)."""
    kernel = jnp.asarray(kernel)
    _check_kernel(kernel, geometry)
    groups = geometry.feature_group_count
    cout = kernel.shape[-1]
    matrix = kernel.reshape(-1, groups, cout // groups)
    return jnp.transpose(matrix, (1, 0, 2))


def matrix_to_kernel(matrices: ArrayLike, geometry: ConvGeometry) -> jax.Array:
    """The inverse of `kernel_to_matrix`: (groups, N0g, N1g) back to (*window, cin/groups, cout)."""
    matrices = jnp.asarray(matrices)
    groups, n0g, n1g = matrices.shape
    if groups != geometry.feature_group_count or n0g % geometry.window_size:
        raise ValueError(f"matrices of shape {matrices.shape} do not fit {geometry}")
    kernel = jnp.transpose(matrices, (1, 0, 2))
    return kernel.reshape(*geometry.kernel_size, n0g // geometry.window_size, groups * n1g)


def _check_kernel(kernel: jax.Array, geometry: ConvGeometry) -> None:
    ndim = len(geometry.kernel_size)
    if kernel.ndim != ndim + 2 or tuple(kernel.shape[:ndim]) != geometry.kernel_size:
        raise ValueError(
            f"kernel must have shape (*{geometry.kernel_size}, cin/groups, cout), "
            f"got {kernel.shape}"
        )
    if kernel.shape[-1] % geometry.feature_group_count:
        raise ValueError(
            f"{kernel.shape[-1]} output channels do not split into "
            f"{geometry.feature_group_count} feature groups"
        )
