"""Medium CIFAR-10 run, about 100 minutes on a 2-core CPU: ResNet-20 on all the training images.

    python -m experiments.proxquant.main --config=experiments/proxquant/configs/medium.py \
        --workdir=/tmp/qjax/proxquant_medium

45,000 training images (5,000 of the 50,000 held out for validation: per-epoch accuracies and
the choice of λ), all 10,000 test images, random crop (pad 4) and flip as in the paper. Float
warm start: 10 epochs of SGD (Nesterov momentum 0.9, weight decay 5e-4) with a one-cycle
learning rate peaking at 0.2, aiming at ≥ 85 % (the paper's 200-epoch warm start: 91.94 %).
Then BinaryConnect, ProxQuant-binary and ProxQuant-ternary at equal budget, each 2 quantized
epochs (Adam 0.01; BinaryConnect ×0.1 at 40.5 % and 61 % of them) + 1 frozen epoch. λ_t grows per
step here (with two quantized epochs, the paper's per-epoch growth would leave the first epoch
without any pull); λ is rescaled to the paper's total pull Σ_t η·λ_t (`full.rescaled_reg`):
1.11 binary, 4.44 ternary.

Estimated run time: 100 minutes on a quiet 2-core x86-64 CPU (docs/experiments.md: timed steps).
"""

from experiments.proxquant.configs import full


def get_config():
    config = full.get_config()
    config.train_size = 50_000
    config.test_size = 10_000
    config.sign_change_every_steps = 35
    config.bn_reestimation_batches = 100
    config.warm.epochs = 10
    config.warm.schedule = "onecycle"
    config.warm.learning_rate = 0.2
    config.warm.nesterov = True
    config.warm.weight_decay = 5e-4
    config.methods = ("binaryconnect", "proxquant_binary", "proxquant_ternary")
    config.quant.epochs = 2
    config.quant.freeze_epochs = 1
    config.quant.reg_growth = "step"
    config.quant.reg_binary_values = (full.rescaled_reg(config, "binary"),)
    config.quant.reg_ternary_values = (full.rescaled_reg(config, "ternary"),)
    return config
