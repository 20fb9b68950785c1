"""Defaults shared by the GPFQ experiment configs (MNIST MLP, full data).

Not run directly: see mnist.py, mnist_embedded.py and cifar10.py.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # True: reuse a workdir made by another config (its checkpoints as they are), see
    # experiments/common.py; --config.allow_config_change=True on the command line.
    config.allow_config_change = False
    # Data: qjax.data loaders. data_dir "" searches $QJAX_DATA_DIR, ../shared/data, TFDS.
    config.dataset = "mnist"
    config.data_dir = ""
    config.data_source = "auto"
    config.max_train_examples = 0  # 0: all
    config.max_test_examples = 0
    # Held out of the training images (drawn with config.seed): every choice (C) is made on it;
    # the test split is only reported.
    config.validation_size = 5000
    # Training images moved to the test split (drawn once, the same for every seed), for small
    # datasets whose test split is too small to rank methods. 0: none.
    config.test_from_train = 0
    # Model.
    config.model = "mlp"
    config.width_scale = 1.0  # MLP 784 → 500 → BN → 300 → BN → 10
    config.cnn_stages = (32, 64, 128)
    config.cnn_dense = 128
    # Float training: AdamW, learning rate by `schedule`: "cosine" (decay from learning_rate) or
    # "onecycle" (warm-up to learning_rate, then down).
    config.seed = 0
    # Several seeds: each draws the float training, the validation hold-out and the calibration
    # sample (config.seed and calibration_seed are then ignored); results report the mean ± std
    # over the seeds. (): config.seed alone.
    config.seeds = ()
    config.epochs = 10
    config.batch_size = 128
    config.schedule = "cosine"
    config.learning_rate = 1e-3
    config.weight_decay = 1e-4
    config.augment = False  # random flip and 4-pixel crop (CIFAR)
    config.eval_batch_size = 1000
    # Quantization: every Dense/Conv layer, alphabets C·median|W|·linspace(-1, 1, n) as in the
    # GPFQ reference code (n = 3 is ternary, n = 2^b is "b bits").
    config.methods = ("gpfq", "msq", "gptq", "qronos")
    config.num_letters = (3, 4, 8, 16)
    config.c_values = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0)
    config.rule = "median"
    config.per_channel = False
    config.calibration_size = 2048
    config.calibration_batch_size = 512
    config.calibration_seed = 0
    # Width decay: MLP width multipliers, quantized at `width_num_letters` letters with GPFQ and
    # MSQ (best C each). Empty: skip.
    config.width_scales = (0.25, 0.5, 1.0, 2.0)
    config.width_num_letters = 3
    return config
