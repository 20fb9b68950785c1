"""Post-training quantization methods, one file each, on the same streamed statistics.

Each is a frozen dataclass carrying its hyperparameters, with a pure `quantize(w, stats,
alphabet)` (see `base.QuantizationMethod`). `get("gpfq")` returns a method by name.
"""

from qjax.methods.base import QuantizationMethod, get, names
from qjax.methods.gpfq import GPFQ, gpfq_conv, gpfq_from_stats, gpfq_from_targets, gpfq_layer
from qjax.methods.gptq import GPTQ, gptq_from_stats
from qjax.methods.msq import MSQ, msq
from qjax.methods.qronos import Qronos, qronos_from_stats

__all__ = [
    "GPFQ",
    "GPTQ",
    "MSQ",
    "Qronos",
    "QuantizationMethod",
    "get",
    "gpfq_conv",
    "gpfq_from_stats",
    "gpfq_from_targets",
    "gpfq_layer",
    "gptq_from_stats",
    "msq",
    "names",
    "qronos_from_stats",
]
