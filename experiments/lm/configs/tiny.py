"""Tiny run for tests and notebooks (well under a minute on 2 CPU cores): a 2-layer, 64-wide
character model on the English corpus shipped with qjax, so no data folder is needed.

    python -m experiments.lm.main --config=experiments/lm/configs/tiny.py \
        --workdir=/tmp/qjax/lm_tiny
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.dataset = "chars"
    config.text_file = ""  # empty: the corpus shipped with qjax
    config.data_dir = ""  # PTB only
    config.seed = 0
    config.model = ml_collections.ConfigDict(
        {
            "num_layers": 2,
            "num_heads": 4,
            "d_model": 64,
            "mlp_dim": 256,
            "dropout_rate": 0.0,
            "tied_head": True,
            "scan_layers": False,
        }
    )
    config.seq_len = 64
    config.batch_size = 32
    config.eval_batch_size = 64
    config.epochs = 2
    config.learning_rate = 3e-3
    config.warmup_steps = 10
    config.weight_decay = 0.1
    config.grad_clip = 1.0
    return config
