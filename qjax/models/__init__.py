"""Flax Linen models of the papers' experiments: MNIST MLPs and the CIFAR-10 CNN."""

from qjax.models.cnn import CNN
from qjax.models.mlp import MLP, scaled_mlp

__all__ = ["CNN", "MLP", "scaled_mlp"]
