"""Models of the papers' experiments (Flax Linen) and a transformer language model (Flax NNX).

GPFQ: the MNIST MLPs (`MLP`, `scaled_mlp`) and the CIFAR-10 CNN (`CNN`).
ProxQuant: CIFAR ResNet-20/32/44/56 (`qjax.models.resnet`) and the Penn Treebank LSTM language
model (`qjax.models.lstm`).
Post-training quantization of language models: the decoder-only `TransformerLM` (NNX), with
`qjax.models.transformer.perplexity` and `generate`; the Llama-family decoder `Llama` (Llama 2/3,
Mistral, Qwen 2/3) read from Hugging Face checkpoints by `qjax.models.llama.from_pretrained`.
"""

from qjax.models.cnn import CNN
from qjax.models.llama import Llama, LlamaConfig
from qjax.models.mlp import MLP, scaled_mlp
from qjax.models.transformer import TransformerConfig, TransformerLM

__all__ = ["CNN", "MLP", "Llama", "LlamaConfig", "TransformerConfig", "TransformerLM", "scaled_mlp"]
