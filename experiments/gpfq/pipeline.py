"""The GPFQ experiment: train a float classifier, quantize it with GPFQ, MSQ and GPTQ over
alphabets and scale constants C, evaluate, and write results.json, results.md and plots.

Validation protocol: config.validation_size training images are held out of training (and of
calibration). For each method and alphabet the scale constant C is the one with the best
validation accuracy; the test accuracy is reported at that C. The best test accuracy over C (the
papers' protocol, which chooses C on the test set and so overstates accuracy) is reported in a
separate, labelled column for comparison with the published numbers.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Callable
from typing import NamedTuple

import jax
import ml_collections
import numpy as np
from absl import logging

import qjax
from experiments import common
from experiments.gpfq import plots, train


def level_label(num_letters: int) -> str:
    """ "ternary" for 3 letters, "b-bit" for 2^b letters, else "n letters"."""
    if num_letters == 3:
        return "ternary"
    bits = int(np.log2(num_letters))
    return f"{bits}-bit" if 2**bits == num_letters else f"{num_letters} letters"


def method_label(method: str) -> str:
    """ "GPFQ" for "gpfq", "GPFQ (channel neurons)" for "gpfq:channel"."""
    name, _, conv_neurons = method.partition(":")
    return name.upper() + (f" ({conv_neurons} neurons)" if conv_neurons else "")


def calibration_batches(splits: train.Splits, config: ml_collections.ConfigDict) -> list:
    """A fixed random subset of the training images, preprocessed, in batches."""
    n = min(config.calibration_size, len(splits.train.labels))
    index = np.sort(
        np.random.default_rng(config.calibration_seed).choice(
            len(splits.train.labels), n, replace=False
        )
    )
    images = train.preprocess(splits.train.images[index], config.dataset)
    step = config.calibration_batch_size
    return [images[i : i + step] for i in range(0, n, step)]


def quantize_and_evaluate(
    trained: train.TrainResult,
    splits: train.Splits,
    calibration: list,
    config: ml_collections.ConfigDict,
    *,
    method: str,
    num_letters: int,
    c: float,
) -> dict:
    """One quantized model: its validation and test accuracy (%) and per-layer report.

    `method` is a name of `qjax.methods`, optionally with the convolutions' neurons after a
    colon: "gpfq" (a neuron is an output channel over the whole kh·kw·cin patch) or
    "gpfq:channel" (the GPFQ paper's code: each (input channel, output channel) kh·kw filter is
    a neuron over that channel's patches), see `qjax.LayerSpec.conv_neurons`.
    """
    name, _, conv_neurons = method.partition(":")
    spec = qjax.LayerSpec(
        method=name,
        num_letters=num_letters,
        c=c,
        rule=config.rule,
        per_channel=config.per_channel,
        conv_neurons=conv_neurons or "patch",
    )
    start = time.perf_counter()
    variables, report = qjax.quantize_model(
        trained.model, trained.variables, calibration, spec=spec, progress=False
    )
    seconds = time.perf_counter() - start
    valid_accuracy = train.accuracy(trained.model, variables, splits.valid, config)
    test_accuracy = train.accuracy(trained.model, variables, splits.test, config)
    logging.info(
        "%s %s C=%g: validation %.2f%%, test %.2f%% (%.1fs)",
        method,
        level_label(num_letters),
        c,
        valid_accuracy,
        test_accuracy,
        seconds,
    )
    return {
        "method": method,
        "num_letters": num_letters,
        "level": level_label(num_letters),
        "c": c,
        "valid_accuracy": valid_accuracy,
        "test_accuracy": test_accuracy,
        "seconds": seconds,
        "layers": [  # the quantized and skipped layers, as plain numbers
            {k: v for k, v in r._asdict().items() if k != "alphabet"}
            for r in report
            if r.method != "not reached"
        ],
    }


# Config fields that only say which quantized models the sweep holds: a model kept in the
# workdir stays valid when they change (a larger grid computes only the models it lacks).
GRID_FIELDS = ("methods", "num_letters", "c_values", "width_scales", "width_num_letters")


class SeedRun(NamedTuple):
    """One seed's float model, data and calibration sample, and where its models are kept."""

    config: ml_collections.ConfigDict
    work: common.Workdir
    splits: train.Splits
    trained: train.TrainResult
    calibration: list


def sweep(
    runs: list[SeedRun],
    config: ml_collections.ConfigDict,
    *,
    methods: tuple[str, ...],
    levels: tuple[int, ...],
    width_scale: float = 1.0,
) -> list[list[dict]]:
    """Every (method, alphabet, C) of the grid for each seed's model, each model's row kept in
    its workdir's sweep/.

    The grid is the outer loop and the seeds the inner one, so that the seeds' models (same
    shapes, same spec) reuse one compiled quantization pass. A rerun (after a kill, or with
    more methods, alphabets or C values under `config.allow_config_change`) reads the rows it
    has and computes only the others. A row is found again only under the same config (all
    fields but `GRID_FIELDS`), model width and qjax (version and commit,
    `common.library_key`).

    Returns:
      For each run, its rows in grid order.
    """
    keys = []
    for run in runs:
        os.makedirs(run.work.file("sweep"), exist_ok=True)
        fingerprint = common.fingerprint(run.config, ignore=GRID_FIELDS)[:16]
        keys.append(fingerprint + "_" + common.library_key())
    rows, reused = [[] for _ in runs], 0
    for method, n, c in itertools.product(methods, levels, config.c_values):
        for i, (run, key) in enumerate(zip(runs, keys, strict=True)):
            name = f"{method.replace(':', '-')}_{n}_c{c:g}_w{width_scale:g}_{key}.json"
            path = os.path.join(run.work.file("sweep"), name)
            if os.path.exists(path):
                with open(path) as file:
                    text = file.read()
                reused += 1
            else:
                row = quantize_and_evaluate(
                    run.trained,
                    run.splits,
                    run.calibration,
                    run.config,
                    method=method,
                    num_letters=n,
                    c=c,
                )
                text = json.dumps(row)
                with open(path + ".tmp", "w") as file:  # whole or absent, even if killed here
                    file.write(text)
                os.replace(path + ".tmp", path)
            rows[i].append(json.loads(text))  # a new row reads as a reused one (tuples as lists)
    if reused:
        logging.info(
            "%d of %d quantized models read from the workdirs", reused, sum(map(len, rows))
        )
    return rows


def choose(rows: list[dict], method: str, num_letters: int, *, by: str) -> dict:
    """The row of (method, alphabet) with the highest `by` accuracy; ties go to the first C.

    Args:
      rows: the sweep.
      method, num_letters: which grid line.
      by: "valid_accuracy" (the choice the results report) or "test_accuracy" (the papers'
        best-over-C on the test set, reported separately for comparison only).
    """
    candidates = [r for r in rows if r["method"] == method and r["num_letters"] == num_letters]
    return max(candidates, key=lambda r: r[by])


def with_seed(config: ml_collections.ConfigDict, seed: int) -> ml_collections.ConfigDict:
    """The config of one seed: `seed` draws the float training (initialization, batch order),
    the validation hold-out and the calibration sample."""
    seeded = ml_collections.ConfigDict(config.to_dict())
    seeded.seed = seed
    seeded.calibration_seed = seed
    seeded.seeds = ()
    return seeded


def seeds_summary(
    runs: list[SeedRun], all_rows: list[list[dict]], methods: tuple[str, ...], levels: tuple
) -> dict:
    """Test accuracy over the seeds, each at the C its own validation split chose."""
    return {
        "seeds": [run.config.seed for run in runs],
        "float": common.mean_std([run.trained.test_accuracy for run in runs]),
        "chosen_on_valid": {
            m: [
                {
                    "level": level_label(n),
                    "c": [choose(rows, m, n, by="valid_accuracy")["c"] for rows in all_rows],
                    **common.mean_std(
                        [
                            choose(rows, m, n, by="valid_accuracy")["test_accuracy"]
                            for rows in all_rows
                        ]
                    ),
                }
                for n in levels
            ]
            for m in methods
        },
    }


def run(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    on_checkpoint: Callable[[str, int], None] | None = None,
) -> dict:
    """Runs the whole experiment and writes its outputs into `workdir`.

    Args:
      config: the experiment's config (configs/*.py).
      workdir: checkpoints and results; a rerun resumes from it (same config only).
      on_checkpoint: called as (phase, epoch) after every saved epoch (see `common.Workdir`).

    Returns:
      The results dictionary also written to `workdir/results.json`.
    """
    work = common.open_workdir(config, workdir, on_checkpoint=on_checkpoint)
    start = time.perf_counter()
    seeds = tuple(config.seeds) or (config.seed,)
    runs = []
    for seed in seeds:
        seeded = with_seed(config, seed)
        # Several seeds: each has its own workdir (checkpoints, sweep rows) inside this one.
        seed_work = (
            work
            if len(seeds) == 1
            else common.open_workdir(seeded, work.file(f"seed_{seed}"), on_checkpoint=on_checkpoint)
        )
        splits = train.load_splits(seeded)
        trained = train.train_and_evaluate(seeded, seed_work, splits=splits)
        runs.append(
            SeedRun(seeded, seed_work, splits, trained, calibration_batches(splits, seeded))
        )
    methods, levels = tuple(config.methods), tuple(config.num_letters)
    all_rows = sweep(runs, config, methods=methods, levels=levels)
    first, rows = runs[0], all_rows[0]
    splits, trained, calibration = first.splits, first.trained, first.calibration
    summary = ("level", "c", "valid_accuracy", "test_accuracy")
    # Per-layer errors at the coarsest alphabet, where the methods differ most.
    error_level = levels[0]
    results = {
        "title": f"{config.dataset} {config.model}",
        "dataset": config.dataset,
        "data_source": {
            split: getattr(splits, split).source for split in ("train", "valid", "test")
        },
        "train_examples": len(splits.train.labels),
        "valid_examples": len(splits.valid.labels),
        "test_examples": len(splits.test.labels),
        "calibration_examples": sum(len(b) for b in calibration),
        "seed": seeds[0],
        "float_valid_accuracy": trained.valid_accuracy,
        "float_accuracy": trained.test_accuracy,
        "level_labels": [level_label(n) for n in levels],
        "chosen_on_valid": {
            m: [{k: choose(rows, m, n, by="valid_accuracy")[k] for k in summary} for n in levels]
            for m in methods
        },
        "best_on_test": {
            m: [{k: choose(rows, m, n, by="test_accuracy")[k] for k in summary} for n in levels]
            for m in methods
        },
        "layer_errors_level": level_label(error_level),
        "layer_errors": {
            m: choose(rows, m, error_level, by="valid_accuracy")["layers"] for m in methods
        },
        "sweep": rows,
        "width": [],
        "width_level": level_label(config.width_num_letters),
    }
    if len(seeds) > 1:
        results["seeds"] = seeds_summary(runs, all_rows, methods, levels)
    for scale in config.width_scales:
        wide = train.train_and_evaluate(first.config, first.work, splits=splits, width_scale=scale)
        [wide_rows] = sweep(
            [first._replace(trained=wide)],
            config,
            methods=("gpfq", "msq"),
            levels=(config.width_num_letters,),
            width_scale=scale,
        )
        chosen = {
            m: choose(wide_rows, m, config.width_num_letters, by="valid_accuracy")
            for m in ("gpfq", "msq")
        }
        results["width"].append(
            {
                "width_scale": scale,
                "hidden": list(wide.model.hidden),
                "float_accuracy": wide.test_accuracy,
                **{m: {"c": r["c"], "accuracy": r["test_accuracy"]} for m, r in chosen.items()},
            }
        )
    results["total_seconds"] = time.perf_counter() - start
    return write_outputs(results, config, work)


def seeds_markdown(seeds: dict, labels: list[str]) -> list[str]:
    """The table of means ± standard deviations over the seeds."""
    n, f = len(seeds["seeds"]), seeds["float"]
    lines = [
        f"Over {n} seeds ({', '.join(map(str, seeds['seeds']))}: each seed draws the float "
        "training, the validation hold-out and the calibration sample), test accuracy (%), mean ± "
        "standard deviation over the seeds, each seed at the C its validation split chose. The "
        "test images are the same for every seed.",
        "",
        "| method | " + " | ".join(labels) + " |",
        "|---" * (len(labels) + 1) + "|",
        f"| float | {f['mean']:.2f} ± {f['std']:.2f} |" + " |" * (len(labels) - 1),
    ]
    for method, cells in seeds["chosen_on_valid"].items():
        text = [f"{c['mean']:.2f} ± {c['std']:.2f}" for c in cells]
        lines.append(f"| {method_label(method)} | " + " | ".join(text) + " |")
    return lines


def markdown(results: dict, config: ml_collections.ConfigDict) -> str:
    """The results as Markdown tables."""
    sources = results["data_source"]
    source = sources["train"] if len(set(sources.values())) == 1 else str(sources)
    labels = results["level_labels"]
    lines = [
        f"### {results['title']}: {results['train_examples']} train / "
        f"{results['valid_examples']} validation (held out of train) / "
        f"{results['test_examples']} test images ({source}), "
        f"{results['calibration_examples']} calibration images (from train)",
        "",
        f"Float accuracy: validation {results['float_valid_accuracy']:.2f} %, test "
        f"{results['float_accuracy']:.2f} %. Quantized (all layers, alphabet "
        f"C·{config.rule}|W|·linspace(-1, 1, n), C from {list(config.c_values)}), test accuracy "
        "(%) at the C chosen on the validation split; in brackets, the best test accuracy over "
        "C (the papers' protocol: C chosen on the test set, optimistic, for comparison only):",
        "",
        "| method | " + " | ".join(labels) + " |",
        "|---" * (len(labels) + 1) + "|",
    ]
    if "seeds" in results:  # the seeds' table first; the tables below are the first seed's
        lines[2:2] = [*seeds_markdown(results["seeds"], labels), "", f"Seed {results['seed']}:"]
    for method, rows in results["chosen_on_valid"].items():
        cells = [
            f"{r['test_accuracy']:.2f} (C={r['c']:g}) [{b['test_accuracy']:.2f}, C={b['c']:g}]"
            for r, b in zip(rows, results["best_on_test"][method], strict=True)
        ]
        lines.append(f"| {method_label(method)} | " + " | ".join(cells) + " |")
    ternary = [r for r in results["sweep"] if r["num_letters"] == 3]
    if ternary:
        cs = list(config.c_values)
        lines += [
            "",
            "Ternary, accuracy (%) by C, validation / test:",
            "",
            "| C | " + " | ".join(f"{c:g}" for c in cs) + " |",
            "|---" * (len(cs) + 1) + "|",
        ]
        for method in results["chosen_on_valid"]:
            acc = {r["c"]: r for r in ternary if r["method"] == method}
            cells = [f"{acc[c]['valid_accuracy']:.2f} / {acc[c]['test_accuracy']:.2f}" for c in cs]
            lines.append(f"| {method_label(method)} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Per-layer relative error ||XW − X~Q|| / ||XW||, {results['layer_errors_level']}, "
        "C chosen on validation:",
        "",
        "| layer | " + " | ".join(method_label(m) for m in results["layer_errors"]) + " |",
        "|---" * (len(results["layer_errors"]) + 1) + "|",
    ]
    per_method = list(results["layer_errors"].values())
    for i, layer in enumerate(per_method[0]):
        cells = [
            ("float" if lay[i]["relative_error"] is None else f"{lay[i]['relative_error']:.3f}")
            for lay in per_method
        ]
        lines.append(f"| {layer['path']} | " + " | ".join(cells) + " |")
    if results["width"]:
        lines += [
            "",
            f"Width decay ({results['width_level']}, C chosen on validation): test accuracy (%)",
            "",
            "| hidden widths | float | GPFQ | MSQ | GPFQ drop | MSQ drop |",
            "|---|---|---|---|---|---|",
        ]
        for row in results["width"]:
            f, hidden = row["float_accuracy"], "→".join(map(str, row["hidden"]))
            lines.append(
                f"| {hidden} | {f:.2f} | {row['gpfq']['accuracy']:.2f} | "
                f"{row['msq']['accuracy']:.2f} | {f - row['gpfq']['accuracy']:.2f} | "
                f"{f - row['msq']['accuracy']:.2f} |"
            )
    models = results["sweep"]
    lines += [
        "",
        f"Total time: {results['total_seconds'] / 60:.1f} min for this run "
        f"({jax.device_count()} {jax.devices()[0].platform} device); quantizing and evaluating "
        f"the grid's {len(models)} models took {sum(r['seconds'] for r in models) / 60:.1f} min, "
        "counting those an earlier run of this workdir computed (workdir/sweep).",
    ]
    return "\n".join(lines) + "\n"


def write_outputs(results: dict, config: ml_collections.ConfigDict, work: common.Workdir) -> dict:
    """results.json, results.md and the PNG plots; returns what results.json holds."""
    table = markdown(results, config)
    prefix = work.file(f"{config.dataset}_{config.model}")
    plots.accuracy_vs_levels(results, f"{prefix}_accuracy_vs_bits.png")
    plots.layer_errors(results, f"{prefix}_layer_error.png")
    coarsest = results["sweep"][0]["num_letters"]
    plots.accuracy_vs_c(results, coarsest, f"{prefix}_accuracy_vs_c.png")
    if results["width"]:
        plots.width_decay(results, f"{prefix}_width_decay.png")
    print(table)
    return common.write_results(work, results, table, config)
