"""The export experiment: a trained, quantized classifier → packed codes → evaluation.

For each alphabet of `config.export_num_letters`: quantize the trained float model with
`qjax.quantize_model`, save the fake-quantized variables (an orbax checkpoint, as any quantization
run would leave), export that checkpoint with `qjax.export.export_params`, save the packed tree
with `qjax.export.save`, restore it, and evaluate it with the jitted `quantized_apply`, next to
the fake-quantized float model: accuracies, identical predictions, bytes in memory and on disk.
"""

from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import matplotlib
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

import qjax
from experiments import common
from experiments.gpfq import pipeline as gpfq_pipeline
from experiments.gpfq import train
from qjax import data, export

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def directory_bytes(path: str) -> int:
    """Bytes of all files under `path`."""
    return sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(path)
        for name in names
    )


def evaluate(model, variables, packed, dataset: data.ImageDataset, config) -> dict:
    """Accuracy of the fake-quantized float model and of the packed model, on the same batches."""
    apply = functools.partial(model.apply, train=False)
    float_apply, packed_apply = jax.jit(apply), jax.jit(export.quantized_apply(apply))
    float_correct = packed_correct = same = 0
    max_difference = 0.0
    for images, labels in data.image_batches(dataset, config.eval_batch_size):
        images = train.preprocess(images, config.dataset)
        float_logits = float_apply(variables, images)
        packed_logits = packed_apply(packed, images)
        float_predictions = jnp.argmax(float_logits, -1)
        packed_predictions = jnp.argmax(packed_logits, -1)
        float_correct += int(jnp.sum(float_predictions == labels))
        packed_correct += int(jnp.sum(packed_predictions == labels))
        same += int(jnp.sum(float_predictions == packed_predictions))
        max_difference = max(max_difference, float(jnp.max(jnp.abs(packed_logits - float_logits))))
    n = len(dataset.labels)
    return {
        "fake_quant_accuracy": 100.0 * float_correct / n,
        "packed_accuracy": 100.0 * packed_correct / n,
        "same_predictions": 100.0 * same / n,
        "max_logit_difference": max_difference,
    }


def export_checkpoint(model, checkpoint: str, workdir: str, name: str, dataset, config) -> dict:
    """Exports one checkpoint of quantized float variables and evaluates the packed model."""
    variables = ocp.StandardCheckpointer().restore(checkpoint)
    packed = export.export_params(variables)
    packed_path = os.path.join(workdir, "checkpoints", f"packed_{name}")
    export.save(packed_path, packed, force=True)
    restored = export.restore(packed_path)
    leaves = jax.tree.leaves(restored, is_leaf=export.is_quantized)
    quantized = [leaf for leaf in leaves if export.is_quantized(leaf)]
    row = {
        "name": name,
        "bits": sorted({leaf.bits for leaf in quantized}),
        "quantized_layers": len(quantized),
        "memory_float_bytes": export.tree_nbytes(variables),
        "memory_packed_bytes": export.tree_nbytes(restored),
        "kernel_float_bytes": sum(4 * int(np.prod(leaf.shape)) for leaf in quantized),
        "kernel_packed_bytes": sum(int(leaf.packed.nbytes) for leaf in quantized),
        "scale_bytes": sum(int(leaf.scale.nbytes) for leaf in quantized),
        "disk_float_bytes": directory_bytes(checkpoint),
        "disk_packed_bytes": directory_bytes(packed_path),
        **evaluate(model, variables, restored, dataset, config),
    }
    logging.info("%s: %s", name, row)
    return row


def export_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs the experiment and writes results.json, results.md and a bytes plot into `workdir`.

    Returns:
      The results dictionary also written to `workdir/results.json`.
    """
    work = common.open_workdir(config, workdir)
    workdir = work.path
    start = time.perf_counter()
    splits = train.load_splits(config)
    model = train.create_model(config)
    checkpoints = {}
    float_accuracy = None
    if config.quantized_checkpoint:
        checkpoints["given"] = os.path.abspath(config.quantized_checkpoint)
    else:
        trained = train.train_and_evaluate(config, work, splits=splits)
        float_accuracy = trained.test_accuracy
        calibration = gpfq_pipeline.calibration_batches(splits, config)
        for num_letters in config.export_num_letters:
            spec = qjax.LayerSpec(
                method=config.export_method,
                num_letters=num_letters,
                c=config.export_c,
                rule=config.rule,
                per_channel=config.per_channel,
            )
            variables, _ = qjax.quantize_model(
                trained.model, trained.variables, calibration, spec=spec, progress=False
            )
            name = f"{config.export_method}_{gpfq_pipeline.level_label(num_letters)}"
            path = os.path.join(workdir, "checkpoints", f"quantized_{name}")
            with ocp.StandardCheckpointer() as checkpointer:
                checkpointer.save(path, variables, force=True)
            checkpoints[name] = path
    rows = [
        export_checkpoint(model, path, workdir, name, splits.test, config)
        for name, path in checkpoints.items()
    ]
    results = {
        "dataset": config.dataset,
        "model": config.model,
        "data_source": {split: getattr(splits, split).source for split in splits._fields},
        "test_examples": len(splits.test.labels),
        "float_accuracy": float_accuracy,
        "rows": rows,
        "total_seconds": time.perf_counter() - start,
    }
    return write_outputs(results, config, work)


def markdown(results: dict) -> str:
    """The results as a Markdown table."""
    mb = lambda n: f"{n / 2**20:.3f}"
    lines = [
        f"Export of the {results['dataset']} {results['model']} "
        f"({results['test_examples']} test images, {results['data_source']['test']}); "
        f"float accuracy: {results['float_accuracy']}",
        "",
        "| quantized model | bits | fake-quant acc. % | packed acc. % | same predictions % "
        "| max Δlogit | memory MB f32 → packed | kernels MB f32 → codes + scales "
        "| disk MB f32 → packed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['name']} | {', '.join(map(str, r['bits']))} "
            f"| {r['fake_quant_accuracy']:.2f} | {r['packed_accuracy']:.2f} "
            f"| {r['same_predictions']:.1f} | {r['max_logit_difference']:.1e} "
            f"| {mb(r['memory_float_bytes'])} → {mb(r['memory_packed_bytes'])} "
            f"| {mb(r['kernel_float_bytes'])} → {mb(r['kernel_packed_bytes'])} + "
            f"{mb(r['scale_bytes'])} "
            f"| {mb(r['disk_float_bytes'])} → {mb(r['disk_packed_bytes'])} |"
        )
    return "\n".join(lines) + "\n"


def plot_bytes(results: dict, path: str) -> None:
    """Bar chart: bytes of the variables in memory and on disk, float32 against packed."""
    rows = results["rows"]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(1.8 * len(rows) + 3, 3.5))
    bars = (
        ("memory, float32", "memory_float_bytes"),
        ("memory, packed", "memory_packed_bytes"),
        ("disk, float32 (orbax)", "disk_float_bytes"),
        ("disk, packed (orbax)", "disk_packed_bytes"),
    )
    for i, (label, key) in enumerate(bars):
        ax.bar(x + (i - 1.5) * 0.2, [r[key] / 2**20 for r in rows], 0.2, label=label)
    ax.set_xticks(x, [r["name"] for r in rows])
    ax.set_yscale("log")
    ax.set_ylabel("MB")
    ax.set_title(f"{results['dataset']} {results['model']}: float32 vs packed codes")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(results: dict, config: ml_collections.ConfigDict, work: common.Workdir) -> dict:
    """results.json, results.md and bytes.png; returns what results.json holds."""
    table = markdown(results)
    plot_bytes(results, work.file("bytes.png"))
    print(table)
    return common.write_results(work, results, table, config)
