"""Tiny run for the tests (seconds): ResNet-8 on synthetic 32×32 images, every method.

    python -m experiments.proxquant.main --config=experiments/proxquant/configs/tiny.py \
        --workdir=/tmp/qjax/proxquant_tiny
"""

from experiments.proxquant.configs import full


def get_config():
    config = full.get_config()
    config.dataset = "synthetic"
    config.depth = 8
    config.train_size = 256
    config.validation_size = 64
    config.test_size = 128
    config.batch_size = 32
    config.eval_batch_size = 32
    config.sign_change_every_steps = 1
    config.bn_reestimation_batches = 2
    config.warm.epochs = 6
    config.warm.lr_decay_epochs = (5,)
    config.quant.epochs = 2
    config.quant.freeze_epochs = 1
    config.quant.reg_binary_values = (100.0,)
    config.quant.reg_ternary_values = (100.0,)
    return config
