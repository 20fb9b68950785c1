"""A Llama-shaped model of ≥ 300 M parameters quantized end to end by the command line.

A random-init `qjax.models.llama.Llama` (default: width 1024, 24 blocks, SwiGLU 2816, 16 query
and 4 key/value heads, vocabulary 32,000, untied head: 336 M parameters) is written as a
float32 Hugging Face checkpoint (`llama.save_pretrained`: config.json + model.safetensors by
qjax's own safetensors writer), with `num_samples` × `seq_len` uniformly random token ids as
the calibration (a .npy; a random-init model has no language to calibrate on). Then, for each
method, `python -m qjax.llm.quantize` runs on it in its own process (signed int grid, `bits`,
groups of `group_size`, the head kept float) and the table gives

* wall: the whole command (Python and JAX start, reading the checkpoint, calibration,
  quantization, writing the compressed-tensors checkpoint);
* quantize: `quantize_seconds` of its report (the calibration forward passes, statistics and
  the method, compilation included);
* peak RSS: the quantize process's peak resident host memory (`ru_maxrss`, in its report),
  against the float32 weights' size and the cached block inputs of the block-wise schedule
  (X and X~ of every calibration token at the model's width: 2 · num_samples · seq_len · d · 4
  bytes); the largest block pass is the memory XLA plans for one block's compiled pass
  (its weights, cached inputs, outputs and temporaries; block-wise only).

    python -m benchmarks.llm_scale --workdir=/tmp/qjax/llm_scale --methods=gptq \
        --schedule=block_wise --out=results/llm_scale/results.md
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time

import numpy as np
from absl import app, flags
from flax import nnx

from experiments import common
from qjax.models import llama

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "/tmp/qjax/llm_scale", "Checkpoints, tokens and reports go here.")
flags.DEFINE_integer("hidden_size", 1024, "Model width d.")
flags.DEFINE_integer("num_hidden_layers", 24, "Decoder blocks.")
flags.DEFINE_integer("intermediate_size", 2816, "SwiGLU width.")
flags.DEFINE_integer("num_attention_heads", 16, "Query heads.")
flags.DEFINE_integer("num_key_value_heads", 4, "Key/value heads (grouped-query attention).")
flags.DEFINE_integer("vocab_size", 32_000, "Vocabulary (an untied head of the same size).")
flags.DEFINE_integer("num_samples", 64, "Calibration sequences.")
flags.DEFINE_integer("seq_len", 512, "Tokens per calibration sequence (the model's context).")
flags.DEFINE_integer("batch_size", 8, "Calibration sequences per batch.")
flags.DEFINE_list("methods", ["gptq"], "Methods, each one quantize command.")
flags.DEFINE_integer("bits", 4, "Bits b (2^b letters).")
flags.DEFINE_integer("group_size", 128, "Inputs per scale group.")
flags.DEFINE_string("schedule", None, "quantize's --schedule (unset: its automatic choice).")
flags.DEFINE_string("out", None, "Also write the table (Markdown, with the commands) here.")


def model_config() -> llama.LlamaConfig:
    """The flags' Llama shape, its context `seq_len`."""
    return llama.LlamaConfig(
        vocab_size=FLAGS.vocab_size,
        hidden_size=FLAGS.hidden_size,
        intermediate_size=FLAGS.intermediate_size,
        num_hidden_layers=FLAGS.num_hidden_layers,
        num_attention_heads=FLAGS.num_attention_heads,
        num_key_value_heads=FLAGS.num_key_value_heads,
        max_position_embeddings=FLAGS.seq_len,
    )


def write_checkpoint(path: str, config: llama.LlamaConfig, *, seed: int = 0) -> int:
    """A random-init float32 model of `config` saved at `path`; returns its parameter count."""
    model = llama.Llama(config, rngs=nnx.Rngs(params=seed))
    llama.save_pretrained(model, path)
    return sum(int(np.prod(v.get_value().shape)) for _, v in llama.parameters(model))


def quantize_command(model_dir: str, out_dir: str, tokens: str, method: str) -> list[str]:
    """The `qjax.llm.quantize` command line of one method."""
    command = [
        "python", "-m", "qjax.llm.quantize", f"--model_dir={model_dir}",
        f"--output_dir={out_dir}", f"--method={method}", f"--bits={FLAGS.bits}",
        f"--group_size={FLAGS.group_size}", "--grid=signed", f"--calibration={tokens}",
        f"--num_samples={FLAGS.num_samples}", f"--seq_len={FLAGS.seq_len}",
        f"--batch_size={FLAGS.batch_size}",
    ]  # fmt: skip
    if FLAGS.schedule:
        command.append(f"--schedule={FLAGS.schedule}")
    return command


def run_quantize(command: list[str], out_dir: str) -> dict:
    """Runs one quantize command in its own process; its wall time and report."""
    start = time.perf_counter()
    subprocess.run([sys.executable, *command[1:]], check=True)
    wall = time.perf_counter() - start
    with open(os.path.join(out_dir, "report.json")) as f:
        report = json.load(f)
    return {
        "method": report["spec"]["method"],
        "wall_seconds": wall,
        "load_seconds": report["load_seconds"],
        "quantize_seconds": report["quantize_seconds"],
        "peak_host_memory_bytes": report["peak_host_memory_bytes"],
        "float32_parameter_bytes": report["float32_parameter_bytes"],
        "layers": sum(layer["method"] != "skip" for layer in report["layers"]),
        "schedule": report["schedule"],
        "block_pass_bytes": max(
            (layer["block"]["memory_bytes"] for layer in report["layers"] if layer.get("block")),
            default=None,
        ),
        "command": shlex.join(command),
    }


def table(rows: list[dict], num_params: int, cache_bytes: int) -> str:
    """The measurements as Markdown, with the model, the machine and the commands."""
    mib = 2**20
    machine, lib = common.machine(), common.library()
    lines = [
        f"Random-init Llama: {num_params:,} parameters (d = {FLAGS.hidden_size}, "
        f"{FLAGS.num_hidden_layers} blocks, SwiGLU {FLAGS.intermediate_size}, "
        f"{FLAGS.num_attention_heads} query / {FLAGS.num_key_value_heads} key-value heads, "
        f"vocabulary {FLAGS.vocab_size:,}, untied head kept float), float32 checkpoint; "
        f"calibration {FLAGS.num_samples} × {FLAGS.seq_len} random tokens; W{FLAGS.bits} "
        f"signed, groups of {FLAGS.group_size}; schedule {FLAGS.schedule or 'automatic'}.",
        "",
        f"Machine: {machine['platform']}, {machine['cpu_count']} CPUs, JAX {machine['jax']} on "
        f"{', '.join(machine['devices'])}; qjax {lib['version']}, commit {lib['commit']}",
        "",
        "| method | schedule | layers | wall | load | quantize | peak RSS | float32 weights "
        "| cached block inputs | largest block pass | peak / weights |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        block = "–" if r["block_pass_bytes"] is None else f"{r['block_pass_bytes'] / mib:,.1f} MiB"
        lines.append(
            f"| {r['method']} | {r['schedule']} | {r['layers']} | {r['wall_seconds']:.0f} s "
            f"| {r['load_seconds']:.0f} s | {r['quantize_seconds']:.0f} s "
            f"| {r['peak_host_memory_bytes'] / mib:,.1f} MiB "
            f"| {r['float32_parameter_bytes'] / mib:,.1f} MiB | {cache_bytes / mib:,.1f} MiB "
            f"| {block} "
            f"| {r['peak_host_memory_bytes'] / r['float32_parameter_bytes']:.2f} |"
        )
    this = shlex.join(["python", "-m", "benchmarks.llm_scale", *sys.argv[1:]])
    lines += ["", "Commands:", "", f"    {this}"]
    lines += [f"    {r['command']}" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError("Too many command-line arguments.")
    config = model_config()
    os.makedirs(FLAGS.workdir, exist_ok=True)
    model_dir = os.path.join(FLAGS.workdir, "hf_model")
    num_params = write_checkpoint(model_dir, config)
    tokens = os.path.join(FLAGS.workdir, "calibration.npy")
    rng = np.random.default_rng(0)
    np.save(tokens, rng.integers(0, config.vocab_size, FLAGS.num_samples * (FLAGS.seq_len + 1)))
    cache_bytes = 2 * FLAGS.num_samples * FLAGS.seq_len * config.hidden_size * 4
    rows = []
    for method in FLAGS.methods:
        out_dir = os.path.join(FLAGS.workdir, f"{method}_w{FLAGS.bits}_g{FLAGS.group_size}")
        rows.append(run_quantize(quantize_command(model_dir, out_dir, tokens, method), out_dir))
    text = table(rows, num_params, cache_bytes)
    print(text)
    if FLAGS.out:
        os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
        with open(FLAGS.out, "w") as f:
            f.write(text)
        with open(os.path.splitext(FLAGS.out)[0] + ".json", "w") as f:
            json.dump(
                {
                    "num_params": num_params,
                    "cache_bytes": cache_bytes,
                    "rows": rows,
                    "machine": common.machine(),
                    "qjax": common.library(),
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    app.run(main)
