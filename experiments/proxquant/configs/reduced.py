"""Reduced CIFAR-10 run for a 2-core CPU (about 25 minutes): ResNet-20 on a 5,000-image subset.

    python -m experiments.proxquant.main --config=experiments/proxquant/configs/reduced.py \
        --workdir=/tmp/qjax/proxquant_reduced

Same pipeline and optimizers as full.py, cut down: the first 5,000 training images (500 of them
held out for validation: 35 steps per epoch), 2,000 test images, warm start 8 epochs (lr ×0.1 at
epochs 5 and 7), then each method at the same budget of 4 quantized epochs + 1 frozen epoch.
λ_t grows per epoch (as in the paper); λ is rescaled so that the total prox pull Σ_t η·λ_t equals
the paper's (7.76 binary, 31.1 ternary): λ = 3.7 binary, 14.8 ternary
(`full.rescaled_reg`).
"""

from experiments.proxquant.configs import full


def get_config():
    config = full.get_config()
    config.train_size = 5_000
    config.validation_size = 500
    config.test_size = 2_000
    config.sign_change_every_steps = 4
    config.bn_reestimation_batches = 20
    config.warm.epochs = 8
    config.warm.lr_decay_epochs = (5, 7)
    config.quant.epochs = 4
    config.quant.freeze_epochs = 1
    config.quant.reg_binary_values = (full.rescaled_reg(config, "binary"),)
    config.quant.reg_ternary_values = (full.rescaled_reg(config, "ternary"),)
    return config
