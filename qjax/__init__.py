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

# --- ProxQuant (qjax.prox, qjax.transforms, qjax.batchnorm, qjax.metrics) ---
from qjax import batchnorm, metrics, prox, transforms
from qjax.batchnorm import reestimate_batch_stats
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

__all__ += [
    "ProxQuantState",
    "batchnorm",
    "clip_params",
    "hard_quantize",
    "linear_reg_schedule",
    "mask_by_path",
    "metrics",
    "prox",
    "prox_quant",
    "quantization_error",
    "reestimate_batch_stats",
    "straight_through",
    "transforms",
]
