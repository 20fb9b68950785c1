"""qjax: neural-network weight quantization in JAX and Flax.

Two published methods:

* GPFQ, greedy path-following quantization (Lybrand & Saab), post-training: `gpfq_layer`,
  `gpfq_conv`, and the streaming `gram_stats_update` + `gpfq_from_stats`; the MSQ baseline `msq`.
* ProxQuant (Bai, Wang & Liberty, ICLR 2019), quantization-aware training as an optax transform.
"""

from qjax import alphabets, patches
from qjax.gpfq import (
    GramStats,
    gpfq_conv,
    gpfq_from_stats,
    gpfq_layer,
    gram_stats,
    gram_stats_init,
    gram_stats_update,
    msq,
    relative_error,
)

__version__ = "0.1.0"

__all__ = [
    "GramStats",
    "alphabets",
    "gpfq_conv",
    "gpfq_from_stats",
    "gpfq_layer",
    "gram_stats",
    "gram_stats_init",
    "gram_stats_update",
    "msq",
    "patches",
    "relative_error",
]

# --- Datasets, models and model-level quantization (issue 3) ---
from qjax import data, models
from qjax.gptq import gptq_from_stats
from qjax.model_quant import LayerReport, LayerSpec, format_report, quantize_model

__all__ += [
    "LayerReport",
    "LayerSpec",
    "data",
    "format_report",
    "gptq_from_stats",
    "models",
    "quantize_model",
]
