"""Word-level Penn Treebank: a 4-layer Llama-family decoder of width 256 (grouped-query attention
with 8 query and 4 key/value heads, SwiGLU 768, RMSNorm, RoPE, head tied to the 10,000-word
embedding), then GPFQ, Qronos, GPTQ and round to nearest at W4/W3/W2, group 128 and per channel.

    python -m experiments.llm.main --config=experiments/llm/configs/ptb.py \
        --workdir=/tmp/qjax/llm_ptb

Budget: training ≤ 15 minutes of wall time on this 2-core machine while it is shared (load
average ≈ 10); see STEPS for the timing it was sized from. The quantization grid and the
perplexities come after it.
"""

import ml_collections

# Sized from timed steps: 6.8 s per step of 32 × 128 tokens at a load average of ≈ 5, so
# batches of 16 × 128 at ≈ 3.5 s: 160 steps ≈ 10 minutes, 15 at a load average of ≈ 10. That is
# 0.33 M tokens, about a third of PTB's training words: a short run, not a converged model.
# Measured: 585 s of training (9.7 minutes) at a load average of ≈ 7, test perplexity 432.6.
STEPS = 160


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # True: reuse a workdir made by another config (its checkpoints as they are), see
    # experiments/common.py; --config.allow_config_change=True on the command line.
    config.allow_config_change = False
    config.dataset = "ptb"
    config.text_file = ""  # the shipped character corpus when dataset is "chars"
    config.data_dir = ""  # empty: $QJAX_DATA_DIR, ../shared/data
    config.seed = 0
    config.model = ml_collections.ConfigDict(
        {
            "hidden_size": 256,
            "intermediate_size": 768,
            "num_hidden_layers": 4,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
            "tie_word_embeddings": True,
        }
    )
    config.seq_len = 128
    config.batch_size = 16
    config.eval_batch_size = 64
    config.epochs = 1
    config.steps_per_epoch = STEPS  # 0: full passes over the training split
    config.learning_rate = 3e-3
    config.warmup_steps = 16
    config.weight_decay = 0.1
    config.grad_clip = 1.0
    # Post-training quantization of the saved checkpoint (the float model ignores these).
    config.ptq = ml_collections.ConfigDict(
        {
            "methods": ("gpfq", "qronos", "gptq", "msq"),  # msq: round to nearest
            "bits": (4, 3, 2),
            "group_sizes": (128, 0),  # 0: one scale per output channel
            "grid": "signed",  # {-2^(b-1)..2^(b-1)-1}·s, what transformers loads
            "c": None,  # None: the MSE-best C per scale group; 1.0: absmax
            # Qronos's α (λ = α·||X~ᵀX~||₂; None: its default 1e-6), chosen on the validation
            # split from 1e-6, 1e-5, 1e-4 and 1e-3 at W2 and W3, groups of 128: the lowest mean
            # validation perplexity (results/llm_ptb/qronos_damping.md).
            "qronos_damping": 1e-3,
            "num_samples": 128,
            "batch_size": 32,
        }
    )
    return config
