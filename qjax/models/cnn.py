"""The CIFAR-10 convolutional network of Lybrand & Saab's experiments.

Three stages of two 3×3 convolutions (32, 32 / 64, 64 / 128, 128 channels), each convolution
followed by ReLU and BatchNorm, each stage closed by 2×2 max-pooling and dropout; then
Dense 128 → ReLU → BatchNorm → dropout, and a Dense classifier.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax

PAPER_STAGES = (32, 64, 128)


class CNN(nn.Module):
    """VGG-style CNN: pairs of Conv → ReLU → BatchNorm, max-pool and dropout after each pair.

    Attributes:
      stages: channels of each stage's two convolutions.
      dense: width of the hidden dense layer.
      num_classes: outputs.
      dropout_rate: dropout after each stage and after the hidden dense layer (training only;
        needs a "dropout" PRNG stream).
    """

    stages: Sequence[int] = PAPER_STAGES
    dense: int = 128
    num_classes: int = 10
    dropout_rate: float = 0.2

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """Logits for a batch of images.

        Args:
          x: (batch, H, W, C) images.
          train: batch statistics, running-average updates and dropout.

        Returns:
          (batch, num_classes) logits.
        """
        for channels in self.stages:
            for _ in range(2):
                x = nn.relu(nn.Conv(channels, (3, 3), padding="SAME")(x))
                x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
            x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(nn.Dense(self.dense)(x))
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(self.num_classes)(x)
