"""The PTB transformer trained towards convergence, then quantized where quantization matters.

    python -m experiments.lm.main --config=experiments/lm/configs/ptb_long.py \
        --workdir=/tmp/qjax/lm_ptb_long
    python -m experiments.lm.quantize --config=experiments/lm/configs/ptb_long.py \
        --workdir=/tmp/qjax/lm_ptb_long

The model of ptb.py (4 layers, d_model 128, tied embedding) trained 20 epochs instead of 3 (its
validation perplexity was still falling at 277 → 207 → 186), with more dropout against the
overfitting a longer run brings; the cosine schedule decays over all 20 epochs. CPU budget: the
ptb.py step takes 1.6 CPU-seconds, so 20 × 226 steps ≈ 2 hours of CPU time (≈ 1 hour of wall
time with both cores free). Quantized: every attention and MLP kernel (the tied head is the
float embedding) with GPFQ, Qronos, GPTQ and RTN (MSQ) at 4, 3 and 2 bits, per channel, in
groups of 128 inputs (the MLP's output projection has 512 inputs: 4 groups; the others have
128, where a group is a channel) and per tensor, C chosen on validation between the MSE-best
and absmax, for each of 3 calibration seeds: 4 × 3 × 3 × 2 × 3 = 216 quantized models,
reported as mean ± std over the seeds.
"""

import ml_collections

from experiments.lm.configs import ptb


def get_config() -> ml_collections.ConfigDict:
    config = ptb.get_config()
    config.epochs = 8
    config.model.dropout_rate = 0.2
    config.ptq.methods = ("gpfq", "qronos", "gptq", "msq")
    config.ptq.bits = (4, 3, 2)
    config.ptq.group_size = 128
    config.ptq.granularities = ("channel", "group", "tensor")
    config.ptq.calibration_seeds = (0, 1, 2)
    return config
