"""Benchmark of the deployable output: bytes and inference time, float32 against packed codes.

For each model (the paper-sized MNIST MLP, CIFAR-10 CNN, ResNet-20 and the PTB LSTM language
model) and each bit width, the kernels are fake-quantized (rounded to per-channel b-bit alphabets,
or ProxQuant's hard binary quantization for ResNet-20), exported with `qjax.export`, and compared
with the fake-quantized float model in this one run:

* bytes held in memory (all variables; and the quantized kernels alone: about bits/32, plus the
  scales), the compiled functions' argument bytes, and bytes on disk (orbax checkpoints);
* inference time of the jitted apply, packed against float, on this machine's default device;
* the largest |logit difference| and the agreement of the predicted classes (identical
  predictions mean identical accuracy).

    python -m benchmarks.export                       # all models, bits 1 2 4 8 (a few minutes)
    python -m benchmarks.export --models=mlp --bits=2 # one row
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags

from benchmarks import timing
from qjax import alphabets, export, prox, transforms
from qjax.models import cnn, lstm, mlp, resnet

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["mlp", "cnn", "resnet20", "lstm"], "Models to measure.")
flags.DEFINE_list("bits", ["1", "2", "4", "8"], "Bit widths of the per-channel alphabets.")
flags.DEFINE_integer("batch_size", 128, "Images (or token sequences) per inference call.")
flags.DEFINE_integer("repeats", 10, "Timed calls per measurement (the median is reported).")


@dataclasses.dataclass(frozen=True)
class Bench:
    """A model, its inputs, and the leaves it quantizes."""

    model: Any
    inputs: tuple[jax.Array, ...]
    kwargs: dict[str, Any]
    mask: Callable[[Any], Any]


def _images(shape):
    return (jax.random.normal(jax.random.key(0), shape),)


def make_bench(name: str, batch_size: int) -> Bench:
    kernels = export.kernel_mask
    if name == "mlp":
        return Bench(mlp.MLP(), _images((batch_size, 28, 28, 1)), {"train": False}, kernels)
    if name == "cnn":
        return Bench(cnn.CNN(), _images((batch_size, 32, 32, 3)), {"train": False}, kernels)
    if name == "resnet20":
        # ProxQuant's binary mode quantizes every conv and the classifier; the 1×1 shortcut
        # convolutions stay in float (its ternary mode also keeps the first and last layer).
        mask = transforms.mask_by_path(exclude=[".*shortcut.*"])
        return Bench(resnet.ResNet20(), _images((batch_size, 32, 32, 3)), {"train": False}, mask)
    if name == "lstm":
        model = lstm.LSTMLanguageModel(vocab_size=10_000)
        tokens = jax.random.randint(jax.random.key(0), (batch_size // 4, 35), 0, 10_000)
        return Bench(
            model, (tokens, model.initial_carry(tokens.shape[0])), {"train": False}, kernels
        )
    raise ValueError(f"unknown model {name!r}")


def fake_quantize(params, mask_tree, bits: int | None):
    """Kernels rounded to per-channel b-bit alphabets; bits=None: ProxQuant's hard binary q(θ)."""
    if bits is None:
        quantizer = prox.binary_quantizer(scale="channel")
        return transforms.hard_quantize(params, quantizer, mask=mask_tree)

    def quantize(w, selected):
        if not selected:
            return w
        return alphabets.for_weights(w, bits=bits, c=2.0, rule="max", per_channel=True).project(w)

    return jax.tree.map(quantize, params, mask_tree)


def median_time(fn, *args, repeats: int) -> float:
    return float(np.median(timing.wall_times(lambda: fn(*args), repeats=repeats)))


def directory_bytes(path: str) -> int:
    return sum(
        os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files
    )


def disk_bytes(save: Callable[[str], None]) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "checkpoint")
        save(path)
        return directory_bytes(path)


def measure(name: str, bits: int | None, batch_size: int, repeats: int) -> dict[str, Any]:
    bench = make_bench(name, batch_size)
    init = jax.jit(functools.partial(bench.model.init, **bench.kwargs))
    variables = init(jax.random.key(1), *bench.inputs)
    mask_tree = bench.mask(variables["params"])
    params = jax.jit(lambda p: fake_quantize(p, mask_tree, bits))(variables["params"])
    variables = {**variables, "params": params}
    packed = {**variables, "params": export.export_params(params, mask=mask_tree)}

    apply = functools.partial(bench.model.apply, **bench.kwargs)
    float_apply = jax.jit(apply)
    packed_apply = jax.jit(export.quantized_apply(apply))

    def logits(fn, tree):
        out = fn(tree, *bench.inputs)
        return out[0] if isinstance(out, tuple) else out  # the LSTM also returns its state

    float_logits, packed_logits = logits(float_apply, variables), logits(packed_apply, packed)
    float_memory = float_apply.lower(variables, *bench.inputs).compile().memory_analysis()
    packed_memory = packed_apply.lower(packed, *bench.inputs).compile().memory_analysis()

    input_bytes = export.tree_nbytes(bench.inputs)
    leaves = jax.tree.leaves(packed, is_leaf=export.is_quantized)
    quantized = [leaf for leaf in leaves if export.is_quantized(leaf)]
    kernel_float_bytes = sum(4 * int(np.prod(leaf.shape)) for leaf in quantized)
    kernel_packed_bytes = sum(int(leaf.packed.nbytes) for leaf in quantized)
    scale_bytes = sum(int(leaf.scale.nbytes) for leaf in quantized)

    def save_float(path):
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(os.path.abspath(path), variables)

    float_time = median_time(float_apply, variables, *bench.inputs, repeats=repeats)
    packed_time = median_time(packed_apply, packed, *bench.inputs, repeats=repeats)
    return {
        "model": name,
        "quantizer": "ProxQuant binary" if bits is None else f"{bits}-bit per channel",
        "bits": 1 if bits is None else bits,
        "memory_float": export.tree_nbytes(variables),
        "memory_packed": export.tree_nbytes(packed),
        "kernels_float": kernel_float_bytes,
        "kernels_packed": kernel_packed_bytes + scale_bytes,
        "scale_overhead": scale_bytes / kernel_packed_bytes,
        # The compiled functions' arguments, less the inputs: the weights the device holds.
        "arguments_float": float_memory.argument_size_in_bytes - input_bytes,
        "arguments_packed": packed_memory.argument_size_in_bytes - input_bytes,
        "temp_float": float_memory.temp_size_in_bytes,
        "temp_packed": packed_memory.temp_size_in_bytes,
        "disk_float": disk_bytes(save_float),
        "disk_packed": disk_bytes(lambda path: export.save(path, packed)),
        "time_float": float_time,
        "time_packed": packed_time,
        "max_logit_difference": float(jnp.max(jnp.abs(packed_logits - float_logits))),
        "prediction_agreement": float(
            jnp.mean(jnp.argmax(packed_logits, -1) == jnp.argmax(float_logits, -1))
        ),
    }


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f}"


def markdown(rows: list[dict[str, Any]]) -> str:
    header = (
        "| model | quantizer | kernels MB f32 → packed (ratio; bits/32) | scales / codes "
        "| all variables MB f32 → packed | jit weight arguments MB f32 → packed "
        "| disk MB f32 → packed | time ms f32 → packed (ratio) | max Δlogit | same class |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r['model']} | {r['quantizer']} "
        f"| {_mb(r['kernels_float'])} → {_mb(r['kernels_packed'])} "
        f"({r['kernels_packed'] / r['kernels_float']:.4f}; {r['bits'] / 32:.4f}) "
        f"| {100 * r['scale_overhead']:.2f}% "
        f"| {_mb(r['memory_float'])} → {_mb(r['memory_packed'])} "
        f"| {_mb(r['arguments_float'])} → {_mb(r['arguments_packed'])} "
        f"| {_mb(r['disk_float'])} → {_mb(r['disk_packed'])} "
        f"| {1e3 * r['time_float']:.2f} → {1e3 * r['time_packed']:.2f} "
        f"({r['time_packed'] / r['time_float']:.2f}) "
        f"| {r['max_logit_difference']:.1e} | {100 * r['prediction_agreement']:.1f}% |"
        for r in rows
    ]
    return header + "\n".join(lines)


def main(argv):
    del argv
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()})")
    rows = []
    for name in FLAGS.models:
        settings = [int(b) for b in FLAGS.bits] + ([None] if name == "resnet20" else [])
        for bits in settings:
            rows.append(measure(name, bits, FLAGS.batch_size, FLAGS.repeats))
            print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(markdown(rows))


if __name__ == "__main__":
    app.run(main)
