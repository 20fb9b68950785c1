"""qjax: neural-network weight quantization in JAX and Flax.

Two published methods:

* GPFQ, greedy path-following quantization (Lybrand & Saab), post-training, with its successor
  Qronos and the baselines GPTQ and MSQ (round to nearest): method objects (`GPFQ`, `Qronos`,
  `GPTQ`, `MSQ`) over streamed
  statistics (`gram_stats_update`), the layer-level `gpfq_layer` / `gpfq_conv`, and
  `quantize_model` for whole Flax Linen and NNX models (Dense, DenseGeneral, Einsum, Conv,
  attention, scanned stacks), driven by ordered `rules` of `LayerSpec`s.
* ProxQuant (Bai, Wang & Liberty, ICLR 2019), quantization-aware training as optax transforms:
  `prox_quant` (last link of an `optax.chain`), the BinaryConnect baseline `straight_through`
  + `clip_params`, `hard_quantize` and `reestimate_batch_stats` for the end of training.

Throughout, `bits` = b means alphabets of 2^b letters, and paths are "a/b/c" strings matched
whole by regular expressions (`qjax.rules`).

Submodules: `alphabets`, `stats`, `methods`, `layers`, `adapters`, `rules`, `engine`, `patches`,
`prox`, `transforms`, `batchnorm`, `metrics`, `data`, `models`, `export`.
"""

from qjax import (
    adapters,
    alphabets,
    batchnorm,
    data,
    engine,
    export,
    layers,
    methods,
    metrics,
    models,
    patches,
    prox,
    rules,
    stats,
    transforms,
)
from qjax.batchnorm import reestimate_batch_stats
from qjax.engine import BlockReport, LayerReport, format_report, quantize_model
from qjax.layers import register_layer
from qjax.methods import (
    GPFQ,
    GPTQ,
    MSQ,
    Qronos,
    QuantizationMethod,
    gpfq_conv,
    gpfq_from_stats,
    gpfq_layer,
    gptq_from_stats,
    msq,
    qronos_from_stats,
)
from qjax.rules import LayerSpec, Rules
from qjax.stats import (
    GramStats,
    combined,
    gram_stats,
    gram_stats_init,
    gram_stats_update,
    make_mesh,
    relative_error,
)
from qjax.transforms import (
    ProxQuantState,
    clip_params,
    hard_quantize,
    linear_reg_schedule,
    mask_by_path,
    prox_quant,
    quantization_error,
    reg_for_total_pull,
    straight_through,
    total_pull,
)

__version__ = "0.2.0"

__all__ = [
    "GPFQ",
    "GPTQ",
    "MSQ",
    "BlockReport",
    "GramStats",
    "LayerReport",
    "LayerSpec",
    "ProxQuantState",
    "Qronos",
    "QuantizationMethod",
    "Rules",
    "adapters",
    "alphabets",
    "batchnorm",
    "clip_params",
    "combined",
    "data",
    "engine",
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
    "layers",
    "linear_reg_schedule",
    "make_mesh",
    "mask_by_path",
    "methods",
    "metrics",
    "models",
    "msq",
    "patches",
    "prox",
    "prox_quant",
    "qronos_from_stats",
    "quantization_error",
    "quantize_model",
    "reestimate_batch_stats",
    "reg_for_total_pull",
    "register_layer",
    "relative_error",
    "rules",
    "stats",
    "straight_through",
    "total_pull",
    "transforms",
]
