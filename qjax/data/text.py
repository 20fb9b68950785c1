"""Word-level language-modelling corpora: Penn Treebank (Mikolov's version)."""

from __future__ import annotations

import os
import pathlib
from typing import NamedTuple

import numpy as np

from qjax.data import locate

EOS = "<eos>"
PTB_FILES = {split: f"ptb.{split}.txt" for split in ("train", "valid", "test")}


class TextCorpus(NamedTuple):
    """A tokenised corpus, each split one long stream of word ids.

    Attributes:
      train, valid, test: 1-D int32 word ids; every line ends with the id of "<eos>".
      vocab: the words, `vocab[i]` has id i; ids follow the order of first appearance in train.
      source: where the text came from, e.g. "dir:/data/ptb".
    """

    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    vocab: tuple[str, ...]
    source: str


def _words(path: pathlib.Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [word for line in f for word in [*line.split(), EOS]]


def tokenize(
    paths: dict[str, pathlib.Path],
) -> tuple[dict[str, np.ndarray], tuple[str, ...]]:
    """Reads text files into id streams; the vocabulary is built from the "train" file.

    Args:
      paths: split name → text file; must contain "train".

    Returns:
      (split name → 1-D int32 ids, vocabulary).

    Raises:
      ValueError: a word outside the training vocabulary (PTB's vocabulary is closed: rare words
        are already `<unk>`), named with its file.
    """
    train_words = _words(paths["train"])
    vocab = tuple(dict.fromkeys(train_words))
    index = {word: i for i, word in enumerate(vocab)}
    ids = {}
    for split, path in paths.items():
        words = train_words if split == "train" else _words(path)
        unknown = next((w for w in words if w not in index), None)
        if unknown is not None:
            raise ValueError(f"{path}: word {unknown!r} is not in the training vocabulary")
        ids[split] = np.asarray([index[w] for w in words], np.int32)
    return ids, vocab


def load_ptb(*, data_dir: str | os.PathLike | None = None) -> TextCorpus:
    """Loads the Penn Treebank language-modelling corpus (10,000 words, 929,589 train tokens).

    Args:
      data_dir: a folder with `ptb.train.txt`, `ptb.valid.txt`, `ptb.test.txt`, directly or in
        `<data_dir>/ptb/`. None: search `$QJAX_DATA_DIR` and `../shared/data` (from the working
        directory and from the repository). TFDS has no PTB builder.

    Returns:
      A `TextCorpus`.

    Raises:
      FileNotFoundError: no folder had the three files; the message lists every place searched.
    """
    looked: list[str] = []
    folder = locate.find_files(
        locate.candidate_dirs(data_dir), "ptb", list(PTB_FILES.values()), looked
    )
    if folder is None:
        raise locate.not_found("Penn Treebank", looked)
    ids, vocab = tokenize({split: folder / name for split, name in PTB_FILES.items()})
    corpus = TextCorpus(ids["train"], ids["valid"], ids["test"], vocab, f"dir:{folder}")
    locate.log_source(
        f"Penn Treebank ({len(vocab)} words, {len(corpus.train)} train tokens)", corpus.source
    )
    return corpus
