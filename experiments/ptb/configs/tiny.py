"""Tiny PTB-pipeline run for the tests (seconds): a small LSTM on a synthetic token stream.

    python -m experiments.ptb.main --config=experiments/ptb/configs/tiny.py \
        --workdir=/tmp/qjax/ptb_tiny
"""

from experiments.ptb.configs import full


def get_config():
    config = full.get_config()
    config.dataset = "synthetic"
    config.train_tokens = 4000
    config.embed_dim = 16
    config.hidden_dim = 16
    config.batch_size = 10
    config.eval_batch_size = 10
    config.bptt = 10
    config.learning_rate = 20.0
    config.warm_epochs = 3
    config.quant_epochs = 1
    config.bits = (1, 2)
    config.reg_values = (1.0,)
    config.reg_growth = "step"  # one quantized epoch
    return config
