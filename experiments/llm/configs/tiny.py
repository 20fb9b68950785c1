"""Tiny run for tests (well under a minute on 2 CPU cores): the PTB config's pipeline at a
2-layer, 64-wide model trained 20 steps on the character corpus shipped with qjax (no data
folder needed), quantized by GPFQ and GPTQ at W4 with groups of 32.

    python -m experiments.llm.main --config=experiments/llm/configs/tiny.py \
        --workdir=/tmp/qjax/llm_tiny
"""

import ml_collections

from experiments.llm.configs import ptb


def get_config() -> ml_collections.ConfigDict:
    config = ptb.get_config()
    config.dataset = "chars"  # config.text_file empty: the corpus shipped with qjax
    config.model.update(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    config.seq_len = 64
    config.batch_size = 16
    config.steps_per_epoch = 20
    config.warmup_steps = 5
    config.ptq.update(methods=("gpfq", "gptq"), bits=(4,), group_sizes=(32,), num_samples=16)
    return config
