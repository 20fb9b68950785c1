"""Multilayer perceptrons for MNIST, as in Lybrand & Saab's experiments.

The paper's network is 784 → 500 → BN → 300 → BN → 10 with ReLU: each hidden layer is
Dense → ReLU → BatchNorm, and the output layer is a plain Dense. `scaled_mlp` gives the width
family used to show that wider networks lose less accuracy under GPFQ.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax

PAPER_HIDDEN = (500, 300)


class MLP(nn.Module):
    """Dense → ReLU → BatchNorm hidden layers, then a Dense classifier.

    Attributes:
      hidden: widths of the hidden layers.
      num_classes: outputs of the last layer.
      batch_norm: BatchNorm after each hidden activation (as in the paper).
    """

    hidden: Sequence[int] = PAPER_HIDDEN
    num_classes: int = 10
    batch_norm: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """Logits for a batch of images.

        Args:
          x: (batch, ...) inputs, flattened to (batch, N0).
          train: use batch statistics and update the running BatchNorm averages.

        Returns:
          (batch, num_classes) logits.
        """
        x = x.reshape((x.shape[0], -1))
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
            if self.batch_norm:
                x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        return nn.Dense(self.num_classes)(x)


def scaled_mlp(scale: float, *, num_classes: int = 10) -> MLP:
    """The paper's MLP with every hidden width multiplied by `scale` (the width family).

    Args:
      scale: width multiplier > 0 (1 gives 500 → 300).
      num_classes: outputs.

    Returns:
      `MLP(hidden=(round(500·scale), round(300·scale)))`.
    """
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    hidden = tuple(max(1, round(width * scale)) for width in PAPER_HIDDEN)
    return MLP(hidden=hidden, num_classes=num_classes)
