"""Batching helpers: image batches, normalization, CIFAR augmentation, language-model windows."""

from __future__ import annotations

from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from qjax.data.images import ImageDataset

# Per-channel statistics of the training splits (pixel values scaled to [0, 1]).
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def normalize(
    images: ArrayLike, mean: tuple[float, ...] = (0.0,), std: tuple[float, ...] = (1.0,)
) -> ArrayLike:
    """uint8 images → float32 (x / 255 − mean) / std, per channel.

    Works on NumPy arrays (returns NumPy) and on JAX arrays, also under `jit` (returns JAX).

    Args:
      images: (..., H, W, C) uint8.
      mean, std: per-channel statistics of x / 255 (length C or 1).

    Returns:
      float32 array of the same shape.
    """
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {images.dtype}")
    if len(mean) not in (1, images.shape[-1]) or len(std) not in (1, images.shape[-1]):
        raise ValueError(
            f"mean and std must have 1 or {images.shape[-1]} (channels) entries, "
            f"got {len(mean)} and {len(std)}"
        )
    scaled = images.astype(np.float32) / 255.0
    return (scaled - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def image_batches(
    dataset: ImageDataset,
    batch_size: int,
    *,
    key: jax.Array | None = None,
    drop_remainder: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One pass over a dataset in batches of (uint8 images, int32 labels).

    Args:
      dataset: the `ImageDataset`.
      batch_size: images per batch.
      key: a PRNG key to shuffle with; None keeps the stored order.
      drop_remainder: drop the last, smaller batch.

    Yields:
      (images (b, H, W, C) uint8, labels (b,) int32).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n = len(dataset.labels)
    order = np.arange(n) if key is None else np.asarray(jax.random.permutation(key, n))
    stop = n - n % batch_size if drop_remainder else n
    for start in range(0, stop, batch_size):
        index = order[start : start + batch_size]
        yield dataset.images[index], dataset.labels[index]


def batchify(ids: np.ndarray, batch_size: int) -> np.ndarray:
    """Cuts a token stream into `batch_size` parallel streams (the tail that does not fit is cut).

    Args:
      ids: (n,) token ids.
      batch_size: number of streams.

    Returns:
      (batch_size, n // batch_size) ids; row b is the b-th contiguous piece of the stream.
    """
    if ids.ndim != 1:
        raise ValueError(f"ids must be 1-D, got shape {ids.shape}")
    if not 1 <= batch_size <= len(ids):
        raise ValueError(f"batch_size must be in [1, {len(ids)}], got {batch_size}")
    length = len(ids) // batch_size
    return ids[: batch_size * length].reshape(batch_size, length)


def bptt_windows(
    streams: np.ndarray, seq_len: int, *, drop_remainder: bool = False
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Consecutive truncated-backprop windows over batchified streams.

    Args:
      streams: (batch, T) ids from `batchify`.
      seq_len: window length (BPTT).
      drop_remainder: drop the last window when it is shorter than `seq_len` (every window then
        has one shape, so a jitted step compiles once).

    Yields:
      (inputs (batch, ℓ), targets (batch, ℓ)), targets being the inputs shifted by one token.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    for start in range(0, streams.shape[1] - 1, seq_len):
        stop = min(start + seq_len, streams.shape[1] - 1)
        if drop_remainder and stop - start < seq_len:
            return
        yield streams[:, start:stop], streams[:, start + 1 : stop + 1]


def flip_and_crop(images: ArrayLike, key: jax.Array, *, padding: int = 4) -> jax.Array:
    """The standard CIFAR augmentation: random horizontal flip, then a random crop after padding.

    Jittable (`padding` is a Python int); each image gets its own flip and crop offsets.

    Args:
      images: (batch, H, W, C) images (any dtype; padding is zeros, so apply before normalizing).
      key: PRNG key.
      padding: pixels of zero padding on each side before cropping back to H × W.

    Returns:
      Augmented images, same shape and dtype.
    """
    images = jnp.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must have shape (batch, H, W, C), got {images.shape}")
    if padding < 0:
        raise ValueError(f"padding must be non-negative, got {padding}")
    flip_key, crop_key = jax.random.split(key)
    batch, height, width, channels = images.shape
    flip = jax.random.bernoulli(flip_key, 0.5, (batch, 1, 1, 1))
    images = jnp.where(flip, images[:, :, ::-1], images)
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    offsets = jax.random.randint(crop_key, (batch, 2), 0, 2 * padding + 1)

    def crop(image, offset):
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, channels))

    return jax.vmap(crop)(padded, offsets)
