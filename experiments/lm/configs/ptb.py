"""Word-level Penn Treebank: a 4-layer, 128-wide transformer (2.1 M parameters, 1.3 M of them
the tied 10,000-word embedding), 3 epochs: meant for a 30-minute budget on this 2-core machine
as it is shared (≈ 10 minutes free, 49 measured under heavy sharing; details below).

    python -m experiments.lm.main --config=experiments/lm/configs/ptb.py \
        --workdir=/tmp/qjax/lm_ptb
    python -m experiments.lm.quantize --config=experiments/lm/configs/ptb.py \
        --workdir=/tmp/qjax/lm_ptb

Budget, from 8–10 timed steps of 32 × 128 tokens: 1.6 CPU-seconds per step (so ≈ 0.8 s of
wall time with both cores free, ≈ 10 minutes for the 3 epochs of 226 steps); measured wall time
4.2–5.5 s per step while other jobs kept the load average at 8–15. The run above, at a load
average of 9–11, took 49 minutes (46.5 of training at ≈ 990 tokens/s, 30 s of validation per
epoch) and reached validation perplexity 277 → 207 → 186 after epochs 1–3, test perplexity 173.0:
still falling, so a free machine affords more epochs. Of the sizes timed (d_model 128–256, 2–4
layers), this one gives the most steps in the budget at 4 layers: the 10,000-way softmax costs as
much as the blocks, and a larger model would see PTB's 0.93 M training words about once.
"""

import ml_collections

# Parameters of the model below (tied head, max_len = seq_len = 128).
NUM_PARAMS = 2_089_728


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # True: reuse a workdir made by another config (its checkpoints as they are), see
    # experiments/common.py; --config.allow_config_change=True on the command line.
    config.allow_config_change = False
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
    config.epochs = 3
    config.learning_rate = 3e-3
    config.warmup_steps = 50
    config.weight_decay = 0.1
    config.grad_clip = 1.0
    # Post-training quantization (experiments.lm.quantize); the float model ignores these.
    config.ptq = ml_collections.ConfigDict(
        {
            "methods": ("gpfq", "gptq", "msq"),  # any of qjax.methods.names(), e.g. "qronos"
            "bits": (4, 3, 2),
            "group_size": 64,  # group-wise scales: 64 inputs (d_model is 128)
            "c_values": (None, 1.0),  # None: the MSE-best C per scale group; chosen on valid
            "rule": "max",
            "head_bits": 8,  # an untied head: 8-bit RTN (0: float); a tied head is the embedding
            "calibration_sequences": 128,
            "calibration_batch_size": 32,
        }
    )
    return config
