"""Language-modelling corpora and next-token windows.

Corpora: Penn Treebank, word level (Mikolov's version, from local files), and a small
character-level English corpus that ships with qjax (`load_char_corpus`), so that language-model
code runs on a fresh offline machine. Windows: `sample_windows` (random training windows,
jittable), `eval_windows` (every token of a split scored once) and `calibration_batches`
(post-training quantization inputs drawn from the training split).
"""

from __future__ import annotations

import importlib.resources
import os
import pathlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from qjax.data import locate

EOS = "<eos>"
PTB_FILES = {split: f"ptb.{split}.txt" for split in ("train", "valid", "test")}
# The shipped character corpus (≈ 50 KB): public-domain English texts typed out from their
# well-known published forms — Lincoln's Gettysburg Address (1863) and Second Inaugural (1865),
# the Declaration of Independence (1776) and the Preamble of the US Constitution (1787),
# Shakespeare's Sonnets 18, 29, 30, 55, 73, 116, 130 and speeches from Hamlet, Macbeth, As You
# Like It, The Merchant of Venice and Julius Caesar, the King James Bible (1611: Genesis 1,
# Psalm 23, Ecclesiastes 3, 1 Corinthians 13), Poe's "The Raven" (1845), the openings of Dickens'
# A Tale of Two Cities (1859), Austen's Pride and Prejudice (1813, chapter 1), Melville's
# Moby-Dick (1851) and Twain's Tom Sawyer (1876, from chapter 2), Shelley's "Ozymandias",
# Blake's "The Tyger", Wordsworth's "I Wandered Lonely as a Cloud", Keats' "Ode on a Grecian
# Urn", Dickinson's "Because I could not stop for Death", Frost's "The Road Not Taken" (1916)
# and Lazarus' "The New Colossus" (1883). Spelling may differ in details from a given edition.
CHAR_CORPUS = "tiny_english.txt"


class TextCorpus(NamedTuple):
    """A tokenised corpus, each split one long stream of word ids.

    Attributes:
      train, valid, test: 1-D int32 token ids (PTB: every line ends with the id of "<eos>").
      vocab: the tokens, `vocab[i]` has id i (PTB: words in the order of first appearance in
        train; character corpora: the sorted characters).
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


def load_char_corpus(
    path: str | os.PathLike | None = None,
    *,
    valid_fraction: float = 0.05,
    test_fraction: float = 0.05,
) -> TextCorpus:
    """Loads a text file as a character-level corpus, split into three contiguous parts.

    Args:
      path: a UTF-8 text file; None: the ≈ 50 KB English corpus shipped with qjax (public-domain
        texts, listed in `qjax.data.text.CHAR_CORPUS`'s comment).
      valid_fraction, test_fraction: the shares of the characters in the validation and test
        splits, taken in that order from the end of the text; the rest, first, is train.

    Returns:
      A `TextCorpus` whose vocabulary is the sorted set of the text's characters (so no split
      has an unknown token).

    Raises:
      ValueError: fractions outside (0, 1) or summing to 1 or more, or a text so short that a
        split would hold fewer than 2 characters.
    """
    for name, fraction in (("valid_fraction", valid_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"{name} must be in (0, 1), got {fraction}")
    if valid_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"valid_fraction + test_fraction must be below 1, got {valid_fraction + test_fraction}"
        )
    if path is None:
        resource = importlib.resources.files("qjax.data") / CHAR_CORPUS
        content, source = resource.read_text(encoding="utf-8"), f"package:qjax/data/{CHAR_CORPUS}"
    else:
        content, source = pathlib.Path(path).read_text(encoding="utf-8"), f"file:{path}"
    vocab = tuple(sorted(set(content)))
    index = {char: i for i, char in enumerate(vocab)}
    ids = np.asarray([index[char] for char in content], np.int32)
    n_valid, n_test = round(len(ids) * valid_fraction), round(len(ids) * test_fraction)
    n_train = len(ids) - n_valid - n_test
    if min(n_train, n_valid, n_test) < 2:
        raise ValueError(
            f"{source}: {len(ids)} characters are too few for splits of "
            f"{n_train}/{n_valid}/{n_test} (each needs at least 2)"
        )
    corpus = TextCorpus(
        ids[:n_train], ids[n_train : n_train + n_valid], ids[n_train + n_valid :], vocab, source
    )
    locate.log_source(f"Character corpus ({len(vocab)} characters, {n_train} train)", source)
    return corpus


def check_ids(ids: ArrayLike, vocab_size: int, *, what: str = "token ids") -> np.ndarray:
    """The ids as a NumPy int32 array, after checking that they index a vocabulary.

    Args:
      ids: integer token ids, any shape (concrete: not traced).
      vocab_size: the number of tokens.
      what: how the ids are named in the error message.

    Returns:
      `ids` as np.int32.

    Raises:
      ValueError: non-integer ids, or an id outside [0, vocab_size) (the first one is named).
    """
    ids = np.asarray(ids)
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"{what} must be integers, got dtype {ids.dtype}")
    bad = np.flatnonzero((ids < 0) | (ids >= vocab_size))
    if bad.size:
        raise ValueError(
            f"{what} must lie in [0, {vocab_size}) (the vocabulary), got {ids.flat[bad[0]]} "
            f"at flat index {bad[0]} ({bad.size} ids outside)"
        )
    return ids.astype(np.int32)


def _check_stream(ids: ArrayLike, seq_len: int) -> None:
    if np.ndim(ids) != 1:
        raise ValueError(f"ids must be a 1-D token stream, got shape {np.shape(ids)}")
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
    if len(ids) < seq_len + 1:
        raise ValueError(
            f"{len(ids)} tokens are too few for one window of seq_len + 1 = {seq_len + 1}"
        )


def sample_windows(ids: ArrayLike, key: jax.Array, *, batch_size: int, seq_len: int) -> jax.Array:
    """A batch of next-token windows at uniformly random positions of a token stream.

    Jittable (`batch_size` and `seq_len` static): the training batches of a language model,
    one fresh draw per step, with no epoch bookkeeping.

    Args:
      ids: (n,) token ids, n ≥ seq_len + 1.
      key: PRNG key.
      batch_size: windows in the batch.
      seq_len: tokens predicted per window.

    Returns:
      (batch_size, seq_len + 1) int32: inputs `w[:, :-1]`, targets `w[:, 1:]`.
    """
    _check_stream(ids, seq_len)
    ids = jnp.asarray(ids, jnp.int32)
    starts = jax.random.randint(key, (batch_size,), 0, len(ids) - seq_len)
    return jax.vmap(lambda start: jax.lax.dynamic_slice(ids, (start,), (seq_len + 1,)))(starts)


def eval_windows(ids: ArrayLike, *, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Windows that score every token of a stream but the first exactly once.

    Consecutive windows share one token (the last target of one is the first input of the
    next). When the stream does not divide evenly, the last window is the stream's last
    seq_len + 1 tokens, with weight 0 on the targets an earlier window already scored.

    Args:
      ids: (n,) token ids, n ≥ seq_len + 1.
      seq_len: tokens predicted per window.

    Returns:
      (windows (m, seq_len + 1) int32, weights (m, seq_len) float32 in {0, 1}); the weights sum
      to n − 1.
    """
    _check_stream(ids, seq_len)
    ids = np.asarray(ids, np.int32)
    starts = list(range(0, len(ids) - seq_len, seq_len))
    weights = np.ones((len(starts), seq_len), np.float32)
    covered = starts[-1] + seq_len + 1
    if covered < len(ids):
        starts.append(len(ids) - seq_len - 1)
        last = np.zeros((1, seq_len), np.float32)
        last[0, covered - len(ids) :] = 1.0
        weights = np.concatenate([weights, last])
    windows = np.stack([ids[start : start + seq_len + 1] for start in starts])
    return windows, weights


def calibration_batches(
    corpus: TextCorpus, *, num_sequences: int, seq_len: int, seed: int
) -> np.ndarray:
    """Calibration inputs for post-training quantization: random windows of the training split.

    Args:
      corpus: the `TextCorpus`; only its train split is read.
      num_sequences: sequences to draw (GPTQ's language-model setting: 128 of 2048 tokens).
      seq_len: tokens per sequence.
      seed: the draw's seed (the same seed gives the same sequences).

    Returns:
      (num_sequences, seq_len) int32 token ids: one batch; split it along axis 0 for smaller ones.
    """
    if not isinstance(num_sequences, int) or num_sequences < 1:
        raise ValueError(f"num_sequences must be a positive integer, got {num_sequences!r}")
    windows = sample_windows(
        corpus.train, jax.random.key(seed), batch_size=num_sequences, seq_len=seq_len
    )
    return np.asarray(windows[:, :-1])
