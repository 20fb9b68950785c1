"""ProxQuant vs BinaryConnect on CIFAR-10 ResNets (Bai, Wang & Liberty, ICLR 2019, §5.1).

The pipeline, composed from qjax calls:

1. float warm start: SGD with momentum, weight decay, step-decayed learning rate;
2. for each method, from the warm start, at the same budget:
   * `binaryconnect`: loss at q(θ) through `qjax.straight_through`, Adam, θ clipped to [−1, 1];
   * `proxquant_binary`: `optax.chain(optax.adam(η), qjax.prox_quant(η·λ_t, "binary", clip=1))`;
   * `proxquant_ternary`: the same with the ternary prox (first and last layer in float);
   with the fraction of weight signs flipped since the warm start logged along the way;
3. `qjax.hard_quantize`, then `qjax.reestimate_batch_stats`, then the frozen phase (quantized
   weights fixed, BatchNorm and biases trained), evaluating after each step.

Every phase saves an orbax checkpoint per epoch under workdir/checkpoints/<phase> and resumes from
it. Results go to workdir/results.json, workdir/results.md and workdir/sign_changes.png.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from tqdm import tqdm

from experiments.proxquant.checkpointing import PhaseCheckpoints, write_json
from qjax import batchnorm, data, metrics, prox, transforms
from qjax.models import resnet

METHODS = ("binaryconnect", "proxquant_binary", "proxquant_ternary")


class TrainState(NamedTuple):
    params: Any
    batch_stats: Any
    opt_state: Any


class Dataset(NamedTuple):
    train_images: np.ndarray  # (n, 32, 32, 3) uint8
    train_labels: np.ndarray  # (n,) int32
    test_images: np.ndarray
    test_labels: np.ndarray


def normalize(images):
    """uint8 CIFAR-10 images → float32, standardized per channel with the training split's stats."""
    return data.normalize(images, data.CIFAR10_MEAN, data.CIFAR10_STD)


def load_dataset(config: ml_collections.ConfigDict) -> Dataset:
    """CIFAR-10 through `qjax.data` (or synthetic stand-in images for tests), cut to size."""
    if config.dataset == "cifar10":
        from qjax import data

        data_dir = config.data_dir or None
        train = data.load_cifar10("train", data_dir=data_dir)
        test = data.load_cifar10("test", data_dir=data_dir)
        logging.info("CIFAR-10 from %s", train.source)
        arrays = (train.images, train.labels, test.images, test.labels)
    elif config.dataset == "synthetic":
        rng = np.random.default_rng(config.seed)
        templates = rng.integers(0, 256, (10, 32, 32, 3))

        def make(n):
            labels = rng.integers(0, 10, n)
            noise = rng.normal(0, 40, (n, 32, 32, 3))
            return np.clip(templates[labels] + noise, 0, 255).astype(np.uint8), labels

        arrays = (*make(config.train_size), *make(config.test_size))
    else:
        raise ValueError(f"config.dataset must be 'cifar10' or 'synthetic', got {config.dataset!r}")
    train_images, train_labels, test_images, test_labels = arrays
    return Dataset(
        np.asarray(train_images[: config.train_size]),
        np.asarray(train_labels[: config.train_size], np.int32),
        np.asarray(test_images[: config.test_size]),
        np.asarray(test_labels[: config.test_size], np.int32),
    )


def quantizer_and_mask(
    config: ml_collections.ConfigDict, method: str
) -> tuple[prox.Quantizer, Callable]:
    """The method's quantizer and the mask of quantized kernels (paper: shortcuts stay float)."""
    if method in ("binaryconnect", "proxquant_binary"):
        return prox.binary_quantizer(), transforms.mask_by_path(
            r".*/kernel", exclude=config.binary_float_layers
        )
    if method == "proxquant_ternary":
        return prox.ternary_quantizer(), transforms.mask_by_path(
            r".*/kernel", exclude=config.ternary_float_layers
        )
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


def warm_start_optimizer(
    config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.GradientTransformation:
    schedule = optax.piecewise_constant_schedule(
        config.warm.learning_rate,
        {int(epoch * steps_per_epoch): 0.1 for epoch in config.warm.lr_decay_epochs},
    )
    return optax.chain(
        optax.add_decayed_weights(config.warm.weight_decay),
        optax.sgd(schedule, momentum=config.warm.momentum),
    )


def quantization_optimizer(
    config: ml_collections.ConfigDict, method: str, steps_per_epoch: int
) -> optax.GradientTransformation:
    """Adam followed by the method's last link: clip (BinaryConnect) or the ProxQuant prox."""
    quantizer, mask = quantizer_and_mask(config, method)
    learning_rate = config.quant.learning_rate
    if method == "binaryconnect":
        total = config.quant.epochs * steps_per_epoch
        schedule = optax.piecewise_constant_schedule(
            learning_rate, {int(f * total): 0.1 for f in config.quant.bc_lr_decay_fractions}
        )
        return optax.chain(optax.adam(schedule), transforms.clip_params(1.0, mask=mask))
    reg = config.quant.reg_binary if method == "proxquant_binary" else config.quant.reg_ternary
    strength = transforms.linear_reg_schedule(
        learning_rate=learning_rate, reg=reg, steps_per_epoch=steps_per_epoch
    )
    clip = 1.0 if method == "proxquant_binary" else None
    return optax.chain(
        optax.adam(learning_rate), transforms.prox_quant(strength, quantizer, clip=clip, mask=mask)
    )


def make_train_step(model, tx, param_map=lambda params: params):
    """A jitted SGD step: augment + normalize, loss at param_map(θ), optimizer update."""

    @jax.jit
    def train_step(state: TrainState, images, labels, key):
        images = normalize(data.flip_and_crop(images, key))

        def loss_fn(params):
            variables = {"params": param_map(params), "batch_stats": state.batch_stats}
            logits, mutated = model.apply(variables, images, train=True, mutable=["batch_stats"])
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, mutated["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(params, batch_stats, opt_state), loss

    return train_step


def make_evaluate(model, images: np.ndarray, labels: np.ndarray, batch_size: int):
    """state ↦ test accuracy in eval mode (BatchNorm running statistics), jitted once."""
    logits_fn = jax.jit(
        lambda p, s, x: model.apply({"params": p, "batch_stats": s}, normalize(x), train=False)
    )

    def evaluate(state: TrainState) -> float:
        correct = 0
        for start in range(0, len(images), batch_size):
            logits = logits_fn(state.params, state.batch_stats, images[start : start + batch_size])
            correct += int(jnp.sum(jnp.argmax(logits, -1) == labels[start : start + batch_size]))
        return correct / len(images)

    return evaluate


def run_phase(
    name: str,
    state: TrainState,
    train_step,
    epochs: int,
    dataset: Dataset,
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    evaluate_fn: Callable[[TrainState], float],
    reference_params: Any = None,
    mask: Callable | None = None,
) -> tuple[TrainState, dict]:
    """Train for `epochs`, resuming from the phase's checkpoint; log sign changes vs reference."""
    checkpoints = PhaseCheckpoints(os.path.join(workdir, "checkpoints", name))
    history = {"epoch": [], "loss": [], "test_accuracy": [], "sign_step": [], "sign_change": []}
    start_epoch = 0
    if checkpoints.latest_epoch() is not None:
        state, history, start_epoch = checkpoints.restore(state)
        logging.info("%s: resumed after epoch %d", name, start_epoch)
    steps_per_epoch = len(dataset.train_images) // config.batch_size
    key = jax.random.fold_in(jax.random.key(config.seed), zlib.crc32(name.encode()))
    progress = tqdm(total=(epochs - start_epoch) * steps_per_epoch, desc=name, disable=None)
    for epoch in range(start_epoch, epochs):
        order = np.random.default_rng([config.seed, epoch]).permutation(len(dataset.train_images))
        losses = []
        for i in range(steps_per_epoch):
            step = epoch * steps_per_epoch + i
            batch = order[i * config.batch_size : (i + 1) * config.batch_size]
            state, loss = train_step(
                state,
                dataset.train_images[batch],
                dataset.train_labels[batch],
                jax.random.fold_in(key, step),
            )
            losses.append(loss)
            if reference_params is not None and step % config.sign_change_every_steps == 0:
                flipped = metrics.sign_change_fraction(state.params, reference_params, mask=mask)
                history["sign_step"].append(step + 1)
                history["sign_change"].append(float(flipped))
            progress.update()
        history["epoch"].append(epoch + 1)
        history["loss"].append(float(jnp.mean(jnp.stack(losses))))
        history["test_accuracy"].append(evaluate_fn(state))
        logging.info(
            "%s epoch %d: loss %.4f, test accuracy %.4f",
            name,
            epoch + 1,
            history["loss"][-1],
            history["test_accuracy"][-1],
        )
        checkpoints.save(epoch + 1, state, history)
    progress.close()
    return state, history


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Float warm start, then each of config.methods at equal budget; returns the results dict."""
    os.makedirs(workdir, exist_ok=True)
    dataset = load_dataset(config)
    steps_per_epoch = len(dataset.train_images) // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"train_size {len(dataset.train_images)} < batch_size {config.batch_size}")
    model = resnet.CIFARResNet(depth=config.depth)
    variables = model.init(jax.random.key(config.seed), jnp.zeros((1, 32, 32, 3)), train=False)
    eval_of = make_evaluate(model, dataset.test_images, dataset.test_labels, config.eval_batch_size)

    warm_tx = warm_start_optimizer(config, steps_per_epoch)
    warm_state = TrainState(
        variables["params"], variables["batch_stats"], warm_tx.init(variables["params"])
    )
    warm_state, warm_history = run_phase(
        "float",
        warm_state,
        make_train_step(model, warm_tx),
        config.warm.epochs,
        dataset,
        config,
        workdir,
        evaluate_fn=eval_of,
    )
    results = {
        "config": config.to_dict(),
        "steps_per_epoch": steps_per_epoch,
        "float": {"test_accuracy": warm_history["test_accuracy"][-1], "history": warm_history},
        "methods": {},
    }

    for method in config.methods:
        quantizer, mask = quantizer_and_mask(config, method)
        tx = quantization_optimizer(config, method, steps_per_epoch)
        param_map = (
            (lambda params, q=quantizer, m=mask: transforms.straight_through(params, q, mask=m))
            if method == "binaryconnect"
            else (lambda params: params)
        )
        state = TrainState(warm_state.params, warm_state.batch_stats, tx.init(warm_state.params))
        state, history = run_phase(
            method,
            state,
            make_train_step(model, tx, param_map),
            config.quant.epochs,
            dataset,
            config,
            workdir,
            evaluate_fn=lambda s, pm=param_map: eval_of(s._replace(params=pm(s.params))),
            reference_params=warm_state.params,
            mask=mask,
        )
        distance = float(transforms.quantization_error(state.params, quantizer, mask=mask))
        hard = transforms.hard_quantize(state.params, quantizer, mask=mask)
        hard_accuracy = eval_of(state._replace(params=hard))

        bn_batches = (
            dataset.train_images[i * config.batch_size : (i + 1) * config.batch_size]
            for i in range(min(config.bn_reestimation_batches, steps_per_epoch))
        )
        reestimated = batchnorm.reestimate_batch_stats(
            lambda v, x, **kw: model.apply(v, normalize(x), train=True, **kw),
            {"params": hard, "batch_stats": state.batch_stats},
            bn_batches,
        )
        bn_accuracy = eval_of(state._replace(params=hard, batch_stats=reestimated["batch_stats"]))

        freeze_tx = optax.chain(
            optax.adam(config.quant.freeze_learning_rate), optax.masked(optax.set_to_zero(), mask)
        )
        frozen = TrainState(hard, reestimated["batch_stats"], freeze_tx.init(hard))
        frozen, freeze_history = run_phase(
            f"{method}_frozen",
            frozen,
            make_train_step(model, freeze_tx),
            config.quant.freeze_epochs,
            dataset,
            config,
            workdir,
            evaluate_fn=eval_of,
        )
        changed = jax.tree.map(
            lambda a, b, m: m and bool(jnp.any(a != b)), hard, frozen.params, mask(hard)
        )
        if any(jax.tree.leaves(changed)):
            raise RuntimeError(f"{method}: the frozen phase changed quantized weights")
        final_accuracy = (
            freeze_history["test_accuracy"][-1] if freeze_history["test_accuracy"] else bn_accuracy
        )
        per_layer = metrics.sign_changes(state.params, warm_state.params, mask=mask)
        results["methods"][method] = {
            "distance_to_quantized_set": distance,
            "hard_quantized_accuracy": hard_accuracy,
            "bn_reestimated_accuracy": bn_accuracy,
            "final_accuracy": final_accuracy,
            "sign_change": float(
                metrics.sign_change_fraction(state.params, warm_state.params, mask=mask)
            ),
            "sign_change_per_layer": {k: float(v) for k, v in per_layer.items()},
            "history": history,
            "frozen_history": freeze_history,
        }
        logging.info(
            "%s: %s",
            method,
            {k: v for k, v in results["methods"][method].items() if not isinstance(v, dict)},
        )

    write_json(os.path.join(workdir, "results.json"), results)
    with open(os.path.join(workdir, "results.md"), "w") as file:
        file.write(results_table(results))
    plot_sign_changes(results, os.path.join(workdir, "sign_changes.png"))
    return results


def results_table(results: dict) -> str:
    """The Markdown table of test accuracies and sign changes."""
    lines = [
        "| method | test acc. (soft θ / STE) | hard-quantized | + BN re-estimated | + frozen "
        "phase (final) | sign changes vs warm start |",
        "|---|---|---|---|---|---|",
        f"| float (warm start) | {results['float']['test_accuracy']:.4f} | | | | |",
    ]
    for method, r in results["methods"].items():
        soft = r["history"]["test_accuracy"][-1] if r["history"]["test_accuracy"] else float("nan")
        lines.append(
            f"| {method} | {soft:.4f} | {r['hard_quantized_accuracy']:.4f} | "
            f"{r['bn_reestimated_accuracy']:.4f} | {r['final_accuracy']:.4f} | "
            f"{r['sign_change']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def plot_sign_changes(results: dict, path: str) -> None:
    """Sign-change fraction vs epoch for every method (the paper's stability figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    steps_per_epoch = results["steps_per_epoch"]
    for method, r in results["methods"].items():
        epochs = np.asarray(r["history"]["sign_step"]) / steps_per_epoch
        axis.plot(epochs, r["history"]["sign_change"], label=method)
    axis.set_xlabel("epoch of quantized training")
    axis.set_ylabel("fraction of signs flipped vs warm start")
    axis.set_title(f"ResNet-{results['config']['depth']}, CIFAR-10")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
