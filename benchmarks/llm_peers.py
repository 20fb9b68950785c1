"""qjax against llm-compressor on one Llama-family checkpoint: GPTQ W4A16, group 128.

The same Hugging Face checkpoint and the same calibration windows (`qjax.llm.pipeline.
calibration_batches`: `num_samples` random windows of PTB's training split) go through

* llm-compressor: `oneshot` with `GPTQModifier(scheme="W4A16", targets="Linear",
  ignore=["lm_head"])` on PyTorch CPU (symmetric int4, groups of 128, its default observer and
  dampening), then `save_pretrained(save_compressed=True)`;
* qjax: `qjax.llm.pipeline.quantize_checkpoint` (the library function of `python -m
  qjax.llm.quantize`) with GPTQ, GPFQ and Qronos on the same grid (signed int4, groups of 128,
  absmax scales: C = 1), sequential, writing pack-quantized compressed-tensors checkpoints.

Every checkpoint, the float one included, is then evaluated by the same PyTorch code:
`transformers.AutoModelForCausalLM.from_pretrained(dir)` and the standard protocol
(non-overlapping windows of seq_len tokens of PTB's test split, each scored on its seq_len - 1
next-token predictions, perplexity = exp of the mean NLL).

What each time includes: llm-compressor's is the `oneshot` call (its calibration forward passes,
Hessian accumulation, GPTQ and the scales; the model already loaded; saving excluded). qjax's
is `quantize_seconds` of `quantize_checkpoint` (the calibration forward passes, the Hessians
or GPFQ's accumulators, the method and the scales, JIT compilation included; loading and saving
excluded); GPTQ runs twice in this process, the second ("warm") reusing the compiled programs.

    python -m benchmarks.llm_peers --model_dir=/tmp/qjax/llm_ptb/hf_model \
        --workdir=/tmp/qjax/llm_peers --out=results/llm_ptb/peers.md

Without `--model_dir` (or if it does not exist) a random-init model of experiments/llm's PTB
shape is saved and used. llm-compressor is an optional extra (`pip install 'qjax[llm-peers]'`,
in its own environment: it pins transformers and compressed-tensors); without it the benchmark
says so and exits.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
import time

import numpy as np
from absl import app, flags

import qjax
from experiments import common
from qjax import data
from qjax.llm import pipeline as llm
from qjax.models import llama

FLAGS = flags.FLAGS
flags.DEFINE_string("model_dir", None, "The float Hugging Face checkpoint (Llama family).")
flags.DEFINE_string("workdir", "/tmp/qjax/llm_peers", "Where the quantized checkpoints go.")
flags.DEFINE_string("data_dir", None, "Where to look for PTB (default: the usual data folders).")
flags.DEFINE_string("corpus", "ptb", "Calibration (train) and evaluation (test) tokens: ptb.")
flags.DEFINE_integer("num_samples", 128, "Calibration windows.")
flags.DEFINE_integer("seq_len", None, "Tokens per window (default: the model's context).")
flags.DEFINE_integer("batch_size", 32, "Windows per forward pass (calibration and evaluation).")
flags.DEFINE_list("methods", ["gptq", "gpfq", "qronos"], "qjax's methods.")
flags.DEFINE_string("out", None, "Also write the table (Markdown, with the command) here.")

GROUP = 128


def random_checkpoint(path: str) -> str:
    """A random-init model of experiments/llm's PTB shape saved at `path` (vocabulary 10,000)."""
    from experiments.llm import pipeline
    from experiments.llm.configs import ptb

    llama.save_pretrained(pipeline.make_model(ptb.get_config(), 10_000), path)
    return path


def torch_perplexity(model_dir: str, tokens: np.ndarray, *, seq_len: int, batch_size: int):
    """Perplexity of a checkpoint loaded by transformers (float or compressed-tensors)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    count = len(tokens) // seq_len
    windows = torch.from_numpy(tokens[: count * seq_len].reshape(count, seq_len).astype(np.int64))
    total = 0.0
    with torch.no_grad():
        for start in range(0, count, batch_size):
            batch = windows[start : start + batch_size]
            logits = model(batch[:, :-1]).logits.float()
            total += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            ).item()
    return math.exp(total / (count * (seq_len - 1)))


def word_tokenizer(vocab: tuple[str, ...]):
    """A word-level Hugging Face tokenizer of a corpus's vocabulary (id = position; "<unk>" for
    unknown words): `oneshot` requires a processor even for a tokenized dataset."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", eos_token="<eos>")


def llmcompressor_gptq(
    model_dir: str, out_dir: str, calibration: np.ndarray, vocab: tuple[str, ...]
) -> float:
    """llm-compressor's GPTQ W4A16 (group 128) of the checkpoint; returns `oneshot`'s seconds."""
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    dataset = Dataset.from_dict(
        {
            "input_ids": calibration.tolist(),
            "attention_mask": np.ones_like(calibration).tolist(),
        }
    )
    recipe = GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])
    start = time.perf_counter()
    oneshot(
        model=model,
        dataset=dataset,
        recipe=recipe,
        processor=word_tokenizer(vocab),
        max_seq_length=calibration.shape[1],
        num_calibration_samples=len(calibration),
    )
    seconds = time.perf_counter() - start
    model.save_pretrained(out_dir, save_compressed=True)
    return seconds


def main(argv):
    if len(argv) > 1:
        raise app.UsageError("Too many command-line arguments.")
    try:
        import llmcompressor  # noqa: F401
        import torch
    except ImportError as error:
        print(f"llm-compressor is not installed ({error}); pip install 'qjax[llm-peers]'")
        return
    torch.set_num_threads(os.cpu_count() or 1)
    os.makedirs(FLAGS.workdir, exist_ok=True)
    model_dir = FLAGS.model_dir
    trained = bool(model_dir) and os.path.exists(os.path.join(model_dir, "config.json"))
    if not trained:
        model_dir = random_checkpoint(os.path.join(FLAGS.workdir, "random_init"))
    config = llama.LlamaConfig.from_hf(llama.read_config(model_dir))
    seq_len = FLAGS.seq_len or config.max_position_embeddings
    if FLAGS.corpus != "ptb":
        raise app.UsageError("--corpus must be ptb (the vocabulary of the word tokenizer)")
    vocab = data.load_ptb(data_dir=FLAGS.data_dir).vocab
    train = llm.load_tokens(FLAGS.corpus, split="train", data_dir=FLAGS.data_dir)
    test = llm.load_tokens(FLAGS.corpus, split="test", data_dir=FLAGS.data_dir)
    calibration = np.concatenate(
        llm.calibration_batches(
            train,
            num_samples=FLAGS.num_samples,
            seq_len=seq_len,
            batch_size=FLAGS.batch_size,
            seed=0,
        )
    )
    rows = []

    def evaluate(tool: str, method: str, out_dir: str, seconds: float | None) -> None:
        ppl = torch_perplexity(out_dir, test, seq_len=seq_len, batch_size=FLAGS.batch_size)
        rows.append({"tool": tool, "method": method, "seconds": seconds, "perplexity": ppl})
        print(f"{tool} {method}: perplexity {ppl:.3f}, time {seconds}", flush=True)

    evaluate("float", "-", model_dir, None)
    out = os.path.join(FLAGS.workdir, "llmcompressor_gptq")
    evaluate("llm-compressor", "gptq", out, llmcompressor_gptq(model_dir, out, calibration, vocab))
    batches = [
        calibration[i : i + FLAGS.batch_size] for i in range(0, len(calibration), FLAGS.batch_size)
    ]
    runs = [(m, "") for m in FLAGS.methods]
    if "gptq" in FLAGS.methods:
        runs.append(("gptq", " (warm)"))
    for method, label in runs:
        spec = qjax.LayerSpec(
            method=method, bits=4, c=1.0, rule="max", group_size=GROUP, grid="signed"
        )
        out = os.path.join(FLAGS.workdir, f"qjax_{method}{'_warm' if label else ''}")
        report = llm.quantize_checkpoint(model_dir, out, batches, spec=spec)
        evaluate("qjax", method + label, out, report["quantize_seconds"])
    print(table(rows, model_dir, trained, calibration.shape))
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            f.write(
                f"Command: `python -m {shlex.join(['benchmarks.llm_peers', *sys.argv[1:]])}`\n\n"
            )
            f.write(table(rows, model_dir, trained, calibration.shape))
        with open(os.path.splitext(FLAGS.out)[0] + ".json", "w") as f:
            json.dump(
                {"rows": rows, "machine": common.machine(), "versions": versions()}, f, indent=1
            )


def versions() -> dict[str, str]:
    """The versions of the tools compared."""
    import importlib.metadata as metadata

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    names = ("qjax", "llmcompressor", "compressed-tensors", "transformers", "torch", "jax")
    return {name: version(name) for name in names}


def table(rows: list[dict], model_dir: str, trained: bool, shape: tuple[int, ...]) -> str:
    """The rows as Markdown, with the ratios to llm-compressor's GPTQ."""
    info = common.machine()
    reference = next(r for r in rows if r["tool"] == "llm-compressor")
    lines = [
        f"Checkpoint: {model_dir} ({'trained' if trained else 'random init'}); calibration "
        f"{shape[0]} × {shape[1]} tokens; W4A16, symmetric int4, groups of {GROUP}.",
        f"Machine: {info['platform']}, {info['cpu_count']} CPUs; "
        + ", ".join(f"{k} {v}" for k, v in versions().items()),
        "",
        "| tool | method | quantization s | perplexity (PyTorch) | ppl / llm-compressor's "
        "| llm-compressor's time / this |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        seconds = "" if r["seconds"] is None else f"{r['seconds']:.1f}"
        speed = "" if r["seconds"] is None else f"{reference['seconds'] / r['seconds']:.2f}×"
        lines.append(
            f"| {r['tool']} | {r['method']} | {seconds} | {r['perplexity']:.3f} "
            f"| {r['perplexity'] / reference['perplexity']:.4f} | {speed} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    app.run(main)
