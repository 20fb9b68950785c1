"""A Llama-family language model of our own, trained on Penn Treebank, then quantized into
compressed-tensors checkpoints with GPFQ, Qronos, GPTQ and round to nearest.

`run(config, workdir)`

1. loads the corpus (`experiments.lm.pipeline.load_corpus`: word-level Penn Treebank, or a
   character corpus such as the one shipped with qjax);
2. trains a `qjax.models.llama.Llama` (`train`) with the optimizer, batches and shared loop of
   the transformer experiment (`experiments.lm.pipeline`, `experiments.common`: AdamW with
   warmup and cosine decay, gradient clipping, an orbax checkpoint per epoch, exact resume);
   `config.steps_per_epoch` > 0 cuts each pass over the training split to that many steps;
3. saves it as a Hugging Face checkpoint (`<workdir>/hf_model`, `llama.save_pretrained`) that
   `python -m qjax.llm.quantize` and `python -m qjax.llm.perplexity` read;
4. for each (bits, group size, method) of `config.ptq`, quantizes that checkpoint with
   `qjax.llm.pipeline.quantize_checkpoint` (the library function of `qjax.llm.quantize`, with
   the same calibration draw) into `<workdir>/quantized/<name>` and measures its test
   perplexity with `qjax.llm.pipeline.perplexity` on the checkpoint read back from disk; a
   finished entry (its `perplexity.json`) is not redone, so a stopped run continues;
5. writes `results.json` / `results.md` after every entry: the float and quantized test
   perplexities, the quantization times, the equivalent command lines, the machine.
"""

from __future__ import annotations

import json
import os
import shlex
from typing import Any

import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

import qjax
from experiments import common
from experiments.lm import pipeline as lm_pipeline
from qjax import data
from qjax.llm import pipeline as llm
from qjax.models import llama

FLOAT_CHECKPOINT = "hf_model"
QUANTIZED = "quantized"


def make_model(config: ml_collections.ConfigDict, vocab_size: int) -> llama.Llama:
    """A fresh `Llama` of `config.model`'s sizes, max_position_embeddings = config.seq_len,
    initialized from config.seed."""
    model_config = llama.LlamaConfig(
        vocab_size=vocab_size, max_position_embeddings=config.seq_len, **config.model
    )
    return llama.Llama(model_config, rngs=nnx.Rngs(params=config.seed))


def lm_loss(graphdef: nnx.GraphDef, rest: nnx.State) -> common.LossFn:
    """The mean next-token cross-entropy; windows are (batch, seq_len + 1) int32 (no dropout:
    the key is unused)."""

    def loss_fn(params, model_state, windows, key):
        del key
        logits = nnx.merge(graphdef, params, rest)(windows[:, :-1])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:]).mean()
        return loss, model_state

    return loss_fn


def steps_per_epoch(config: ml_collections.ConfigDict, num_train_tokens: int) -> int:
    """Steps per epoch: a full pass, or `config.steps_per_epoch` of it when that is > 0."""
    full = lm_pipeline.steps_per_epoch(config, num_train_tokens)
    if config.steps_per_epoch < 0:
        raise ValueError(f"config.steps_per_epoch must be >= 0, got {config.steps_per_epoch}")
    return min(full, config.steps_per_epoch) if config.steps_per_epoch else full


def evaluate_perplexity(
    model: nnx.Module, tokens: np.ndarray, config: ml_collections.ConfigDict
) -> float:
    """Perplexity by the protocol of `qjax.llm.perplexity`: windows of config.seq_len."""
    return llm.perplexity(model, tokens, seq_len=config.seq_len, batch_size=config.eval_batch_size)


def train(
    config: ml_collections.ConfigDict, workdir: common.Workdir, corpus: data.TextCorpus
) -> tuple[llama.Llama, dict]:
    """Trains the float model for config.epochs (resuming from the workdir's checkpoints), with
    the transformer experiment's loop (`experiments.lm.pipeline.train_model`).

    Returns:
      (the trained model, the phase history by epoch: train_loss, valid_perplexity,
      train_seconds (the epoch's steps; the first one compiles) and train_tokens_per_s).
    """
    return lm_pipeline.train_model(
        config,
        workdir,
        corpus,
        make_model(config, len(corpus.vocab)),
        lm_loss,
        steps=steps_per_epoch(config, len(corpus.train)),
        perplexity=evaluate_perplexity,
    )


def token_source(config: ml_collections.ConfigDict) -> str:
    """The `--calibration` / `--corpus` value of the command lines for config's corpus."""
    if config.dataset == "ptb":
        return "ptb"
    if config.dataset == "chars" and not config.text_file:
        return "char"
    raise ValueError(
        "the command lines read 'ptb' or the shipped character corpus; got dataset "
        f"{config.dataset!r} with text_file {config.text_file!r}"
    )


def entry_name(method: str, bits: int, group_size: int) -> str:
    """e.g. "gptq_w4_g128", "gpfq_w3_channel" (group_size 0: one scale per output channel)."""
    return f"{method}_w{bits}_{f'g{group_size}' if group_size else 'channel'}"


def grid(config: ml_collections.ConfigDict) -> list[tuple[str, int, int]]:
    """(method, bits, group_size) of every entry, the widest bits first."""
    ptq = config.ptq
    return [(m, b, g) for b in ptq.bits for g in ptq.group_sizes for m in ptq.methods]


def commands(
    config: ml_collections.ConfigDict, float_dir: str, out_dir: str, entry: tuple[str, int, int]
) -> list[str]:
    """The two command lines that reproduce one entry (quantize, then perplexity)."""
    method, bits, group_size = entry
    ptq, source = config.ptq, token_source(config)
    quantize = [
        "python", "-m", "qjax.llm.quantize", f"--model_dir={float_dir}",
        f"--output_dir={out_dir}", f"--method={method}", f"--bits={bits}",
        f"--group_size={group_size}", f"--grid={ptq.grid}", f"--calibration={source}",
        f"--num_samples={ptq.num_samples}", f"--seq_len={config.seq_len}",
        f"--batch_size={ptq.batch_size}", f"--seed={config.seed}",
    ]  # fmt: skip
    if ptq.c is not None:
        quantize.append(f"--c={ptq.c}")
    if damping(config, method) is not None:
        quantize.append(f"--damping={damping(config, method)}")
    return [shlex.join(quantize), perplexity_command(config, out_dir)]


def perplexity_command(config: ml_collections.ConfigDict, model_dir: str) -> str:
    """The command line of a checkpoint's test perplexity as this experiment measures it."""
    return shlex.join([
        "python", "-m", "qjax.llm.perplexity", f"--model_dir={model_dir}",
        f"--corpus={token_source(config)}", "--split=test", f"--seq_len={config.seq_len}",
        f"--batch_size={config.eval_batch_size}",
    ])  # fmt: skip


def damping(config: ml_collections.ConfigDict, method: str) -> float | None:
    """The relative damping of `method`'s entries: `config.ptq.qronos_damping` for Qronos, None
    (the method's default) otherwise."""
    return config.ptq.qronos_damping if method == "qronos" else None


def quantize_entry(
    config: ml_collections.ConfigDict,
    float_dir: str,
    out_dir: str,
    entry: tuple[str, int, int],
    calibration: list[np.ndarray],
    test_tokens: np.ndarray,
) -> dict[str, Any]:
    """Quantizes the float checkpoint for one entry and measures the result's test perplexity
    (read back from `out_dir`), or reads the measurement of an earlier run made with the same
    damping (an entry of another damping is redone)."""
    method, bits, group_size = entry
    done = os.path.join(out_dir, "perplexity.json")
    if os.path.exists(done):
        with open(done) as f:
            result = json.load(f)
        if result.get("damping") == damping(config, method):
            return result
    spec = qjax.LayerSpec(
        method=llm.make_method(method, damping=damping(config, method)),
        bits=bits,
        c=config.ptq.c,
        rule="max",
        per_channel=True,
        group_size=group_size or None,
        grid=config.ptq.grid,
    )
    report = llm.quantize_checkpoint(float_dir, out_dir, calibration, spec=spec)
    quantized = llm.load_model(out_dir)
    result = {
        "method": method,
        "bits": bits,
        "group_size": group_size,
        "grid": config.ptq.grid,
        "damping": damping(config, method),  # None: the method's default
        "test_perplexity": evaluate_perplexity(quantized, test_tokens, config),
        "quantize_seconds": report["quantize_seconds"],
        "peak_host_memory_bytes": report["peak_host_memory_bytes"],
        "commands": commands(config, float_dir, out_dir, entry),
    }
    with open(done, "w") as f:
        json.dump(result, f, indent=1)
    logging.info("%s: test perplexity %.2f", os.path.basename(out_dir), result["test_perplexity"])
    return result


def results_markdown(results: dict) -> str:
    """The float model and the quantized checkpoints' test perplexities as Markdown tables."""
    f = results["float"]
    lines = [
        f"qjax {results['qjax_version']}, commit {results['commit']}",
        "",
        "| model | parameters | train steps | train time | valid perplexity | test perplexity |",
        "|---|---|---|---|---|---|",
        f"| float | {results['num_params']:,} | {results['train_steps']} "
        f"| {results['train_seconds'] / 60:.1f} min | {f['valid_perplexity']:.2f} "
        f"| {f['test_perplexity']:.2f} |",
        "",
    ]
    entries = results["quantized"]
    if entries:
        grid_name = entries[0]["grid"]
        lines += [
            f"Quantized ({grid_name} integer grid, scale constant C = {results['scale_constant']}"
            "; None: the MSE-best per scale group), test perplexity (quantization seconds):",
            "",
        ]
        methods = list(dict.fromkeys(e["method"] for e in entries))
        dampings = {e["method"]: e.get("damping") for e in entries}
        labels = [m if dampings[m] is None else f"{m} (damping {dampings[m]:g})" for m in methods]
        lines += ["| weights | " + " | ".join(labels) + " |", "|---" * (len(methods) + 1) + "|"]
        rows: dict[tuple[int, int], dict[str, dict]] = {}
        for e in entries:
            rows.setdefault((e["bits"], e["group_size"]), {})[e["method"]] = e
        for (bits, group), by_method in rows.items():
            cells = [
                f"{by_method[m]['test_perplexity']:.2f} ({by_method[m]['quantize_seconds']:.0f} s)"
                if m in by_method
                else "not run"
                for m in methods
            ]
            label = f"W{bits} " + (f"g{group}" if group else "per channel")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines += ["", "Commands of each entry:", ""]
        for e in entries:
            lines += [f"    {c}" for c in e["commands"]]
    return "\n".join(lines) + "\n"


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains (or resumes) the float model, saves it, quantizes it over `config.ptq`'s grid and
    writes the results.

    Args:
      config: the experiment config (see `experiments/llm/configs`).
      workdir: checkpoints, `hf_model`, `quantized/<entry>`, `results.json` and `results.md`.

    Returns:
      The results dict written to results.json.
    """
    work = common.open_workdir(lm_pipeline.float_config(config), workdir)
    corpus = lm_pipeline.load_corpus(config)
    source = token_source(config)
    float_dir = work.file(FLOAT_CHECKPOINT)
    model, history = train(config, work, corpus)
    llama.save_pretrained(model, float_dir)
    float_model = llama.from_pretrained(float_dir)  # what the command lines read
    results = {
        "corpus": {
            "source": corpus.source,
            "vocab_size": len(corpus.vocab),
            "tokens": {k: len(getattr(corpus, k)) for k in ("train", "valid", "test")},
        },
        "qjax_version": qjax.__version__,
        "commit": common.library()["commit"],
        "scale_constant": config.ptq.c,
        "num_params": sum(int(np.prod(v.get_value().shape)) for _, v in llama.parameters(model)),
        "train_steps": int(steps_per_epoch(config, len(corpus.train)) * config.epochs),
        "train_seconds": float(np.sum(history["train_seconds"])),
        "train_tokens_per_s": float(np.median(history["train_tokens_per_s"])),
        "float": {
            "valid_perplexity": history["valid_perplexity"][-1],
            "test_perplexity": evaluate_perplexity(float_model, corpus.test, config),
            "command": perplexity_command(config, float_dir),
        },
        "history": history,
        "quantized": [],
    }
    logging.info("float: test perplexity %.2f", results["float"]["test_perplexity"])
    del model, float_model
    tokens = llm.load_tokens(source, split="train", data_dir=config.data_dir or None)
    calibration = llm.calibration_batches(
        tokens,
        num_samples=config.ptq.num_samples,
        seq_len=config.seq_len,
        batch_size=config.ptq.batch_size,
        seed=config.seed,
    )
    for entry in grid(config):
        out_dir = os.path.join(work.path, QUANTIZED, entry_name(*entry))
        results["quantized"].append(
            quantize_entry(config, float_dir, out_dir, entry, calibration, corpus.test)
        )
        common.write_results(work, results, results_markdown(results), config)
    return common.write_results(work, results, results_markdown(results), config)
