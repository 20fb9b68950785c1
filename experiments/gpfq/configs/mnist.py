"""Full MNIST (60,000 / 10,000), the paper's MLP 784 → 500 → BN → 300 → BN → 10.

Run from the repository root:
  python -m experiments.gpfq.main --config=experiments/gpfq/configs/mnist.py --workdir=/tmp/mn
Tiny variant (seconds, for the tests): --config=experiments/gpfq/configs/mnist.py:tiny
"""

import ml_collections

from experiments.gpfq.configs import default


def get_config(variant: str = "full") -> ml_collections.ConfigDict:
    config = default.get_config()
    config.data_source = "dir"
    config.epochs = 8
    config.c_values = (1.0, 2.0, 3.0, 4.0, 5.0)
    if variant == "tiny":
        config.data_source = "auto"
        tiny(config)
    elif variant != "full":
        raise ValueError(f"unknown variant {variant!r}; expected 'full' or 'tiny'")
    return config


def tiny(config: ml_collections.ConfigDict) -> None:
    """Shrinks a config to a seconds-long run (small data, small models, small grid)."""
    config.max_train_examples = 512
    config.max_test_examples = 256
    config.epochs = 1
    config.batch_size = 32
    config.width_scale = 0.1
    config.cnn_stages = (4, 8)
    config.cnn_dense = 16
    config.num_letters = (3, 16)
    config.c_values = (2.0, 4.0)
    config.calibration_size = 128
    config.calibration_batch_size = 64
    config.width_scales = (0.05, 0.1)
    config.validation_size = 64
