"""The paper's PTB setting: one-layer LSTM (300/300), 1/2/3 bits, ProxQuant vs straight-through.

    python -m experiments.ptb.main --config=experiments/ptb/configs/full.py \
        --workdir=/tmp/qjax/ptb_full

SGD lr 20 divided by 1.2 on validation plateaus, 80 epochs, batch 20, BPTT 30, dropout 0.5,
gradient-norm clip 0.25. The paper tunes λ on the validation set and does not print it; the
value here is ours, untuned (λ_t = λ·epoch growing per epoch, prox strength η_t·λ_t at the
current learning rate): λ = 1e-7 gives a total pull Σ_t η·λ_t ≈ 9.8 over 80 epochs of 1,549
steps at η = 20 (less once η decays), about the reduced config's.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # True: reuse a workdir made by another config (its checkpoints as they are), see
    # experiments/common.py; --config.allow_config_change=True on the command line.
    config.allow_config_change = False
    config.dataset = "ptb"
    config.data_dir = ""  # empty: $QJAX_DATA_DIR, ../shared/data
    config.train_tokens = 0  # 0: the whole training split
    config.quant_train_tokens = 0  # quantized phases: the first tokens of it (0: all of it)
    config.valid_tokens = 0  # validation (learning-rate plateaus): the first tokens (0: all)
    config.seed = 0
    config.embed_dim = 300
    config.hidden_dim = 300
    config.dropout_rate = 0.5
    config.tied = False
    config.batch_size = 20
    config.eval_batch_size = 10
    config.bptt = 30
    config.learning_rate = 20.0
    config.lr_plateau_factor = 1.2
    config.grad_clip = 0.25
    config.warm_epochs = 80
    config.quant_epochs = 80
    config.bits = (1, 2, 3)
    config.methods = ("proxquant", "straight_through")
    config.reg_values = (1e-7,)  # λ candidates, chosen on the validation perplexity
    config.reg_growth = "epoch"  # λ_t = λ·epoch, constant within an epoch
    return config
