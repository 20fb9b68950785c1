"""Estimate an experiment's run time from a few timed steps, without running it.

    python -m experiments.time_steps --experiment=gpfq \
        --config=experiments/gpfq/configs/cifar10.py:medium
    python -m experiments.time_steps --experiment=proxquant \
        --config=experiments/proxquant/configs/medium.py
    python -m experiments.time_steps --experiment=ptb --config=experiments/ptb/configs/medium.py

Each kind of step the experiment runs (its own jitted train steps, built by the experiment's
functions, on random data of the config's shapes; the evaluation forward pass; for GPFQ one
`qjax.quantize_model` call) is compiled, then timed `--repeats` times; the median is multiplied
by the number of such steps the config asks for. Nothing else (data loading, checkpoints,
BatchNorm re-estimation, plots) is counted, so the estimate is a lower bound on a quiet machine.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags
from ml_collections import config_flags

import qjax
from benchmarks import timing
from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_enum("experiment", None, ["gpfq", "proxquant", "ptb"], "Which experiment.")
flags.DEFINE_integer("repeats", 5, "Timed calls of each kind of step (the median is used).")
config_flags.DEFINE_config_file("config", None, "The experiment's configuration file.")
flags.mark_flags_as_required(["experiment", "config"])


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of fn() (its outputs awaited), after one untimed call that compiles."""
    return float(np.median(timing.wall_times(fn, repeats=repeats)))


def random_images(n: int, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """n random uint8 images of `shape` and int32 labels in 0..9."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8), rng.integers(0, 10, n, np.int32)


def batches_of(n: int, batch_size: int) -> int:
    return -(-n // batch_size)


Row = tuple[str, int, float]  # what, how many, seconds each


def estimate_gpfq(config: ml_collections.ConfigDict, repeats: int) -> list[Row]:
    """Float epochs (with validation), then the sweep of quantized models."""
    from experiments.gpfq import train

    shape = {"mnist": (28, 28, 1), "cifar10": (32, 32, 3)}[config.dataset]
    full_train = {"mnist": 60_000, "cifar10": 50_000}[config.dataset]
    train_size = (config.max_train_examples or full_train) - config.validation_size
    test_size = config.max_test_examples or 10_000
    steps_per_epoch = train_size // config.batch_size
    model = train.create_model(config)
    images, labels = random_images(config.batch_size, shape)
    state, step = train.float_phase(config, model, "float", images[:2], steps_per_epoch)
    variables = {"params": state.params, **state.model_state}
    evaluate = common.classifier_accuracy(
        model, train.NORMALIZERS[config.dataset], batch_size=config.eval_batch_size
    )
    eval_images, eval_labels = random_images(config.eval_batch_size, shape)
    eval_batch = median_seconds(lambda: evaluate(variables, eval_images, eval_labels), repeats)
    calibration = train.preprocess(random_images(config.calibration_size, shape)[0], config.dataset)
    chunk = config.calibration_batch_size
    batches = [calibration[i : i + chunk] for i in range(0, len(calibration), chunk)]
    spec = qjax.LayerSpec(method="gpfq", num_letters=3, c=3.0, rule=config.rule)
    quantize = lambda: qjax.quantize_model(model, variables, batches, spec=spec, progress=False)[0]
    models = len(config.methods) * len(config.num_letters) * len(config.c_values)
    per_model = batches_of(config.validation_size, config.eval_batch_size) + batches_of(
        test_size, config.eval_batch_size
    )
    return [
        (
            "float train step",
            config.epochs * steps_per_epoch,
            median_seconds(lambda: step(state, (images, labels)), repeats),
        ),
        (
            "evaluation batch, validation after each epoch",
            config.epochs * batches_of(config.validation_size, config.eval_batch_size),
            eval_batch,
        ),
        ("quantize_model (GPFQ; MSQ and GPTQ counted alike)", models, median_seconds(quantize, 1)),
        ("evaluation batch, each quantized model", models * per_model, eval_batch),
    ]


def estimate_proxquant(config: ml_collections.ConfigDict, repeats: int) -> list[Row]:
    """Warm start, then every method's quantized and frozen epochs (first λ of each)."""
    from experiments.proxquant import train
    from qjax.models import resnet

    steps_per_epoch = (config.train_size - config.validation_size) // config.batch_size
    model = resnet.CIFARResNet(depth=config.depth)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    batch = random_images(config.batch_size, (32, 32, 3))
    key = jax.random.key(0)
    model_state = {"batch_stats": variables["batch_stats"]}

    def step_seconds(tx, **kwargs) -> float:
        state = common.TrainState.create(variables["params"], tx, key=key, model_state=model_state)
        step = train.make_train_step(model, tx, **kwargs)
        return median_seconds(lambda: step(state, batch), repeats)

    warm = step_seconds(train.warm_start_optimizer(config, steps_per_epoch))
    rows = [("warm-start train step", config.warm.epochs * steps_per_epoch, warm)]
    for method in config.methods:
        _, mask = train.quantizer_and_mask(config, method)
        reg = train.reg_candidates(config, method)[0]
        inner, last = train.quantization_optimizer(config, method, steps_per_epoch, reg)
        seconds = step_seconds(
            optax.chain(inner, last),
            param_map=train.method_param_map(config, method),
            metrics_fn=lambda s, m=mask: {
                "sign_change": qjax.metrics.sign_change_fraction(s.params, s.params, mask=m)
            },
        )
        runs = len(train.reg_candidates(config, method))
        rows.append((f"{method} train step", runs * config.quant.epochs * steps_per_epoch, seconds))
        rows.append(
            (
                "frozen train step (as warm)",
                runs * config.quant.freeze_epochs * steps_per_epoch,
                warm,
            )
        )
    evaluate = common.classifier_accuracy(model, train.normalize, batch_size=config.eval_batch_size)
    images, labels = random_images(config.eval_batch_size, (32, 32, 3))
    epochs = config.warm.epochs + sum(
        len(train.reg_candidates(config, m)) * (config.quant.epochs + config.quant.freeze_epochs)
        for m in config.methods
    )
    rows.append(
        (
            "evaluation batch (validation after each epoch; test per model)",
            epochs * batches_of(config.validation_size, config.eval_batch_size)
            + 4 * len(config.methods) * batches_of(config.test_size, config.eval_batch_size),
            median_seconds(lambda: evaluate(variables, images, labels), repeats),
        )
    )
    return rows


def estimate_ptb(config: ml_collections.ConfigDict, repeats: int) -> list[Row]:
    """Float epochs, then every (bits, method, λ) epoch, with validation after each epoch."""
    from experiments.ptb import train
    from qjax.models import lstm

    vocab, train_tokens, valid_tokens, test_tokens = {
        "ptb": (10_000, 929_589, 73_760, 82_430),  # the splits' tokens, <eos> included
        "synthetic": (50, 4000, 1000, 1000),
    }[config.dataset]
    train_tokens = config.train_tokens or train_tokens
    quant_tokens = config.quant_train_tokens or train_tokens
    valid_tokens = config.valid_tokens or valid_tokens
    windows = lambda tokens, batch: (tokens // batch - 1) // config.bptt
    model = lstm.LSTMLanguageModel(
        vocab_size=vocab,
        embed_dim=config.embed_dim,
        hidden_dim=config.hidden_dim,
        dropout_rate=config.dropout_rate,
        tied=config.tied,
    )
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, (config.batch_size, config.bptt), dtype=np.int32)
    batch = (tokens, tokens, True)
    params = model.init(jax.random.key(0), tokens[:1], model.initial_carry(1), train=False)[
        "params"
    ]

    def step_seconds(tx, param_map=None) -> float:
        state = common.TrainState.create(
            params, tx, key=jax.random.key(0), model_state=model.initial_carry(config.batch_size)
        )
        step = common.make_train_step(train.language_model_loss(model, param_map), tx)
        return median_seconds(lambda: step(state, batch), repeats)

    quant_steps = config.quant_epochs * windows(quant_tokens, config.batch_size)
    rows = [
        (
            "float train step",
            config.warm_epochs * windows(train_tokens, config.batch_size),
            step_seconds(train.make_optimizer(config)),
        )
    ]
    for bits in config.bits:
        pairs = train.quantizers_and_masks(bits)
        if "proxquant" in config.methods:
            tx = train.make_optimizer(config, pairs, steps_per_epoch=1, reg=config.reg_values[0])
            rows.append(
                (
                    f"ProxQuant {bits}-bit train step",
                    len(config.reg_values) * quant_steps,
                    step_seconds(tx),
                )
            )
        if "straight_through" in config.methods:
            param_map = lambda p, pairs=pairs: train.straight_through_all(p, pairs)
            rows.append(
                (
                    f"straight-through {bits}-bit train step",
                    quant_steps,
                    step_seconds(train.make_optimizer(config), param_map),
                )
            )
    evaluate = train.make_evaluate(
        model, rng.integers(0, vocab, (config.bptt + 1) * config.eval_batch_size), config
    )
    phases = config.warm_epochs + len(config.bits) * (
        ("proxquant" in config.methods) * len(config.reg_values) * config.quant_epochs
        + ("straight_through" in config.methods) * config.quant_epochs
    )
    rows.append(
        (
            "evaluation window (validation after each epoch; validation + test per model)",
            phases * windows(valid_tokens, config.eval_batch_size)
            + (len(rows) - 1) * windows(valid_tokens + test_tokens, config.eval_batch_size),
            median_seconds(lambda: evaluate(params), repeats),
        )
    )
    return rows


ESTIMATES = {"gpfq": estimate_gpfq, "proxquant": estimate_proxquant, "ptb": estimate_ptb}


def main(argv):
    del argv
    rows = ESTIMATES[FLAGS.experiment](FLAGS.config, FLAGS.repeats)
    info = common.machine()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"{FLAGS.experiment}: {info['platform']}, {info['cpu_count']} CPUs, "
        f"{', '.join(info['devices'])}, load average {load:.1f} while timing"
    )
    print("| step | count | seconds each | minutes |\n|---|---|---|---|")
    total = 0.0
    for what, count, seconds in rows:
        total += count * seconds
        print(f"| {what} | {count} | {seconds:.3f} | {count * seconds / 60:.1f} |")
    print(f"| **total** | | | **{total / 60:.0f}** |")


if __name__ == "__main__":
    app.run(main)
