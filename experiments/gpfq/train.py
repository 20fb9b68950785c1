"""Float training of the papers' classifiers (MNIST MLP, CIFAR-10 CNN) on the common loop.

`train_and_evaluate(config, workdir, splits=...)` trains the model the config names with
`experiments.common.run_phase` (an orbax checkpoint per epoch in `workdir/checkpoints/float`), so a
second call resumes, or restores the finished model instead of training again.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
from absl import logging

from experiments import common
from qjax import data, models

Splits = common.Splits


class TrainResult(NamedTuple):
    model: nn.Module
    variables: Any
    valid_accuracy: float
    test_accuracy: float


# Draws the training images that `config.test_from_train` moves to the test split.
TEST_SPLIT_SEED = 12345
NORMALIZATION = {
    "mnist": (data.MNIST_MEAN, data.MNIST_STD),
    "cifar10": (data.CIFAR10_MEAN, data.CIFAR10_STD),
}


def load_splits(config: ml_collections.ConfigDict) -> Splits:
    """The train, validation and test splits of config.dataset.

    The first config.max_train_examples training images (0: all) are split into training and
    config.validation_size validation images (drawn with config.seed); the test split is cut to
    config.max_test_examples, then config.test_from_train training images (drawn with
    `TEST_SPLIT_SEED`, the same for every seed) are moved to it.
    """
    loaded = data.load_splits(
        config.dataset, data_dir=config.data_dir or None, source=config.data_source
    )
    cut = lambda ds, limit: ds._replace(
        images=ds.images[: limit or None], labels=ds.labels[: limit or None]
    )
    train = cut(loaded["train"], config.max_train_examples)
    test = cut(loaded["test"], config.max_test_examples)
    if config.test_from_train:
        train, moved = common.hold_out(train, config.test_from_train, seed=TEST_SPLIT_SEED)
        test = test._replace(
            images=np.concatenate([test.images, moved.images]),
            labels=np.concatenate([test.labels, moved.labels]),
        )
    train, valid = common.hold_out(train, config.validation_size, seed=config.seed)
    return Splits(train, valid, test)


def preprocess(images: np.ndarray, dataset: str) -> jax.Array:
    """uint8 images → float32, standardized with the training set's channel statistics."""
    return data.normalize(images, *NORMALIZATION[dataset])


def create_model(
    config: ml_collections.ConfigDict, *, width_scale: float | None = None
) -> nn.Module:
    """The classifier named by config.model ("mlp" or "cnn")."""
    if config.model == "mlp":
        return models.scaled_mlp(width_scale if width_scale is not None else config.width_scale)
    if config.model == "cnn":
        return models.CNN(stages=tuple(config.cnn_stages), dense=config.cnn_dense)
    raise ValueError(f"config.model must be 'mlp' or 'cnn', got {config.model!r}")


def accuracy(
    model: nn.Module, variables, dataset: data.ImageDataset, config: ml_collections.ConfigDict
) -> float:
    """Accuracy (%) of the model on a dataset, evaluated in batches."""
    evaluate = _evaluator(model, NORMALIZERS[config.dataset], config.eval_batch_size)
    return evaluate(variables, dataset.images, dataset.labels)


NORMALIZERS = {name: functools.partial(preprocess, dataset=name) for name in NORMALIZATION}
# One jitted evaluation per (model, dataset, batch size), reused across the quantized models.
_evaluator = functools.lru_cache(
    lambda model, normalize, batch_size: common.classifier_accuracy(
        model, normalize, batch_size=batch_size
    )
)


def optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int):
    """AdamW over the whole run, its learning rate by config.schedule.

    "cosine": from config.learning_rate down to 0; "onecycle": up from config.learning_rate / 25
    to config.learning_rate in the first 30 % of the steps, then down to ~0 (cosine both ways).
    """
    total = config.epochs * steps_per_epoch
    if config.schedule == "cosine":
        schedule = optax.cosine_decay_schedule(config.learning_rate, total)
    elif config.schedule == "onecycle":
        schedule = optax.cosine_onecycle_schedule(total, config.learning_rate)
    else:
        raise ValueError(f"config.schedule must be 'cosine' or 'onecycle', got {config.schedule!r}")
    return optax.adamw(schedule, weight_decay=config.weight_decay)


def float_phase(
    config: ml_collections.ConfigDict,
    model: nn.Module,
    name: str,
    sample_images: np.ndarray,
    steps_per_epoch: int,
) -> tuple[common.TrainState, common.TrainStep]:
    """The float phase's initial state and jitted train step (AdamW, optional augmentation).

    Args:
      config: the experiment config.
      model: from `create_model`.
      name: the phase's name (seeds its PRNG keys).
      sample_images: a few uint8 training images (for the parameter shapes).
      steps_per_epoch: optimizer steps per epoch (for the learning-rate schedule).

    Returns:
      (state, train_step) for `common.run_phase`.
    """
    variables = jax.jit(functools.partial(model.init, train=False))(
        common.phase_key(config.seed, f"{name}/init"), preprocess(sample_images, config.dataset)
    )
    tx = optimizer(config, steps_per_epoch)
    loss = common.classifier_loss(
        model,
        normalize=NORMALIZERS[config.dataset],
        augment=data.flip_and_crop if config.augment else None,
    )
    state = common.TrainState.create(
        variables["params"],
        tx,
        key=common.phase_key(config.seed, name),
        model_state={"batch_stats": variables["batch_stats"]},
    )
    return state, common.make_train_step(loss, tx)


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: common.Workdir,
    *,
    splits: Splits,
    width_scale: float | None = None,
) -> TrainResult:
    """Trains the float model (resuming from `workdir`); evaluates it on validation and test.

    Args:
      config: the experiment config (dataset, model, training hyper-parameters).
      workdir: from `common.open_workdir`; the phase is "float" (or "float_w<s>").
      splits: the data.
      width_scale: the MLP width multiplier (default config.width_scale).

    Returns:
      `TrainResult(model, variables, valid_accuracy, test_accuracy)` (accuracies in %).
    """
    model = create_model(config, width_scale=width_scale)
    name = "float" if width_scale is None else f"float_w{width_scale:g}"
    steps_per_epoch = len(splits.train.labels) // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"batch_size {config.batch_size} exceeds the {len(splits.train.labels)} training images"
        )
    state, train_step = float_phase(config, model, name, splits.train.images[:2], steps_per_epoch)
    state, _ = common.run_phase(
        workdir,
        name,
        state,
        train_step,
        common.shuffled_batches(
            (splits.train.images, splits.train.labels), config.batch_size, seed=config.seed
        ),
        epochs=config.epochs,
        evaluate=lambda s: {
            "valid_accuracy": accuracy(
                model, {"params": s.params, **s.model_state}, splits.valid, config
            )
        },
    )
    variables = {"params": state.params, **state.model_state}
    valid_accuracy = accuracy(model, variables, splits.valid, config)
    test_accuracy = accuracy(model, variables, splits.test, config)
    logging.info("float %s: validation %.2f%%, test %.2f%%", name, valid_accuracy, test_accuracy)
    return TrainResult(model, variables, valid_accuracy, test_accuracy)
