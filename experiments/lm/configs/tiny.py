"""Tiny run for tests and notebooks (well under a minute on 2 CPU cores): the PTB config's
training at a 2-layer, 64-wide character model on the English corpus shipped with qjax, so no
data folder is needed.

    python -m experiments.lm.main --config=experiments/lm/configs/tiny.py \
        --workdir=/tmp/qjax/lm_tiny
    python -m experiments.lm.quantize --config=experiments/lm/configs/tiny.py \
        --workdir=/tmp/qjax/lm_tiny
"""

import ml_collections

from experiments.lm.configs import ptb


def get_config() -> ml_collections.ConfigDict:
    config = ptb.get_config()
    config.dataset = "chars"  # config.text_file empty: the corpus shipped with qjax
    config.model.update(num_layers=2, d_model=64, mlp_dim=256, dropout_rate=0.0)
    config.seq_len = 64
    config.epochs = 2
    config.warmup_steps = 10
    # One bit width, one C (the MSE-best per scale group), groups of 32 (d_model is 64).
    config.ptq.update(bits=(3,), group_size=32, c_values=(None,), calibration_sequences=32)
    return config
