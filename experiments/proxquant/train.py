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

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from experiments import common
from qjax import batchnorm, data, metrics, prox, transforms
from qjax.models import resnet

METHODS = ("binaryconnect", "proxquant_binary", "proxquant_ternary")


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
            r"kernel$", exclude=config.binary_float_layers
        )
    if method == "proxquant_ternary":
        return prox.ternary_quantizer(), transforms.mask_by_path(
            r"kernel$", exclude=config.ternary_float_layers
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


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    on_checkpoint: Callable[[str, int], None] | None = None,
) -> dict:
    """Float warm start, then each of config.methods at equal budget; returns the results dict.

    Args:
      config: the experiment's config (configs/*.py).
      workdir: checkpoints and results; a rerun resumes from it (same config only).
      on_checkpoint: called as (phase, epoch) after every saved epoch (see `common.Workdir`).

    Returns:
      The results, also written to workdir/results.json and results.md.
    """
    work = common.open_workdir(config, workdir, on_checkpoint=on_checkpoint)
    dataset = load_dataset(config)
    steps_per_epoch = len(dataset.train_images) // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"train_size {len(dataset.train_images)} < batch_size {config.batch_size}")
    model = resnet.CIFARResNet(depth=config.depth)
    variables = model.init(jax.random.key(config.seed), jnp.zeros((1, 32, 32, 3)), train=False)
    accuracy = common.classifier_accuracy(model, normalize, batch_size=config.eval_batch_size)
    batches = common.shuffled_batches(
        (dataset.train_images, dataset.train_labels), config.batch_size, seed=config.seed
    )

    def test_accuracy(params, batch_stats) -> float:
        variables = {"params": params, "batch_stats": batch_stats}
        return accuracy(variables, dataset.test_images, dataset.test_labels)

    def train_phase(name, state, tx, epochs, *, param_map=None, metrics_fn=None, log_every=0):
        loss = common.classifier_loss(
            model, normalize=normalize, augment=data.flip_and_crop, param_map=param_map
        )
        see = (lambda p: p) if param_map is None else jax.jit(param_map)
        return common.run_phase(
            work,
            name,
            state,
            common.make_train_step(loss, tx, metrics_fn=metrics_fn),
            batches,
            epochs=epochs,
            evaluate=lambda s: {
                "test_accuracy": test_accuracy(see(s.params), s.model_state["batch_stats"])
            },
            log_every_steps=log_every,
        )

    warm_tx = warm_start_optimizer(config, steps_per_epoch)
    warm_state, warm_history = train_phase(
        "float",
        common.TrainState.create(
            variables["params"],
            warm_tx,
            key=common.phase_key(config.seed, "float"),
            model_state={"batch_stats": variables["batch_stats"]},
        ),
        warm_tx,
        config.warm.epochs,
    )
    warm_params = warm_state.params
    results = {
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
            else None
        )
        state, history = train_phase(
            method,
            common.TrainState.create(
                warm_params,
                tx,
                key=common.phase_key(config.seed, method),
                model_state=warm_state.model_state,
            ),
            tx,
            config.quant.epochs,
            param_map=param_map,
            metrics_fn=lambda s, m=mask: {
                "sign_change": metrics.sign_change_fraction(s.params, warm_params, mask=m)
            },
            log_every=config.sign_change_every_steps,
        )
        batch_stats = state.model_state["batch_stats"]
        distance = float(transforms.quantization_error(state.params, quantizer, mask=mask))
        hard = transforms.hard_quantize(state.params, quantizer, mask=mask)
        hard_accuracy = test_accuracy(hard, batch_stats)

        bn_batches = (
            normalize(dataset.train_images[i * config.batch_size : (i + 1) * config.batch_size])
            for i in range(min(config.bn_reestimation_batches, steps_per_epoch))
        )
        reestimated = batchnorm.reestimate_batch_stats(
            lambda v, x, **kw: model.apply(v, x, train=True, **kw),
            {"params": hard, "batch_stats": batch_stats},
            bn_batches,
        )["batch_stats"]
        bn_accuracy = test_accuracy(hard, reestimated)

        freeze_tx = optax.chain(
            optax.adam(config.quant.freeze_learning_rate), optax.masked(optax.set_to_zero(), mask)
        )
        frozen, freeze_history = train_phase(
            f"{method}_frozen",
            common.TrainState.create(
                hard,
                freeze_tx,
                key=common.phase_key(config.seed, f"{method}_frozen"),
                model_state={"batch_stats": reestimated},
            ),
            freeze_tx,
            config.quant.freeze_epochs,
        )
        changed = jax.tree.map(
            lambda a, b, m: m and bool(jnp.any(a != b)), hard, frozen.params, mask(hard)
        )
        if any(jax.tree.leaves(changed)):
            raise RuntimeError(f"{method}: the frozen phase changed quantized weights")
        final_accuracy = (
            freeze_history["test_accuracy"][-1] if freeze_history["epoch"] else bn_accuracy
        )
        per_layer = metrics.sign_changes(state.params, warm_params, mask=mask)
        results["methods"][method] = {
            "distance_to_quantized_set": distance,
            "hard_quantized_accuracy": hard_accuracy,
            "bn_reestimated_accuracy": bn_accuracy,
            "final_accuracy": final_accuracy,
            "sign_change": float(
                metrics.sign_change_fraction(state.params, warm_params, mask=mask)
            ),
            "sign_change_per_layer": {k: float(v) for k, v in per_layer.items()},
            "history": history,
            "frozen_history": freeze_history,
        }
        logging.info(
            "%s: %s",
            method,
            {k: v for k, v in results["methods"][method].items() if isinstance(v, float)},
        )

    table = results_table(results)
    plot_sign_changes(results, config, work.file("sign_changes.png"))
    return common.write_results(work, results, table, config)


def results_table(results: dict) -> str:
    """The Markdown table of test accuracies (%) and sign changes."""
    lines = [
        "| method | test acc. (soft θ / STE) | hard-quantized | + BN re-estimated | + frozen "
        "phase (final) | sign changes vs warm start |",
        "|---|---|---|---|---|---|",
        f"| float (warm start) | {results['float']['test_accuracy']:.2f} | | | | |",
    ]
    for method, r in results["methods"].items():
        soft = r["history"]["test_accuracy"][-1] if r["history"]["epoch"] else float("nan")
        lines.append(
            f"| {method} | {soft:.2f} | {r['hard_quantized_accuracy']:.2f} | "
            f"{r['bn_reestimated_accuracy']:.2f} | {r['final_accuracy']:.2f} | "
            f"{r['sign_change']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def plot_sign_changes(results: dict, config: ml_collections.ConfigDict, path: str) -> None:
    """Sign-change fraction vs epoch for every method (the paper's stability figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    steps_per_epoch = results["steps_per_epoch"]
    for method, r in results["methods"].items():
        epochs = np.asarray(r["history"].get("step", [])) / steps_per_epoch
        axis.plot(epochs, r["history"].get("step_sign_change", []), label=method)
    axis.set_xlabel("epoch of quantized training")
    axis.set_ylabel("fraction of signs flipped vs warm start")
    axis.set_title(f"ResNet-{config.depth}, CIFAR-10")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
