"""Reduced CIFAR-10 run for a 2-core CPU (about 25 minutes): ResNet-20 on a 5,000-image subset.

    python -m experiments.proxquant.main --config=experiments/proxquant/configs/reduced.py \
        --workdir=/tmp/qjax/proxquant_reduced

Same pipeline and optimizers as full.py, cut down: 5,000 training images (first of the train
split), 2,000 test images, warm start 8 epochs (lr ×0.1 at epochs 5 and 7), then each method at
the same budget of 4 quantized epochs + 1 frozen epoch. λ is rescaled so that the total prox pull
Σ_t η·λ_t (which grows as η·λ·steps_per_epoch·epochs²/2) equals the paper's: with 39 steps per
epoch and 4 epochs instead of 390 and 200 (binary) or 400 (ternary), λ = 1e-4·(390·200²)/(39·4²)
= 2.5 for binary and 1e-4·(390·400²)/(39·4²) = 10 for ternary.
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
    config.quant.reg_binary_values = (2.5,)
    config.quant.reg_ternary_values = (10.0,)
    return config
