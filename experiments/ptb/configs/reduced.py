"""Reduced PTB run for a 2-core CPU (about 25 minutes): the paper's model on a PTB subset.

    python -m experiments.ptb.main --config=experiments/ptb/configs/reduced.py \
        --workdir=/tmp/qjax/ptb_reduced

The paper's model and optimizer (LSTM 300/300, dropout 0.5, SGD lr 20, clip 0.25, batch 20,
BPTT 30), cut down: float warm start 2 epochs on the first 150,000 training tokens (249 steps
per epoch); then each of 1/2/3 bits × {ProxQuant, straight-through} for 1 epoch over the first
60,000 tokens (99 steps) from the warm start. Learning-rate plateaus are judged on the first
20,000 validation tokens (which also judge λ); test perplexity on the whole test split, with 20
parallel streams instead of 10. λ_t grows per step (with one quantized epoch, growth per epoch
would keep λ_t = 0): λ = 0.01 makes the final prox strength η·λ_t = 0.2 per step (total pull
Σ η·λ_t ≈ 10 over the epoch); it was not tuned.
"""

from experiments.ptb.configs import full


def get_config():
    config = full.get_config()
    config.train_tokens = 150_000
    config.quant_train_tokens = 60_000
    config.valid_tokens = 20_000
    config.eval_batch_size = 20
    config.warm_epochs = 2
    config.quant_epochs = 1
    config.reg_values = (0.01,)
    config.reg_growth = "step"  # one quantized epoch: per-epoch growth would give λ_t = 0
    return config
