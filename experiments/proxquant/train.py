"""ProxQuant vs BinaryConnect on CIFAR-10 ResNets (Bai, Wang & Liberty, ICLR 2019, §5.1).

The pipeline, composed from qjax calls:

1. float warm start: SGD with momentum, weight decay, step-decayed learning rate;
2. for each method, from the warm start, at the same budget:
   * `binaryconnect`: loss at q(θ) through `qjax.straight_through`, Adam (lr ×0.1 twice), θ
     clipped to [−1, 1];
   * `proxquant_binary`: `optax.chain(optax.adam(η), qjax.prox_quant(η·λ_t, binary, clip=1))`;
   * `proxquant_ternary`: the same with the ternary prox (first and last layer in float);
   with the fraction of weight signs flipped since the warm start logged along the way;
3. `qjax.hard_quantize`, then `qjax.reestimate_batch_stats`, then the frozen phase: the same
   optimizer continues (its state and learning rate) with the quantized weights held fixed, so
   only BatchNorm and biases train, as in the authors' code after their freeze epoch.

Per-epoch accuracies and the choice of λ use a validation split held out of the training images;
test accuracy is measured once per trained model.

Every phase saves an orbax checkpoint per epoch under workdir/checkpoints/<phase> and resumes from
it. Results go to workdir/results.json, workdir/results.md and workdir/sign_changes.png.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

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
# What results.json keeps of every λ tried (the chosen one keeps everything).
CANDIDATE_FIELDS = (
    "final_valid_accuracy",
    "final_accuracy",
    "distance_to_quantized_set",
    "soft_test_accuracy",
    "hard_quantized_accuracy",
    "sign_change",
)


def normalize(images):
    """uint8 CIFAR-10 images → float32, standardized per channel with the training split's stats."""
    return data.normalize(images, data.CIFAR10_MEAN, data.CIFAR10_STD)


def synthetic_split(config: ml_collections.ConfigDict, split: str) -> data.ImageDataset:
    """Stand-in 32×32 images for tests: one random template per class plus noise."""
    rng = np.random.default_rng(config.seed)
    templates = rng.integers(0, 256, (10, 32, 32, 3))
    n = config.train_size if split == "train" else config.test_size
    split_rng = np.random.default_rng([config.seed, len(split)])
    labels = split_rng.integers(0, 10, n).astype(np.int32)
    noise = split_rng.normal(0, 40, (n, 32, 32, 3))
    images = np.clip(templates[labels] + noise, 0, 255).astype(np.uint8)
    return data.ImageDataset(images, labels, f"synthetic (seed {config.seed})")


def load_splits(config: ml_collections.ConfigDict) -> common.Splits:
    """CIFAR-10 through `qjax.data` (or synthetic stand-in images for tests), cut to size.

    The first config.train_size training images are split into training and
    config.validation_size validation images (drawn with config.seed), on which the per-epoch
    accuracies and the choice of λ are measured; the first config.test_size test images are
    only reported.
    """
    if config.dataset == "cifar10":
        loaded = data.load_splits("cifar10", data_dir=config.data_dir or None)
        train, test = loaded["train"], loaded["test"]
    elif config.dataset == "synthetic":
        train, test = (synthetic_split(config, split) for split in ("train", "test"))
    else:
        raise ValueError(f"config.dataset must be 'cifar10' or 'synthetic', got {config.dataset!r}")
    cut = lambda ds, n: ds._replace(images=ds.images[:n], labels=ds.labels[:n])
    train, valid = common.hold_out(
        cut(train, config.train_size), config.validation_size, seed=config.seed
    )
    return common.Splits(train, valid, cut(test, config.test_size))


def quantizer_and_mask(
    config: ml_collections.ConfigDict, method: str
) -> tuple[prox.Quantizer, Callable]:
    """The method's quantizer and the mask of quantized kernels (paper: shortcuts stay float).

    Binary: {±α} with α from config.binary_scale ("one": α = 1, the paper's; every quantized
    layer here is followed by BatchNorm, which absorbs the scale). Ternary: the authors'
    asymmetric values, or ±v with config.ternary_symmetric (exportable with `qjax.export`).
    """
    if method in ("binaryconnect", "proxquant_binary"):
        return prox.binary_quantizer(config.binary_scale), transforms.mask_by_path(
            r".*/kernel", exclude=config.binary_float_layers
        )
    if method == "proxquant_ternary":
        return prox.ternary_quantizer(symmetric=config.ternary_symmetric), transforms.mask_by_path(
            r".*/kernel", exclude=config.ternary_float_layers
        )
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")


def warm_start_optimizer(
    config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.GradientTransformation:
    """SGD with momentum and weight decay; learning rate by config.warm.schedule.

    "step" (the paper's): config.warm.learning_rate, ×0.1 at each of config.warm.lr_decay_epochs.
    "onecycle": up from learning_rate / 25 to learning_rate in the first 30 % of the steps, then
    down to ~0 (for short budgets).
    """
    warm = config.warm
    if warm.schedule == "step":
        schedule = optax.piecewise_constant_schedule(
            warm.learning_rate,
            {int(epoch * steps_per_epoch): 0.1 for epoch in warm.lr_decay_epochs},
        )
    elif warm.schedule == "onecycle":
        schedule = optax.cosine_onecycle_schedule(warm.epochs * steps_per_epoch, warm.learning_rate)
    else:
        raise ValueError(
            f"config.warm.schedule must be 'step' or 'onecycle', got {warm.schedule!r}"
        )
    return optax.chain(
        optax.add_decayed_weights(warm.weight_decay),
        optax.sgd(schedule, momentum=warm.momentum, nesterov=warm.nesterov),
    )


def quantization_optimizer(
    config: ml_collections.ConfigDict, method: str, steps_per_epoch: int, reg: float | None
) -> tuple[optax.GradientTransformation, optax.GradientTransformation]:
    """The method's optimizer and its last link, as in the authors' code.

    BinaryConnect: Adam with the learning rate ×0.1 at config.quant.bc_lr_decay_fractions of the
    quantized epochs, then θ clipped to [−1, 1]. ProxQuant: Adam at a constant η, then the prox
    at strength η·λ_t (λ_t = λ·epoch, grown per config.quant.reg_growth) and θ clipped to
    [−1, 1] (binary and ternary alike).

    Returns:
      (inner optimizer, last link); the training chain is `optax.chain(inner, last)`, and the
      frozen phase continues `inner` (its state and learning rate) with the quantized weights
      held fixed.
    """
    quantizer, mask = quantizer_and_mask(config, method)
    learning_rate = config.quant.learning_rate
    if method == "binaryconnect":
        total = config.quant.epochs * steps_per_epoch
        schedule = optax.piecewise_constant_schedule(
            learning_rate, {int(f * total): 0.1 for f in config.quant.bc_lr_decay_fractions}
        )
        return optax.adam(schedule), transforms.clip_params(1.0, mask=mask)
    strength = transforms.linear_reg_schedule(
        learning_rate=learning_rate,
        reg=reg,
        steps_per_epoch=steps_per_epoch,
        growth=config.quant.reg_growth,
    )
    return optax.adam(learning_rate), transforms.prox_quant(
        strength, quantizer, clip=1.0, mask=mask
    )


def method_param_map(config: ml_collections.ConfigDict, method: str) -> Callable[[Any], Any] | None:
    """What the forward pass sees: q(θ) through `qjax.straight_through` for BinaryConnect,
    θ itself (None) for ProxQuant."""
    if method != "binaryconnect":
        return None
    quantizer, mask = quantizer_and_mask(config, method)
    return functools.partial(transforms.straight_through, quantizer=quantizer, mask=mask)


def make_train_step(
    model,
    tx: optax.GradientTransformation,
    *,
    param_map: Callable[[Any], Any] | None = None,
    metrics_fn: Callable[[common.TrainState], dict] | None = None,
) -> common.TrainStep:
    """The jitted ResNet step: crop + flip, normalize, cross-entropy at param_map(θ), `tx`."""
    loss = common.classifier_loss(
        model, normalize=normalize, augment=data.flip_and_crop, param_map=param_map
    )
    return common.make_train_step(loss, tx, metrics_fn=metrics_fn)


def freeze_optimizer(
    inner: optax.GradientTransformation, mask: Callable, inner_state: Any, params: Any
) -> tuple[optax.GradientTransformation, Any]:
    """The frozen phase's optimizer: `inner` continued from `inner_state`, masked leaves fixed.

    As after the authors' freeze epoch, the same optimizer goes on (its moments, its step count
    and so its learning rate: BinaryConnect's has decayed to 1e-4 by then) while the quantized
    weights get no update, so only BatchNorm and biases train.

    Returns:
      (optimizer, its state).
    """
    tx = optax.chain(inner, optax.masked(optax.set_to_zero(), mask))
    return tx, (inner_state, tx.init(params)[1])


def reg_candidates(config: ml_collections.ConfigDict, method: str) -> tuple[float | None, ...]:
    """The λ values to try for a method (chosen on validation); (None,) for BinaryConnect."""
    if method == "binaryconnect":
        return (None,)
    values = tuple(config.quant[f"reg_{method.removeprefix('proxquant_')}_values"])
    if not values:
        raise ValueError(f"config.quant.reg_*_values of {method} is empty")
    return values


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    on_checkpoint: Callable[[str, int], None] | None = None,
) -> dict:
    """Float warm start, then each of config.methods at equal budget; returns the results dict.

    Every per-epoch accuracy is measured on the validation split, and so is the choice of λ
    among config.quant.reg_*_values (the final accuracy after the frozen phase decides); the test
    split is evaluated once per trained model, at the end.

    Args:
      config: the experiment's config (configs/*.py).
      workdir: checkpoints and results; a rerun resumes from it (same config only).
      on_checkpoint: called as (phase, epoch) after every saved epoch (see `common.Workdir`).

    Returns:
      The results, also written to workdir/results.json and results.md.
    """
    for method in config.methods:  # unknown names fail before any training
        quantizer_and_mask(config, method)
        reg_candidates(config, method)
    work = common.open_workdir(config, workdir, on_checkpoint=on_checkpoint)
    splits = load_splits(config)
    steps_per_epoch = len(splits.train.labels) // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"{len(splits.train.labels)} training images < batch_size {config.batch_size}"
        )
    model = resnet.CIFARResNet(depth=config.depth)
    variables = jax.jit(functools.partial(model.init, train=False))(
        jax.random.key(config.seed), jnp.zeros((1, 32, 32, 3))
    )
    accuracy = common.classifier_accuracy(model, normalize, batch_size=config.eval_batch_size)
    batches = common.shuffled_batches(
        (splits.train.images, splits.train.labels), config.batch_size, seed=config.seed
    )

    def evaluate(split: data.ImageDataset, params, batch_stats) -> float:
        return accuracy({"params": params, "batch_stats": batch_stats}, split.images, split.labels)

    def train_phase(name, state, tx, epochs, *, param_map=None, metrics_fn=None, log_every=0):
        see = (lambda p: p) if param_map is None else jax.jit(param_map)
        return common.run_phase(
            work,
            name,
            state,
            make_train_step(model, tx, param_map=param_map, metrics_fn=metrics_fn),
            batches,
            epochs=epochs,
            evaluate=lambda s: {
                "valid_accuracy": evaluate(
                    splits.valid, see(s.params), s.model_state["batch_stats"]
                )
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
    warm_params, warm_batch_stats = warm_state.params, warm_state.model_state["batch_stats"]

    def quantized_training(method: str, reg: float | None) -> dict:
        """One method at one λ from the warm start: train, hard-quantize, re-estimate, freeze."""
        name = method if reg is None else f"{method}_reg{reg:g}"
        quantizer, mask = quantizer_and_mask(config, method)
        inner, last = quantization_optimizer(config, method, steps_per_epoch, reg)
        tx = optax.chain(inner, last)
        param_map = method_param_map(config, method)
        state, history = train_phase(
            name,
            common.TrainState.create(
                warm_params,
                tx,
                key=common.phase_key(config.seed, name),
                model_state=warm_state.model_state,
            ),
            tx,
            config.quant.epochs,
            param_map=param_map,
            metrics_fn=lambda s: {
                "sign_change": metrics.sign_change_fraction(s.params, warm_params, mask=mask)
            },
            log_every=config.sign_change_every_steps,
        )
        batch_stats = state.model_state["batch_stats"]
        hard = transforms.hard_quantize(state.params, quantizer, mask=mask)
        bn_batches = (
            normalize(splits.train.images[i * config.batch_size : (i + 1) * config.batch_size])
            for i in range(min(config.bn_reestimation_batches, steps_per_epoch))
        )
        reestimated = batchnorm.reestimate_batch_stats(
            lambda v, x, **kw: model.apply(v, x, train=True, **kw),
            {"params": hard, "batch_stats": batch_stats},
            bn_batches,
        )["batch_stats"]
        freeze_tx, freeze_opt_state = freeze_optimizer(inner, mask, state.opt_state[0], hard)
        frozen, freeze_history = train_phase(
            f"{name}_frozen",
            common.TrainState.create(
                hard,
                freeze_tx,
                key=common.phase_key(config.seed, f"{name}_frozen"),
                model_state={"batch_stats": reestimated},
                opt_state=freeze_opt_state,
            ),
            freeze_tx,
            config.quant.freeze_epochs,
        )
        changed = jax.tree.map(
            lambda a, b, m: m and bool(jnp.any(a != b)), hard, frozen.params, mask(hard)
        )
        if any(jax.tree.leaves(changed)):
            raise RuntimeError(f"{name}: the frozen phase changed quantized weights")
        final_batch_stats = frozen.model_state["batch_stats"]
        per_layer = metrics.sign_changes(state.params, warm_params, mask=mask)
        return {
            "reg": reg,
            "distance_to_quantized_set": float(
                transforms.quantization_error(state.params, quantizer, mask=mask)
            ),
            # At the end of training: θ itself (ProxQuant) or what the forward pass saw (q(θ)).
            "soft_test_accuracy": evaluate(
                splits.test, state.params if param_map is None else hard, batch_stats
            ),
            "hard_quantized_accuracy": evaluate(splits.test, hard, batch_stats),
            "bn_reestimated_accuracy": evaluate(splits.test, hard, reestimated),
            "final_valid_accuracy": evaluate(splits.valid, frozen.params, final_batch_stats),
            "final_accuracy": evaluate(splits.test, frozen.params, final_batch_stats),
            "sign_change": float(
                metrics.sign_change_fraction(state.params, warm_params, mask=mask)
            ),
            "sign_change_per_layer": {k: float(v) for k, v in per_layer.items()},
            "history": history,
            "frozen_history": freeze_history,
        }

    results = {
        "data_source": {split: getattr(splits, split).source for split in splits._fields},
        "examples": {split: len(getattr(splits, split).labels) for split in splits._fields},
        "steps_per_epoch": steps_per_epoch,
        "float": {
            "valid_accuracy": evaluate(splits.valid, warm_params, warm_batch_stats),
            "test_accuracy": evaluate(splits.test, warm_params, warm_batch_stats),
            "history": warm_history,
        },
        "methods": {},
    }
    for method in config.methods:
        runs = [quantized_training(method, reg) for reg in reg_candidates(config, method)]
        chosen = max(runs, key=lambda r: r["final_valid_accuracy"])  # ties: the first λ
        results["methods"][method] = {
            **chosen,
            "reg_choice": "validation" if len(runs) > 1 else "fixed",
            "reg_candidates": [{k: r[k] for k in ("reg", *CANDIDATE_FIELDS)} for r in runs],
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
    """Markdown: test accuracies (%) by stage, the λ used, validation accuracy, sign changes."""
    examples = results["examples"]
    lines = [
        f"{examples['train']} training / {examples['valid']} validation (held out of training) / "
        f"{examples['test']} test images ({results['data_source']['train']}). Test accuracy (%); "
        "λ chosen on the validation accuracy of the final model when several were tried.",
        "",
        "| method | λ | end of training (θ, or q(θ) for BinaryConnect) | hard-quantized "
        "| + BN re-estimated | + frozen phase (final) | final, validation "
        "| sign changes vs warm start |",
        "|---|---|---|---|---|---|---|---|",
        f"| float (warm start) | | {results['float']['test_accuracy']:.2f} | | | | "
        f"{results['float']['valid_accuracy']:.2f} | |",
    ]
    for method, r in results["methods"].items():
        reg = "" if r["reg"] is None else f"{r['reg']:g} ({r['reg_choice']})"
        lines.append(
            f"| {method} | {reg} | {r['soft_test_accuracy']:.2f} | "
            f"{r['hard_quantized_accuracy']:.2f} | {r['bn_reestimated_accuracy']:.2f} | "
            f"{r['final_accuracy']:.2f} | {r['final_valid_accuracy']:.2f} | "
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
