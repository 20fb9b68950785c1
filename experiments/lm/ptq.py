"""The quantization half of the transformer-LM experiment: GPFQ, GPTQ, Qronos and RTN.

`run(config, workdir)` restores the float model that `experiments.lm.pipeline.run` trained in
`workdir` (training it first when `<workdir>/float_model` is missing), draws calibration windows
from the training split (`qjax.data.calibration_batches`), and for every method of
`config.ptq.methods`, bit width of `config.ptq.bits` and granularity of
`config.ptq.granularities` (per channel, group-wise with `config.ptq.group_size` inputs per
scale, or per tensor) quantizes every attention and MLP kernel with `qjax.quantize_model`, once
per calibration seed of `config.ptq.calibration_seeds` (each seed draws its own calibration
windows; () uses config.seed alone). The token and position embeddings stay float, and so does
the head when it is tied to the embedding; an untied head is rounded to `config.ptq.head_bits`
(RTN per channel; 0 keeps it float). The scale constant C is chosen among `config.ptq.c_values`
(None: the MSE-best C per scale group) by validation perplexity, for each seed; the chosen
model's test perplexity is reported, and with several seeds its mean ± std over the seeds.
Outputs go to `<workdir>/<config.ptq.output_dir>` ("ptq" when absent; another name keeps
sweeps of one float model apart): results.json, results.md (command and machine), and the plots
perplexity_vs_bits.png and layer_error.png.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
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
GRANULARITIES = ("channel", "group", "tensor")


def float_model(config: ml_collections.ConfigDict, workdir: str) -> TransformerLM:
    """The trained float model of `workdir`: restored, or trained there first if not saved."""
    corpus = pipeline.load_corpus(config)
    if not os.path.isdir(os.path.join(workdir, pipeline.FLOAT_MODEL)):
        logging.info("no float model in %s: training it", workdir)
        pipeline.run(config, workdir)
    return pipeline.restore_float_model(config, workdir, vocab_size=len(corpus.vocab))


def calibration_seeds(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    """The seeds that draw calibration windows: config.ptq.calibration_seeds, or config.seed."""
    return tuple(config.ptq.get("calibration_seeds", ())) or (config.seed,)


def calibration(
    corpus: data.TextCorpus, config: ml_collections.ConfigDict, seed: int | None = None
) -> list[np.ndarray]:
    """`config.ptq.calibration_sequences` training windows of seq_len tokens drawn with `seed`
    (default config.seed), in batches."""
    ptq = config.ptq
    windows = data.calibration_batches(
        corpus,
        num_sequences=ptq.calibration_sequences,
        seq_len=config.seq_len,
        seed=config.seed if seed is None else seed,
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
    """The spec of every attention and MLP kernel: per channel, group-wise or per tensor."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    group_size = config.ptq.group_size if granularity == "group" else None
    return qjax.LayerSpec(
        method=method,
        bits=bits,
        c=c,
        rule=config.ptq.rule,
        per_channel=granularity != "tensor",
        group_size=group_size,
    )


def granularities(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The granularities swept: config.ptq.granularities (per channel and group-wise if absent)."""
    chosen = tuple(config.ptq.get("granularities", ("channel", "group")))
    unknown = [g for g in chosen if g not in GRANULARITIES]
    if unknown:
        raise ValueError(f"config.ptq.granularities {unknown} are not in {GRANULARITIES}")
    return chosen


def scales_label(granularity: str, group_size: int) -> str:
    return {"channel": "per channel", "tensor": "per tensor"}.get(
        granularity, f"group {group_size}"
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
    validate: bool = True,
) -> tuple[TransformerLM, dict[str, Any]]:
    """One quantized model and its row: validation perplexity (None when not `validate`: a
    single C has nothing to choose), seconds, per-layer reports."""
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
        "valid_perplexity": perplexity(quantized, valid, config) if validate else None,
        "layers": [  # the quantized and skipped layers, as plain numbers
            {k: v for k, v in r._asdict().items() if k != "alphabet"}
            for r in reports
            if r.method != "not reached"
        ],
    }
    logging.info(
        "%s %d-bit %s C=%s: valid perplexity %s (%.1fs)",
        method,
        bits,
        granularity,
        c,
        "not measured" if row["valid_perplexity"] is None else f"{row['valid_perplexity']:.2f}",
        seconds,
    )
    return quantized, row


def sweep(
    model: TransformerLM,
    corpus: data.TextCorpus,
    config: ml_collections.ConfigDict,
    *,
    on_cell: Callable[[list[dict], list[dict]], None] | None = None,
) -> tuple[list[dict], list[dict]]:
    """Every (granularity, bits, method, C, calibration seed); for each seed, the best C of each
    (granularity, bits, method) by validation perplexity (no validation pass for a single C).

    The seeds are the inner loop, so that their models (one spec) reuse one compiled pass; the
    granularities are the outer one, in config order, and bits in config order within each, so
    that a sweep stopped early has finished whole cells of its first granularities.

    Args:
      model, corpus, config: the float model, its corpus and the experiment config.
      on_cell: called as `on_cell(rows, best)` after every finished (granularity, bits, method),
        e.g. to write the results so far.

    Returns:
      (all rows, the best row of each (method, bits, granularity, seed) with its
      test_perplexity).
    """
    ptq = config.ptq
    seeds = calibration_seeds(config)
    batches = {seed: calibration(corpus, config, seed) for seed in seeds}
    validate = len(ptq.c_values) > 1
    rows, best = [], []
    for granularity in granularities(config):
        for bits in ptq.bits:
            for method in ptq.methods:
                candidates = {seed: [] for seed in seeds}
                for c in ptq.c_values:
                    for seed in seeds:
                        quantized, row = quantize_and_score(
                            model,
                            batches[seed],
                            corpus.valid,
                            config,
                            method=method,
                            bits=bits,
                            granularity=granularity,
                            c=c,
                            validate=validate,
                        )
                        row["seed"] = seed
                        rows.append(row)
                        candidates[seed].append((quantized, row))
                for seed in seeds:
                    chosen, row = min(
                        candidates[seed],
                        key=lambda pair: pair[1]["valid_perplexity"] if validate else 0.0,
                    )
                    best.append({**row, "test_perplexity": perplexity(chosen, corpus.test, config)})
                if on_cell is not None:
                    on_cell(rows, best)
    return rows, best


def over_seeds(best: list[dict]) -> list[dict]:
    """Mean ± std (ddof = 1; None for one seed) over the calibration seeds of each (method, bits,
    granularity)."""
    groups = {}
    for row in best:
        groups.setdefault((row["method"], row["bits"], row["granularity"]), []).append(row)
    return [
        {
            "method": method,
            "bits": bits,
            "granularity": granularity,
            "c": [r["c"] for r in group],
            "test_perplexity": [r["test_perplexity"] for r in group],
            "mean": float(np.mean([r["test_perplexity"] for r in group])),
            "std": (
                float(np.std([r["test_perplexity"] for r in group], ddof=1))
                if len(group) > 1
                else None
            ),
        }
        for (method, bits, granularity), group in groups.items()
    ]


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
    c_values = results["c_values"]
    choice = (
        f"C chosen on validation among {c_values}"
        if len(c_values) > 1
        else "C = the MSE-best C of each scale group"
        if c_values[0] == "MSE"
        else f"C = {c_values[0]}"
    )
    lines = [
        f"Float: valid perplexity {results['float']['valid_perplexity']:.2f}, test perplexity "
        f"{results['float']['test_perplexity']:.2f}. Quantized: {results['quantized_layers']}; "
        f"{results['float_layers']}. Calibration: {results['calibration_tokens']:,} training "
        f"tokens. {choice} (rule {results['rule']!r}); test perplexity (C):",
        "",
        "| method | scales | " + " | ".join(f"{b}-bit" for b in bits) + " |",
        "|---|---|" + "---|" * len(bits),
    ]
    seeds = results["calibration_seeds"]
    if len(seeds) > 1:
        lines[0] = (
            f"Float: valid perplexity {results['float']['valid_perplexity']:.2f}, test perplexity "
            f"{results['float']['test_perplexity']:.2f}. Quantized: {results['quantized_layers']}; "
            f"{results['float_layers']}. Calibration: {results['calibration_tokens']:,} training "
            f"tokens, drawn by each of {len(seeds)} seeds ({', '.join(map(str, seeds))}); "
            f"{'for each seed ' if len(c_values) > 1 else ''}{choice} (rule "
            f"{results['rule']!r}). Test perplexity, mean ± standard deviation over the seeds:"
        )
    lines[:0] = [
        "| model | valid perplexity | test perplexity |",
        "|---|---|---|",
        f"| float | {results['float']['valid_perplexity']:.2f} "
        f"| {results['float']['test_perplexity']:.2f} |",
        "",
    ]
    for method in results["methods"]:
        for granularity in results["granularities"]:
            if len(seeds) > 1:
                cells = {
                    r["bits"]: f"{r['mean']:.2f} ± {r['std']:.2f}"
                    for r in results["over_seeds"]
                    if r["method"] == method and r["granularity"] == granularity
                }
            else:
                cells = {
                    r["bits"]: f"{r['test_perplexity']:.2f} ({c_label(r['c'])})"
                    for r in results["best"]
                    if r["method"] == method and r["granularity"] == granularity
                }
            scales = scales_label(granularity, results["group_size"])
            lines.append(
                f"| {method.upper()} | {scales} | "
                + " | ".join(cells.get(b, "not run") for b in bits)
                + " |"
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
    if not errors:
        return "\n".join(lines) + "\n"
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
        styles = {"channel": "o-", "group": "s:", "tensor": "^--"}
        for granularity in results["granularities"]:
            rows = [
                r
                for r in results["over_seeds"]
                if r["method"] == method and r["granularity"] == granularity
            ]
            if not rows:  # a cell not run (yet)
                continue
            ax.errorbar(
                [r["bits"] for r in rows],
                [r["mean"] for r in rows],
                yerr=[r["std"] or 0.0 for r in rows],
                fmt=styles[granularity],
                label=f"{name} {granularity}",
                color=color,
                capsize=2,
            )
    ax.axhline(results["float"]["test_perplexity"], color="gray", ls="--", label="float")
    ax.set_yscale("log")
    ax.set_xticks(results["bits"])
    ax.set_xlabel("bits per weight")
    ax.set_ylabel("test perplexity (mean ± std over seeds)")
    ax.set_title(results["title"])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    plots._save(fig, path)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """The sweep on the float model of `workdir`; outputs in `<workdir>/ptq` (or
    config.ptq.output_dir), rewritten after
    every finished cell of the sweep (a stopped run keeps the cells it finished; the cells not
    run read "not run").

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
    lowest = min(ptq.bits)
    first_granularity = granularities(config)[0]
    head = {
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
        "granularities": list(granularities(config)),
        "group_size": ptq.group_size,
        "calibration_seeds": list(calibration_seeds(config)),
        "rule": ptq.rule,
        "c_values": [c_label(c) for c in ptq.c_values],
        "layer_errors_at": f"{lowest}-bit {scales_label(first_granularity, ptq.group_size)}, "
        f"best C, calibration seed {calibration_seeds(config)[0]}",
    }
    out = common.Workdir(os.path.join(workdir, ptq.get("output_dir", OUTPUT_DIR)))
    os.makedirs(out.path, exist_ok=True)

    def write(rows: list[dict], best: list[dict]) -> dict[str, Any]:
        at_lowest = {}
        for r in best:
            if (r["bits"], r["granularity"]) == (lowest, first_granularity):
                at_lowest.setdefault(r["method"], r)  # the first seed's
        results = {
            **head,
            "best": best,
            "over_seeds": over_seeds(best),
            "seconds": method_seconds(rows),
            "layer_errors": {m: r["layers"] for m, r in at_lowest.items()},
            "sweep": rows,
        }
        results = common.write_results(out, results, results_markdown(results), config)
        plot_perplexity(results, out.file("perplexity_vs_bits.png"))
        if at_lowest:
            plots.layer_errors(
                {**results, "layer_errors_level": results["layer_errors_at"]},
                out.file("layer_error.png"),
            )
        return results

    rows, best = sweep(model, corpus, config, on_cell=write)
    return write(rows, best)
