"""Medium PTB run, about 100 minutes on a 2-core CPU: the paper's model on the whole corpus.

    python -m experiments.ptb.main --config=experiments/ptb/configs/medium.py \
        --workdir=/tmp/qjax/ptb_medium

The paper's model and optimizer (LSTM 300/300, dropout 0.5, SGD lr 20 divided by 1.2 on
validation plateaus, clip 0.25, batch 20, BPTT 30) on all 929,589 training tokens (1,549 steps
per epoch): a float warm start of 9 epochs, aiming at a test perplexity ≤ 150 (the paper trains
80 epochs); then 1, 2 and 3 bits × {ProxQuant, straight-through}, 1 epoch each over the first
465,000 training tokens (774 steps; the multi-bit fit of the 10,000 × 300 embedding at every step
makes a quantized step 2–5 times a float one) from the warm start. The whole validation split
judges the plateaus and λ. λ_t grows per step (one quantized epoch: per-epoch growth would keep
λ_t = 0); λ = 1e-3 gives a total pull Σ_t η·λ_t ≈ 7.7 at η = 20 over the epoch (the paper's
CIFAR pull is 7.8; the paper does not print its PTB λ).

Estimated run time: 68 minutes on a quiet 2-core x86-64 CPU (docs/experiments.md: timed steps).
"""

from experiments.ptb.configs import full


def get_config():
    config = full.get_config()
    config.warm_epochs = 9
    config.quant_epochs = 1
    config.quant_train_tokens = 465_000
    config.reg_values = (1e-3,)
    config.reg_growth = "step"
    return config
