"""Flax Linen models of the papers' experiments.

GPFQ: the MNIST MLPs (`MLP`, `scaled_mlp`) and the CIFAR-10 CNN (`CNN`).
ProxQuant: CIFAR ResNet-20/32/44/56 (`qjax.models.resnet`) and the Penn Treebank LSTM language
model (`qjax.models.lstm`).
"""

from qjax.models.cnn import CNN
from qjax.models.mlp import MLP, scaled_mlp

__all__ = ["CNN", "MLP", "scaled_mlp"]
