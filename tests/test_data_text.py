"""Tests of the language-model data: the shipped character corpus and next-token windows."""

import jax
import numpy as np
import pytest

from qjax import data


def test_shipped_char_corpus():
    corpus = data.load_char_corpus()
    text = "".join(
        corpus.vocab[i] for i in np.concatenate([corpus.train, corpus.valid, corpus.test])
    )
    assert text.startswith("The Gettysburg Address\n\nFour score and seven years ago")
    assert 40_000 < len(text) < 100_000
    assert corpus.vocab == tuple(sorted(set(text))) and len(corpus.vocab) < 100
    assert corpus.source == "package:qjax/data/tiny_english.txt"
    assert all(split.dtype == np.int32 for split in corpus[:3])
    assert len(corpus.valid) == len(corpus.test) == round(0.05 * len(text))


def test_char_corpus_from_file_splits_in_order(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("abcdefghij" * 2)
    corpus = data.load_char_corpus(path, valid_fraction=0.2, test_fraction=0.1)
    assert corpus.vocab == tuple("abcdefghij")
    np.testing.assert_array_equal(corpus.train, [*range(10), 0, 1, 2, 3])
    np.testing.assert_array_equal(corpus.valid, [4, 5, 6, 7])
    np.testing.assert_array_equal(corpus.test, [8, 9])
    assert corpus.source == f"file:{path}"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"valid_fraction": 0.0}, "valid_fraction"),
        ({"test_fraction": 1.5}, "test_fraction"),
        ({"valid_fraction": 0.5, "test_fraction": 0.5}, "below 1"),
    ],
)
def test_char_corpus_bad_fractions(kwargs, message):
    with pytest.raises(ValueError, match=message):
        data.load_char_corpus(**kwargs)


def test_char_corpus_too_short(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("abcdefghij")
    with pytest.raises(ValueError, match="too few"):
        data.load_char_corpus(path)


@pytest.mark.parametrize("n", [5, 17, 19, 22])
def test_eval_windows_score_every_token_once(n):
    ids = np.arange(n, dtype=np.int32)
    windows, weights = data.eval_windows(ids, seq_len=4)
    assert windows.shape[1] == 5 and weights.shape == (len(windows), 4)
    assert windows.dtype == np.int32
    scored = windows[:, 1:][weights > 0]
    np.testing.assert_array_equal(np.sort(scored), np.arange(1, n))
    for window in windows:  # consecutive ids: a window is a contiguous piece of the stream
        np.testing.assert_array_equal(np.diff(window), 1)


def test_eval_windows_bad_input():
    with pytest.raises(ValueError, match="too few"):
        data.eval_windows(np.arange(4), seq_len=4)
    with pytest.raises(ValueError, match="1-D"):
        data.eval_windows(np.zeros((2, 8), np.int32), seq_len=4)
    with pytest.raises(ValueError, match="seq_len"):
        data.eval_windows(np.arange(8), seq_len=0)


def test_sample_windows_are_contiguous_and_jittable():
    ids = np.arange(100, dtype=np.int32)
    sample = jax.jit(lambda key: data.sample_windows(ids, key, batch_size=64, seq_len=9))
    windows = np.asarray(sample(jax.random.key(0)))
    assert windows.shape == (64, 10) and windows.dtype == np.int32
    np.testing.assert_array_equal(np.diff(windows, axis=1), 1)
    assert windows.min() >= 0 and windows.max() <= 99
    assert len(np.unique(windows[:, 0])) > 20  # the starts vary
    assert windows[:, 0].max() > 80  # the last windows of the stream are drawn too
    assert not np.array_equal(windows, sample(jax.random.key(1)))


def test_calibration_batches_from_train_split():
    train = np.arange(1000, dtype=np.int32)
    corpus = data.TextCorpus(train, -np.ones(10, np.int32), -np.ones(10, np.int32), (), "t")
    batch = data.calibration_batches(corpus, num_sequences=8, seq_len=16, seed=3)
    assert batch.shape == (8, 16) and batch.dtype == np.int32
    assert batch.min() >= 0  # drawn from train only (valid and test are −1 here)
    np.testing.assert_array_equal(np.diff(batch, axis=1), 1)
    again = data.calibration_batches(corpus, num_sequences=8, seq_len=16, seed=3)
    np.testing.assert_array_equal(batch, again)
    other = data.calibration_batches(corpus, num_sequences=8, seq_len=16, seed=4)
    assert not np.array_equal(batch, other)
    with pytest.raises(ValueError, match="num_sequences"):
        data.calibration_batches(corpus, num_sequences=0, seq_len=16, seed=0)


def test_check_ids():
    np.testing.assert_array_equal(data.check_ids(np.array([0, 4], np.int64), 5), [0, 4])
    with pytest.raises(ValueError, match=r"\[0, 5\).*got 5 at flat index 1"):
        data.check_ids(np.array([0, 5, -1]), 5)
    with pytest.raises(ValueError, match="integers"):
        data.check_ids(np.array([0.0]), 5)
