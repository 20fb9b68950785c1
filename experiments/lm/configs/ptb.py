"""Word-level Penn Treebank: a 4-layer, 128-wide transformer (2.1 M parameters, 1.3 M of them
the tied 10,000-word embedding), sized to train in about 30 minutes on 2 CPU cores.

    python -m experiments.lm.main --config=experiments/lm/configs/ptb.py \
        --workdir=/tmp/qjax/lm_ptb

Budget: measured at ≈ 0.7 s per step of 32 × 128 tokens on this machine's 2 cores (≈ 6,000
tokens/s, while other jobs ran), 226 steps per epoch, so 10 epochs ≈ 27 minutes of training
plus ≈ 10 s of validation per epoch. Of the sizes timed, the smaller model with more epochs is
the better use of a fixed CPU budget: the 10,000-way softmax costs as much as the blocks, and
PTB's 0.93 M training words allow several passes with dropout 0.1.
"""

import ml_collections

# Parameters of the model below (tied head, max_len = seq_len = 128).
NUM_PARAMS = 2_089_728


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.dataset = "ptb"
    config.text_file = ""  # chars only
    config.data_dir = ""  # empty: $QJAX_DATA_DIR, ../shared/data
    config.seed = 0
    config.model = ml_collections.ConfigDict(
        {
            "num_layers": 4,
            "num_heads": 4,
            "d_model": 128,
            "mlp_dim": 512,
            "dropout_rate": 0.1,
            "tied_head": True,
            "scan_layers": False,
        }
    )
    config.seq_len = 128
    config.batch_size = 32
    config.eval_batch_size = 64
    config.epochs = 10
    config.learning_rate = 3e-3
    config.warmup_steps = 200
    config.weight_decay = 0.1
    config.grad_clip = 1.0
    return config
