"""The PTB transformer trained longer, then quantized where quantization matters.

    python -m experiments.lm.main --config=experiments/lm/configs/ptb_long.py \
        --workdir=/tmp/qjax/lm_ptb_long
    python -m experiments.lm.quantize --config=experiments/lm/configs/ptb_long.py \
        --workdir=/tmp/qjax/lm_ptb_long
    # what results/lm_ptb_long/ ran: per channel only, into <workdir>/ptq_channel
    python -m experiments.lm.quantize --config=experiments/lm/configs/ptb_long.py \
        --workdir=/tmp/qjax/lm_ptb_long '--config.ptq.granularities=("channel",)' \
        --config.ptq.output_dir=ptq_channel

The model and training settings of ptb.py (4 layers, d_model 128, tied embedding, dropout 0.1)
trained 4 epochs instead of 3 (its validation perplexity was still falling at 277 → 207 → 186);
the cosine schedule decays over all 4 epochs. CPU budget: the step takes 1.6 CPU-seconds, so
4 × 226 steps ≈ 24 minutes of CPU time, plus ≈ 20 CPU-seconds of validation per epoch; training
and the quantization sweep had to fit 90 minutes of wall time on 2 cores shared with other
jobs, where training got less than half a core. More epochs would bring the model nearer
convergence (20 epochs: ≈ 2 hours of CPU time).

Quantized: every attention and MLP kernel (the tied head is the float embedding) with GPFQ,
Qronos, GPTQ and RTN (MSQ) at 2, 3 and 4 bits, per channel, per tensor, and in groups of 128
inputs (the MLP's output projection has 512 inputs: 4 groups; the other kernels have 128, where
a group is a channel), for each of 3 calibration seeds, reported as mean ± std over the seeds.
One scale constant for every method, C = 1 (absmax, rule "max"): choosing C on validation
between it and the MSE-best C doubles the quantizations and adds a validation pass per model,
which this budget does not afford. Run as one command, the sweep takes the granularities in
order (per channel, per tensor, group 128) and rewrites its results after every cell; a stopped
sweep reports the cells it finished ("not run" for the others). The run in
`results/lm_ptb_long/` is the per-channel command above, then per tensor and group 128 the same
way (granularities ("tensor",) with bits (2, 3) and (4,), and ("group",); output_dir ptq_tensor,
ptq_tensor_w4, ptq_group). Per channel, under that machine's load, a whole-model quantization
took 9–16 s (medians; 18–87 s for each method's first, which compiles) and the 36 models with
their test perplexities 22 minutes; the other 72 took 15 minutes once the load had dropped.
"""

import ml_collections

from experiments.lm.configs import ptb


def get_config() -> ml_collections.ConfigDict:
    config = ptb.get_config()
    config.epochs = 4
    config.ptq.methods = ("gpfq", "qronos", "gptq", "msq")
    config.ptq.bits = (2, 3, 4)
    config.ptq.c_values = (1.0,)
    config.ptq.group_size = 128
    config.ptq.granularities = ("channel", "tensor", "group")
    config.ptq.calibration_seeds = (0, 1, 2)
    config.ptq.output_dir = "ptq"  # <workdir>/ptq; e.g. one folder per granularity
    return config
