"""Reduced PTB run for a 2-core CPU (about 20 minutes): the paper's model on 150k training tokens.

    python -m experiments.ptb.main --config=experiments/ptb/configs/reduced.py \
        --workdir=/tmp/qjax/ptb_reduced

The paper's model and optimizer (LSTM 300/300, dropout 0.5, SGD lr 20, clip 0.25, batch 20,
BPTT 30), cut down: the first 150,000 training tokens (249 steps per epoch), evaluation with 20
streams instead of 10, float warm start 3 epochs, then each of 1/2/3 bits × {ProxQuant,
straight-through} for 1 epoch from the warm start. λ = 0.004 makes the final prox strength
η·λ_t = 0.08 per step (total pull Σ η·λ_t ≈ 10 over the epoch); it was not tuned.
"""

from experiments.ptb.configs import full


def get_config():
    config = full.get_config()
    config.train_tokens = 150_000
    config.eval_batch_size = 20
    config.warm_epochs = 3
    config.quant_epochs = 1
    config.reg = 0.004
    return config
