"""Float training of the papers' classifiers (MNIST MLP, CIFAR-10 CNN), with orbax checkpoints.

`train_and_evaluate(config, workdir)` trains the model the config names, saves its variables to
`workdir/checkpoints/float`, and on a second call restores them instead of training again.
"""

from __future__ import annotations

import functools
import os
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from flax.training import train_state
from tqdm.auto import tqdm

from qjax import data, models


class Splits(NamedTuple):
    train: data.ImageDataset
    test: data.ImageDataset


class TrainResult(NamedTuple):
    model: nn.Module
    variables: Any
    test_accuracy: float


class TrainState(train_state.TrainState):
    batch_stats: Any


def load_splits(config: ml_collections.ConfigDict) -> Splits:
    """The train and test splits of config.dataset, cut to config.max_train/test_examples."""
    loader = {"mnist": data.load_mnist, "cifar10": data.load_cifar10}[config.dataset]
    kwargs = {"data_dir": config.data_dir or None, "source": config.data_source}
    splits = []
    for split, limit in (("train", config.max_train_examples), ("test", config.max_test_examples)):
        ds = loader(split, **kwargs)
        if limit:
            ds = ds._replace(images=ds.images[:limit], labels=ds.labels[:limit])
        splits.append(ds)
    return Splits(*splits)


def preprocess(images: np.ndarray, dataset: str) -> jax.Array:
    """uint8 images → float32, standardized with the training set's channel statistics."""
    mean, std = {
        "mnist": (data.MNIST_MEAN, data.MNIST_STD),
        "cifar10": (data.CIFAR10_MEAN, data.CIFAR10_STD),
    }[dataset]
    return jnp.asarray(data.normalize(images, mean, std))


def create_model(
    config: ml_collections.ConfigDict, *, width_scale: float | None = None
) -> nn.Module:
    """The classifier named by config.model ("mlp" or "cnn")."""
    if config.model == "mlp":
        return models.scaled_mlp(width_scale if width_scale is not None else config.width_scale)
    if config.model == "cnn":
        return models.CNN(stages=tuple(config.cnn_stages), dense=config.cnn_dense)
    raise ValueError(f"config.model must be 'mlp' or 'cnn', got {config.model!r}")


@functools.partial(jax.jit, donate_argnums=0)
def train_step(state: TrainState, images: jax.Array, labels: jax.Array, key: jax.Array):
    """One optimizer step on the cross-entropy loss; returns (state, loss)."""

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            images,
            train=True,
            rngs={"dropout": key},
            mutable=["batch_stats"],
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, updates

    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=updates["batch_stats"])
    return state, loss


@functools.partial(jax.jit, static_argnums=0)
def _predict(model: nn.Module, variables, images: jax.Array) -> jax.Array:
    return jnp.argmax(model.apply(variables, images), axis=-1)


def accuracy(
    model: nn.Module, variables, dataset: data.ImageDataset, config: ml_collections.ConfigDict
) -> float:
    """Test accuracy (%) of the model on a dataset, evaluated in batches."""
    correct = 0
    for images, labels in data.image_batches(dataset, config.eval_batch_size):
        predictions = _predict(model, variables, preprocess(images, config.dataset))
        correct += int(jnp.sum(predictions == labels))
    return 100.0 * correct / len(dataset.labels)


def train(model: nn.Module, splits: Splits, config: ml_collections.ConfigDict, *, seed: int) -> Any:
    """Trains `model` with AdamW and a cosine learning-rate decay; returns its variables."""
    key = jax.random.key(seed)
    init_key, key = jax.random.split(key)
    sample = preprocess(splits.train.images[:2], config.dataset)
    variables = model.init(init_key, sample)
    steps_per_epoch = len(splits.train.labels) // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"batch_size {config.batch_size} exceeds the {len(splits.train.labels)} training images"
        )
    schedule = optax.cosine_decay_schedule(config.learning_rate, config.epochs * steps_per_epoch)
    state = TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        batch_stats=variables["batch_stats"],
        tx=optax.adamw(schedule, weight_decay=config.weight_decay),
    )
    augment = jax.jit(data.flip_and_crop)
    for epoch in tqdm(range(config.epochs), desc=f"training {type(model).__name__}"):
        key, shuffle_key = jax.random.split(key)
        losses = []
        for images, labels in data.image_batches(
            splits.train, config.batch_size, key=shuffle_key, drop_remainder=True
        ):
            key, step_key, augment_key = jax.random.split(key, 3)
            images = preprocess(images, config.dataset)
            if config.augment:
                images = augment(images, augment_key)
            state, loss = train_step(state, images, jnp.asarray(labels), step_key)
            losses.append(loss)
        logging.info(
            "epoch %d: mean training loss %.4f", epoch + 1, float(jnp.mean(jnp.stack(losses)))
        )
    return {"params": state.params, "batch_stats": state.batch_stats}


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    splits: Splits | None = None,
    width_scale: float | None = None,
) -> TrainResult:
    """Trains (or restores from `workdir`) the float model and evaluates it on the test split.

    Args:
      config: the experiment config (dataset, model, training hyper-parameters).
      workdir: where the orbax checkpoint goes (`checkpoints/float` or `checkpoints/float_w<s>`).
      splits: the data, if already loaded.
      width_scale: the MLP width multiplier (default config.width_scale).

    Returns:
      `TrainResult(model, variables, test_accuracy)`.
    """
    splits = splits or load_splits(config)
    model = create_model(config, width_scale=width_scale)
    name = "float" if width_scale is None else f"float_w{width_scale:g}"
    path = os.path.join(os.path.abspath(workdir), "checkpoints", name)
    checkpointer = ocp.StandardCheckpointer()
    if os.path.exists(path):
        abstract = jax.eval_shape(
            model.init, jax.random.key(0), preprocess(splits.train.images[:2], config.dataset)
        )
        variables = checkpointer.restore(path, abstract)
        logging.info("restored float model from %s", path)
    else:
        variables = train(model, splits, config, seed=config.seed)
        checkpointer.save(path, variables)
        checkpointer.wait_until_finished()
    test_accuracy = accuracy(model, variables, splits.test, config)
    logging.info("float %s: test accuracy %.2f%%", name, test_accuracy)
    return TrainResult(model, variables, test_accuracy)
