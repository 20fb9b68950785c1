"""CIFAR ResNets (He et al. 2016, §4.2): ResNet-20/32/44/56, and the CIFAR-10 input pipeline.

A 3×3 convolution with 16 channels, three stages of n residual blocks each (16, 32, 64
channels; the second and third stage start with stride 2), global average pooling and a dense
classifier; depth = 6n + 2. Where a block changes shape, its shortcut is a 1×1 convolution with
BatchNorm (ProxQuant keeps it in float). Submodule names are what masks match on: `conv_init`
(first layer), `stage{s}_block{b}` with `conv1`, `conv2`, `shortcut_conv`, and `head` (last).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFARResNet",
    "ResNet20",
    "ResNet32",
    "ResNet44",
    "ResNet56",
    "augment",
    "normalize",
]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
STAGE_FEATURES = (16, 32, 64)


class ResidualBlock(nn.Module):
    """Two 3×3 conv–BN layers and a shortcut (identity, or 1×1 conv–BN when the shape changes)."""

    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
        conv = functools.partial(nn.Conv, self.features, use_bias=False)
        y = conv((3, 3), self.strides, padding=((1, 1), (1, 1)), name="conv1")(x)
        y = nn.relu(norm(name="bn1")(y))
        y = conv((3, 3), padding=((1, 1), (1, 1)), name="conv2")(y)
        y = norm(name="bn2")(y)
        if x.shape[-1] != self.features or self.strides != 1:
            x = conv((1, 1), self.strides, name="shortcut_conv")(x)
            x = norm(name="shortcut_bn")(x)
        return nn.relu(x + y)


class CIFARResNet(nn.Module):
    """The 3-stage CIFAR ResNet of depth 6n + 2.

    Attributes:
      depth: 20, 32, 44, 56, ... (any 6n + 2).
      num_classes: outputs of the final dense layer.
    """

    depth: int = 20
    num_classes: int = 10

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool) -> jax.Array:
        """Logits (batch, num_classes) of normalized images (batch, 32, 32, 3)."""
        if self.depth < 8 or (self.depth - 2) % 6:
            raise ValueError(f"depth must be 6n + 2 with n >= 1, got {self.depth}")
        if images.ndim != 4:
            raise ValueError(f"images must have shape (batch, H, W, C), got {images.shape}")
        blocks_per_stage = (self.depth - 2) // 6
        x = nn.Conv(16, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, name="conv_init")(images)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn_init")(x)
        x = nn.relu(x)
        for stage, features in enumerate(STAGE_FEATURES):
            for block in range(blocks_per_stage):
                strides = 2 if stage > 0 and block == 0 else 1
                x = ResidualBlock(features, strides, name=f"stage{stage + 1}_block{block + 1}")(
                    x, train=train
                )
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="head")(x)


ResNet20 = functools.partial(CIFARResNet, depth=20)
ResNet32 = functools.partial(CIFARResNet, depth=32)
ResNet44 = functools.partial(CIFARResNet, depth=44)
ResNet56 = functools.partial(CIFARResNet, depth=56)


def normalize(images: ArrayLike) -> jax.Array:
    """uint8 images (..., 32, 32, 3) → float32, per-channel standardized with CIFAR-10's stats."""
    images = jnp.asarray(images)
    if images.shape[-1] != 3:
        raise ValueError(f"images must have 3 channels last, got shape {images.shape}")
    scaled = images.astype(jnp.float32) / 255.0
    return (scaled - jnp.asarray(CIFAR10_MEAN)) / jnp.asarray(CIFAR10_STD)


def augment(key: jax.Array, images: ArrayLike, *, padding: int = 4) -> jax.Array:
    """Standard CIFAR augmentation: random crop after zero-padding by 4, random horizontal flip.

    Args:
      key: a PRNG key.
      images: a batch (batch, H, W, C), any dtype (zero padding is applied before normalizing).
      padding: pixels of padding on each side before cropping back to H × W.

    Returns:
      The augmented batch, same shape and dtype.
    """
    images = jnp.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must have shape (batch, H, W, C), got {images.shape}")
    batch, height, width, _ = images.shape
    crop_key, flip_key = jax.random.split(key)
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    offsets = jax.random.randint(crop_key, (batch, 2), 0, 2 * padding + 1)

    def crop(image, offset):
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (height, width, 3))

    cropped = jax.vmap(crop)(padded, offsets)
    flip = jax.random.bernoulli(flip_key, 0.5, (batch, 1, 1, 1))
    return jnp.where(flip, cropped[:, :, ::-1], cropped)
