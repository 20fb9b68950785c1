"""Framework adapters for `qjax.quantize_model`: Flax Linen and Flax NNX."""

from qjax.adapters.base import Adapter, Layer
from qjax.adapters.linen import LinenAdapter
from qjax.adapters.nnx import NNXAdapter

__all__ = ["Adapter", "Layer", "LinenAdapter", "NNXAdapter"]
