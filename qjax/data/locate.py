"""Where datasets are looked for: data directories, TFDS, and the places searched.

The search order when no `data_dir` is given: `$QJAX_DATA_DIR`, then `../shared/data` relative to
the working directory and to the repository root, then TFDS (prepared datasets only), then, for
MNIST alone, the embedded 5,000-image subset.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence

from absl import logging

SOURCES = ("auto", "dir", "tfds", "embedded")
_REPOSITORY_ROOT = pathlib.Path(__file__).resolve().parents[2]


def candidate_dirs(data_dir: str | os.PathLike | None) -> list[pathlib.Path]:
    """The data directories to search, in order, without duplicates.

    Args:
      data_dir: an explicit directory; when given it is the only candidate.

    Returns:
      `[data_dir]`, or `$QJAX_DATA_DIR` (when set), `./../shared/data` and
      `<repository>/../shared/data`.
    """
    if data_dir is not None:
        return [pathlib.Path(data_dir)]
    dirs = []
    if os.environ.get("QJAX_DATA_DIR"):
        dirs.append(pathlib.Path(os.environ["QJAX_DATA_DIR"]))
    dirs.append(pathlib.Path.cwd().parent / "shared" / "data")
    dirs.append(_REPOSITORY_ROOT.parent / "shared" / "data")
    unique = []
    for d in dirs:
        if d.resolve() not in [u.resolve() for u in unique]:
            unique.append(d)
    return unique


def find_files(
    dirs: Sequence[pathlib.Path], subdir: str, names: Sequence[str], looked: list[str]
) -> pathlib.Path | None:
    """The first folder, `<dir>/<subdir>` or `<dir>`, that holds all of `names`.

    Args:
      dirs: data directories, in search order.
      subdir: the dataset's usual folder name inside a data directory (e.g. "mnist").
      names: file names that must all be present.
      looked: a list that every folder tried is appended to (for the error message).

    Returns:
      The folder, or None when no candidate holds every file.
    """
    for d in dirs:
        for folder in (d / subdir, d):
            looked.append(f"{folder} ({', '.join(names)})")
            if all((folder / name).is_file() for name in names):
                return folder
    return None


def check_split(split: str) -> None:
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def check_source(source: str, allowed: Sequence[str] = SOURCES) -> None:
    if source not in allowed:
        raise ValueError(f"source must be one of {tuple(allowed)}, got {source!r}")


def tfds_source(name: str, split: str, data_dir: str | os.PathLike | None, looked: list[str]):
    """The TFDS data source of a prepared dataset, or None when TFDS does not have it prepared.

    Reads with `tfds.data_source` (no TensorFlow needed) and never downloads.

    Args:
      name: the TFDS builder name ("mnist", "cifar10").
      split: "train" or "test".
      data_dir: the TFDS data directory (None: TFDS's default).
      looked: a list that the place tried is appended to.

    Returns:
      A random-access sequence of examples, or None.
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        looked.append(f"tfds:{name} (tensorflow-datasets is not installed)")
        return None
    looked.append(f"tfds:{name} in {data_dir or 'the TFDS default data_dir'}")
    try:
        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except NotImplementedError:  # not prepared, or prepared as TFRecord
        if tfds.builder(name, data_dir=data_dir).is_prepared():
            looked[-1] += " (prepared as TFRecord, which needs TensorFlow to read)"
    except (KeyError, FileNotFoundError, tfds.core.registered.DatasetNotFoundError):
        pass
    return None


def not_found(what: str, looked: Sequence[str]) -> FileNotFoundError:
    """The error raised when no source holds a dataset; it lists every place searched."""
    places = "\n  ".join(looked)
    return FileNotFoundError(
        f"{what} was not found. Looked in:\n  {places}\n"
        "Pass data_dir=... (or set $QJAX_DATA_DIR) to a folder with the standard files."
    )


def log_source(what: str, source: str) -> None:
    logging.info("%s loaded from %s", what, source)
