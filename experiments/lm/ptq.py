"""The quantization half of the transformer-LM experiment: GPFQ, GPTQ and RTN at 4, 3, 2 bits.

`run(config, workdir)` restores the float model that `experiments.lm.pipeline.run` trained in
`workdir` (training it first when `<workdir>/float_model` is missing), draws calibration windows
from the training split (`qjax.data.calibration_batches`), and for every method of
`config.ptq.methods`, bit width of `config.ptq.bits` and granularity (per channel, and
group-wise with `config.ptq.group_size` inputs per scale) quantizes every attention and MLP
kernel with `qjax.quantize_model`. The token and position embeddings stay float, and so does
the head when it is tied to the embedding; an untied head is rounded to `config.ptq.head_bits`
(RTN per channel; 0 keeps it float). The scale constant C is chosen among `config.ptq.c_values`
(None: the MSE-best C per scale group) by validation perplexity; the chosen model's test
perplexity is reported. Outputs go to `<workdir>/ptq`: results.json, results.md (command and
machine), and the plots perplexity_vs_bits.png and layer_error.png.
"""

from __future__ import annotations

import os
import time
from typing import Any

import ml_collections
import numpy as np
from absl import logging
from flax import nnx

import qjax
from experiments import common
from experiments.gpfq import plots
from experiments.lm import pipeline
from qjax import data
from qjax.models import TransformerLM

OUTPUT_DIR = "ptq"
GRANULARITIES = ("channel", "group")


def float_model(config: ml_collections.ConfigDict, workdir: str) -> TransformerLM:
    """The trained float model of `workdir`: restored, or trained there first if not saved."""
    corpus = pipeline.load_corpus(config)
    if not os.path.isdir(os.path.join(workdir, pipeline.FLOAT_MODEL)):
        logging.info("no float model in %s: training it", workdir)
        pipeline.run(config, workdir)
    return pipeline.restore_float_model(config, workdir, vocab_size=len(corpus.vocab))


def calibration(corpus: data.TextCorpus, config: ml_collections.ConfigDict) -> list[np.ndarray]:
    """`config.ptq.calibration_sequences` training windows of seq_len tokens, in batches."""
    ptq = config.ptq
    windows = data.calibration_batches(
        corpus, num_sequences=ptq.calibration_sequences, seq_len=config.seq_len, seed=config.seed
    )
    step = ptq.calibration_batch_size
    return [windows[i : i + step] for i in range(0, len(windows), step)]


def layer_rules(
    model: TransformerLM, config: ml_collections.ConfigDict
) -> list[tuple[str, qjax.LayerSpec]]:
    """The head's rule: none when tied (it is the float embedding), else head_bits RTN or float."""
    if model.head is None:
        return []
    bits = config.ptq.head_bits
    return [("head", qjax.LayerSpec(method="msq", bits=bits) if bits else qjax.LayerSpec("skip"))]


def layer_spec(
    config: ml_collections.ConfigDict, *, method: str, bits: int, granularity: str, c: float | None
) -> qjax.LayerSpec:
    """The spec of every attention and MLP kernel: per channel, or group-wise."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    group_size = config.ptq.group_size if granularity == "group" else None
    return qjax.LayerSpec(
        method=method, bits=bits, c=c, rule=config.ptq.rule, group_size=group_size
    )


def perplexity(model: nnx.Module, tokens: np.ndarray, config: ml_collections.ConfigDict) -> float:
    value, _ = pipeline.timed_perplexity(model, tokens, config)
    return value


def quantize_and_score(
    model: TransformerLM,
    batches: list[np.ndarray],
    valid: np.ndarray,
    config: ml_collections.ConfigDict,
    *,
    method: str,
    bits: int,
    granularity: str,
    c: float | None,
) -> tuple[TransformerLM, dict[str, Any]]:
    """One quantized model and its row: validation perplexity, seconds, per-layer reports."""
    spec = layer_spec(config, method=method, bits=bits, granularity=granularity, c=c)
    start = time.perf_counter()
    quantized, reports = qjax.quantize_model(
        model, batches, spec=spec, rules=layer_rules(model, config), progress=False
    )
    seconds = time.perf_counter() - start
    row = {
        "method": method,
        "bits": bits,
        "granularity": granularity,
        "c": c,
        "seconds": seconds,
        "valid_perplexity": perplexity(quantized, valid, config),
        "layers": [  # the quantized and skipped layers, as plain numbers
            {k: v for k, v in r._asdict().items() if k != "alphabet"}
            for r in reports
            if r.method != "not reached"
        ],
    }
    logging.info(
        "%s %d-bit %s C=%s: valid perplexity %.2f (%.1fs)",
        method,
        bits,
        granularity,
        c,
        row["valid_perplexity"],
        seconds,
    )
    return quantized, row


def sweep(
    model: TransformerLM, corpus: data.TextCorpus, config: ml_collections.ConfigDict
) -> tuple[list[dict], list[dict]]:
    """Every (method, bits, granularity, C); the best C of each by validation perplexity.

    Returns:
      (all rows, the best row of each (method, bits, granularity) with its test_perplexity).
    """
    ptq = config.ptq
    batches = calibration(corpus, config)
    rows, best = [], []
    for method in ptq.methods:
        for bits in ptq.bits:
            for granularity in GRANULARITIES:
                candidates = [
                    quantize_and_score(
                        model,
                        batches,
                        corpus.valid,
                        config,
                        method=method,
                        bits=bits,
                        granularity=granularity,
                        c=c,
                    )
                    for c in ptq.c_values
                ]
                rows += [row for _, row in candidates]
                chosen, row = min(candidates, key=lambda pair: pair[1]["valid_perplexity"])
                best.append({**row, "test_perplexity": perplexity(chosen, corpus.test, config)})
    return rows, best


def method_seconds(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per method: the first call's seconds (compilation included) and the median of the rest."""
    out = {}
    for method in dict.fromkeys(r["method"] for r in rows):
        times = [r["seconds"] for r in rows if r["method"] == method]
        out[method] = {"first": times[0], "median": float(np.median(times[1:] or times))}
    return out


def c_label(c: float | None) -> str:
    return "MSE" if c is None else f"{c:g}"


def results_markdown(results: dict) -> str:
    """Test perplexity by method, granularity and bits (best C on validation), times, errors."""
    bits = results["bits"]
    lines = [
        f"Float: valid perplexity {results['float']['valid_perplexity']:.2f}, test perplexity "
        f"{results['float']['test_perplexity']:.2f}. Quantized: {results['quantized_layers']}; "
        f"{results['float_layers']}. Calibration: {results['calibration_tokens']:,} training "
        f"tokens. C chosen on validation among {results['c_values']} (rule "
        f"{results['rule']!r}); test perplexity (C):",
        "",
        "| method | scales | " + " | ".join(f"{b}-bit" for b in bits) + " |",
        "|---|---|" + "---|" * len(bits),
    ]
    for method in results["methods"]:
        for granularity in GRANULARITIES:
            cells = {
                r["bits"]: f"{r['test_perplexity']:.2f} ({c_label(r['c'])})"
                for r in results["best"]
                if r["method"] == method and r["granularity"] == granularity
            }
            scales = "per channel" if granularity == "channel" else f"group {results['group_size']}"
            lines.append(
                f"| {method.upper()} | {scales} | " + " | ".join(cells[b] for b in bits) + " |"
            )
    lines += [
        "",
        "Time per quantization of the whole model (s): the first call (compilation included) "
        "and the median of the others:",
        "",
        "| method | first | median |",
        "|---|---|---|",
    ]
    for method, t in results["seconds"].items():
        lines.append(f"| {method.upper()} | {t['first']:.1f} | {t['median']:.1f} |")
    errors = results["layer_errors"]
    lines += [
        "",
        f"Per-layer relative error ||XW − X~Q|| / ||XW||, {results['layer_errors_at']}:",
        "",
        "| layer | " + " | ".join(m.upper() for m in errors) + " |",
        "|---" * (len(errors) + 1) + "|",
    ]
    per_method = list(errors.values())
    for i, layer in enumerate(per_method[0]):
        cells = [f"{layers[i]['relative_error']:.4f}" for layers in per_method]
        lines.append(f"| {layer['path']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_perplexity(results: dict, path: str) -> None:
    """Test perplexity against bits, one line per method and granularity, float dashed."""
    fig, ax = plots.plt.subplots(figsize=(5, 3.5))
    for method in results["methods"]:
        name, color = plots.METHOD_STYLE.get(method, (method.upper(), None))
        for granularity, style in zip(GRANULARITIES, ("o-", "s:"), strict=True):
            rows = [
                r
                for r in results["best"]
                if r["method"] == method and r["granularity"] == granularity
            ]
            label = f"{name} {'channel' if granularity == 'channel' else 'group'}"
            ax.plot(
                [r["bits"] for r in rows],
                [r["test_perplexity"] for r in rows],
                style,
                label=label,
                color=color,
            )
    ax.axhline(results["float"]["test_perplexity"], color="gray", ls="--", label="float")
    ax.set_yscale("log")
    ax.set_xticks(results["bits"])
    ax.set_xlabel("bits per weight")
    ax.set_ylabel("test perplexity (best C on valid)")
    ax.set_title(results["title"])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    plots._save(fig, path)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """The sweep on the float model of `workdir`; outputs in `<workdir>/ptq`.

    Returns:
      The results dict written to `<workdir>/ptq/results.json`.
    """
    ptq = config.ptq
    unknown = [m for m in ptq.methods if m not in qjax.methods.names()]
    if unknown:
        raise ValueError(f"config.ptq.methods {unknown} are not in {qjax.methods.names()}")
    workdir = os.path.abspath(workdir)
    corpus = pipeline.load_corpus(config)
    model = float_model(config, workdir)
    rows, best = sweep(model, corpus, config)
    lowest = min(ptq.bits)
    at_lowest = {
        m: next(
            r
            for r in best
            if r["method"] == m and r["bits"] == lowest and r["granularity"] == "channel"
        )
        for m in ptq.methods
    }
    results = {
        "title": f"{corpus.source.rsplit('/', 1)[-1]}: {config.model.num_layers}-layer "
        f"d={config.model.d_model} transformer",
        "float": {
            "valid_perplexity": perplexity(model, corpus.valid, config),
            "test_perplexity": perplexity(model, corpus.test, config),
        },
        "quantized_layers": "every attention (query, key, value, out) and MLP (in, out) kernel",
        "float_layers": (
            "token and position embeddings float, tied head = the float embedding"
            if model.head is None
            else f"embeddings float, head {ptq.head_bits}-bit RTN"
            if ptq.head_bits
            else "embeddings and head float"
        ),
        "calibration_tokens": ptq.calibration_sequences * config.seq_len,
        "methods": list(ptq.methods),
        "bits": list(ptq.bits),
        "group_size": ptq.group_size,
        "rule": ptq.rule,
        "c_values": [c_label(c) for c in ptq.c_values],
        "best": best,
        "seconds": method_seconds(rows),
        "layer_errors_at": f"{lowest}-bit per channel, best C",
        "layer_errors": {m: r["layers"] for m, r in at_lowest.items()},
        "sweep": rows,
    }
    out = common.Workdir(os.path.join(workdir, OUTPUT_DIR))
    os.makedirs(out.path, exist_ok=True)
    results = common.write_results(out, results, results_markdown(results), config)
    plot_perplexity(results, out.file("perplexity_vs_bits.png"))
    plots.layer_errors(
        {**results, "layer_errors_level": results["layer_errors_at"]},
        out.file("layer_error.png"),
    )
    return results
