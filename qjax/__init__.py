"""qjax: neural-network weight quantization in JAX and Flax.

Two published methods:

* GPFQ, greedy path-following quantization (Lybrand & Saab), post-training: `gpfq_layer`,
  `gpfq_conv`, the streaming `gram_stats_update` + `gpfq_from_stats`, and `quantize_model` for
  whole Flax models; the baselines `msq` (rounding) and `gptq_from_stats` (GPTQ).
* ProxQuant (Bai, Wang & Liberty, ICLR 2019), quantization-aware training as optax transforms:
  `prox_quant` (last link of an `optax.chain`), the BinaryConnect baseline `straight_through`
  + `clip_params`, `hard_quantize` and `reestimate_batch_stats` for the end of training.

Submodules: `alphabets`, `patches`, `prox`, `transforms`, `batchnorm`, `metrics`, `data`, `models`,
`sharding` (GPFQ over a device mesh) and `export` (packed integer codes, checkpoints).
"""

from qjax import (
    alphabets,
    batchnorm,
    data,
    export,
    methods,
    metrics,
    models,
    patches,
    prox,
    sharding,
    transforms,
)
from qjax.batchnorm import reestimate_batch_stats
from qjax.methods import (
    GPFQ,
    GPTQ,
    MSQ,
    QuantizationMethod,
    gpfq_conv,
    gpfq_from_stats,
    gpfq_layer,
    gptq_from_stats,
    msq,
)
from qjax.engine import LayerReport, format_report, quantize_model
from qjax.rules import LayerSpec, Rules
from qjax.stats import GramStats, gram_stats, gram_stats_init, gram_stats_update, relative_error
from qjax.transforms import (
    ProxQuantState,
    clip_params,
    hard_quantize,
    linear_reg_schedule,
    mask_by_path,
    prox_quant,
    quantization_error,
    straight_through,
)

__version__ = "0.1.0"

__all__ = [
    "GramStats",
    "LayerReport",
    "LayerSpec",
    "ProxQuantState",
    "alphabets",
    "batchnorm",
    "clip_params",
    "data",
    "export",
    "format_report",
    "gpfq_conv",
    "gpfq_from_stats",
    "gpfq_layer",
    "gptq_from_stats",
    "gram_stats",
    "gram_stats_init",
    "gram_stats_update",
    "hard_quantize",
    "linear_reg_schedule",
    "mask_by_path",
    "metrics",
    "models",
    "msq",
    "patches",
    "prox",
    "prox_quant",
    "quantization_error",
    "quantize_model",
    "reestimate_batch_stats",
    "relative_error",
    "sharding",
    "straight_through",
    "transforms",
]
