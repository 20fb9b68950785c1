"""CIFAR ResNets (He et al. 2016, §4.2): ResNet-20/32/44/56.

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

__all__ = [
    "CIFARResNet",
    "ResNet20",
    "ResNet32",
    "ResNet44",
    "ResNet56",
]

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
