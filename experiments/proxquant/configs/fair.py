"""ProxQuant against BinaryConnect at a budget where the paper's schedule shape holds.

    for seed in 0 1 2; do
      python -m experiments.proxquant.main --config=experiments/proxquant/configs/fair.py \
          --config.seed=$seed --workdir=/tmp/qjax/proxquant_fair_$seed
    done

The medium config squeezes the paper's total pull Σ_t η·λ_t into 2 quantized epochs, so its
prox strength passes Adam's step within the first epoch and freezes the signs of Adam's first
noisy steps. Here the network is shallower (ResNet-8, depth 6n + 2 with n = 1) so that more
quantized epochs fit the same CPU time, λ_t grows per epoch as in the authors' code, and λ is
chosen on the validation split from a grid of the paper's per-step scale and smaller and
larger ones: at the last quantized epoch the paper's prox strength is η·λ_t = 0.01·(1e-4·200) =
2e-4 (`PAPER_FINAL_STRENGTH`); the grid holds λ with final strength 0.1, 0.3, 1, 3 and 10 times
that, and the total-pull rule's λ of the medium config. Each seed (float training, validation
hold-out, batch order) is one run; report mean ± std over the three.

Not run yet: about 10 + 3 × (8 + 2) ResNet-8 epochs per seed on 45,000 images (time the steps
with `python -m experiments.time_steps --experiment=proxquant --config=...` first).
Tiny variant (the tests): --config=experiments/proxquant/configs/fair.py:tiny
"""

import ml_collections

from experiments.proxquant.configs import full, tiny

# The paper's prox strength at its last quantized epoch: η = 0.01, λ_t = 1e-4 · 200.
PAPER_FINAL_STRENGTH = 0.01 * 1e-4 * 200
# Multiples of the paper's final strength that the λ grid reaches at the last quantized epoch.
STRENGTH_MULTIPLES = (0.1, 0.3, 1.0, 3.0, 10.0)


def reg_grid(config: ml_collections.ConfigDict, kind: str) -> tuple[float, ...]:
    """λ values whose final strength η·λ·(E − 1) (growth per epoch, E quantized epochs) is each
    of `STRENGTH_MULTIPLES` times the paper's, plus the total-pull rule's λ."""
    final_epoch = config.quant.epochs - 1
    per_unit = config.quant.learning_rate * final_epoch
    grid = [float(f"{m * PAPER_FINAL_STRENGTH / per_unit:.3g}") for m in STRENGTH_MULTIPLES]
    return (*grid, full.rescaled_reg(config, kind))


def get_config(variant: str = "full") -> ml_collections.ConfigDict:
    if variant == "tiny":
        config = tiny.get_config()
        config.quant.epochs = 3
    elif variant == "full":
        config = full.get_config()
        config.depth = 8
        config.sign_change_every_steps = 35
        config.warm.epochs = 10
        config.warm.schedule = "onecycle"
        config.warm.learning_rate = 0.2
        config.warm.nesterov = True
        config.warm.weight_decay = 5e-4
        config.quant.epochs = 8
        config.quant.freeze_epochs = 2
    else:
        raise ValueError(f"unknown variant {variant!r}; expected 'full' or 'tiny'")
    config.methods = ("binaryconnect", "proxquant_binary", "proxquant_ternary")
    config.quant.reg_growth = "epoch"
    config.quant.reg_binary_values = reg_grid(config, "binary")
    config.quant.reg_ternary_values = reg_grid(config, "ternary")
    return config
