"""The LLM jobs behind the command lines: tokens, calibration, quantization, perplexity.

* `load_tokens`: a token stream from Penn Treebank ("ptb", word ids), the character corpus that
  ships with qjax ("char"), a `.npy` file of ids, or a text file tokenized with the checkpoint's
  own tokenizer (transformers' `AutoTokenizer`).
* `calibration_batches`: random windows of a stream, in batches, for `qjax.quantize_model`.
* `make_method`: a method by name with its defaults, its relative damping set when given.
* `quantize_checkpoint`: a Hugging Face checkpoint → `qjax.quantize_model` → a `pack-quantized`
  compressed-tensors checkpoint plus `report.json` / `report.md` (per-layer relative errors,
  time, peak host memory).
* `perplexity`: the standard language-model protocol of GPTQ and llm-compressor: the stream cut
  into non-overlapping windows of seq_len tokens (a last partial window dropped), each window
  scored on its seq_len - 1 next-token predictions; exp of the mean NLL over all predictions.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from qjax import data, methods
from qjax.engine import LayerReport, format_report, quantize_model
from qjax.models import llama, transformer
from qjax.rules import LayerSpec, Rules, unmatched_patterns

__all__ = [
    "calibration_batches",
    "load_model",
    "load_tokens",
    "make_method",
    "perplexity",
    "quantize_checkpoint",
]


def load_tokens(
    source: str, *, split: str = "test", model_dir: str | None = None, data_dir: str | None = None
) -> np.ndarray:
    """A stream of token ids.

    Args:
      source: "ptb" (Penn Treebank word ids, from `data_dir` or the usual data folders), "char"
        (the character corpus shipped with qjax), a `.npy` file of integer ids, or a UTF-8 text
        file (tokenized with the tokenizer saved in `model_dir`).
      split: "train", "valid" or "test" for "ptb" and "char" (files are read whole).
      model_dir: the checkpoint whose tokenizer reads a text file.
      data_dir: where to look for PTB.

    Returns:
      (n,) int32 ids.
    """
    if source in ("ptb", "char"):
        if split not in ("train", "valid", "test"):
            raise ValueError(f"split must be train, valid or test, got {split!r}")
        corpus = data.load_ptb(data_dir=data_dir) if source == "ptb" else data.load_char_corpus()
        return np.asarray(getattr(corpus, split), np.int32)
    if not os.path.exists(source):
        raise FileNotFoundError(f"token source {source!r} is not 'ptb', 'char' or a file")
    if source.endswith(".npy"):
        ids = np.load(source)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"{source} must hold a 1-D integer array, got {ids.dtype} {ids.shape}")
        return ids.astype(np.int32)
    if model_dir is None:
        raise ValueError(f"a text file ({source}) needs the checkpoint's tokenizer: give model_dir")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with open(source, encoding="utf-8") as f:
        return np.asarray(tokenizer(f.read())["input_ids"], np.int32)


def calibration_batches(
    tokens: np.ndarray, *, num_samples: int, seq_len: int, batch_size: int, seed: int
) -> list[np.ndarray]:
    """`num_samples` random windows of `seq_len` tokens (GPTQ's calibration: 128 × 2048), as a
    list of (≤ batch_size, seq_len) int32 batches."""
    for name, value in (("num_samples", num_samples), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    windows = data.text.sample_windows(
        tokens, jax.random.key(seed), batch_size=num_samples, seq_len=seq_len
    )
    windows = np.asarray(windows[:, :-1])
    return [windows[i : i + batch_size] for i in range(0, num_samples, batch_size)]


def make_method(name: str, *, damping: float | None = None) -> methods.QuantizationMethod:
    """The method `name` ("gpfq", "gptq", "qronos", "msq") with its defaults.

    Args:
      name: the method's name.
      damping: the relative damping of a least-squares method: GPTQ's λ (added as
        λ·mean(diag G) to G's diagonal) or Qronos's α (λ = α·||X~ᵀX~||₂); None keeps the
        method's default.

    Returns:
      The method object.
    """
    method = methods.get(name)
    if damping is None:
        return method
    if "damping" not in {f.name for f in dataclasses.fields(method)}:
        with_damping = [
            n for n in methods.names() if "damping" in dataclasses.asdict(methods.get(n))
        ]
        raise ValueError(f"method {name!r} has no damping; only {', '.join(with_damping)} take one")
    return dataclasses.replace(method, damping=damping)


def perplexity(model: nnx.Module, tokens: np.ndarray, *, seq_len: int, batch_size: int) -> float:
    """Perplexity by non-overlapping windows of `seq_len` tokens (GPTQ's protocol, see above).

    Args:
      model: maps (batch, seq_len - 1) ids to logits.
      tokens: (n,) ids, n ≥ seq_len.
      seq_len: the window, usually the model's context length.
      batch_size: windows per forward pass.

    Returns:
      exp(mean NLL) over the n // seq_len windows' seq_len - 1 predictions each.
    """
    tokens = np.asarray(tokens)
    if seq_len < 2 or len(tokens) < seq_len:
        raise ValueError(
            f"need seq_len ≥ 2 and at least seq_len tokens, got {seq_len} and {len(tokens)}"
        )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    count = len(tokens) // seq_len
    windows = tokens[: count * seq_len].reshape(count, seq_len).astype(np.int32)
    graphdef, state = nnx.split(model)
    vocab = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, windows[:1, :-1])
    data.text.check_ids(windows, vocab.shape[-1], what="tokens")
    total = jnp.zeros((), jnp.float32)
    for start in tqdm(range(0, count, batch_size), desc="perplexity", disable=None):
        batch = windows[start : start + batch_size]
        weights = np.ones((len(batch), seq_len - 1), np.float32)
        total = total + transformer._weighted_nll(graphdef, state, batch, weights)
    return float(np.exp(float(total) / (count * (seq_len - 1))))


def load_model(path: str) -> llama.Llama:
    """A float or `pack-quantized` checkpoint directory as a float32 `Llama`."""
    if "quantization_config" in llama.read_config(path):
        from qjax.llm import compressed

        return compressed.load_compressed(path)
    return llama.from_pretrained(path)


def _peak_memory_bytes() -> int:
    """The process's peak resident memory so far (Linux reports kilobytes, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _layer_row(report: LayerReport) -> dict[str, Any]:
    """A layer's report as JSON: its block (block-wise) as a dict, without its alphabet (the
    checkpoint holds the scales)."""
    row = {k: v for k, v in report._asdict().items() if k != "alphabet"}
    if row.get("block") is not None:
        row["block"] = row["block"]._asdict()
    return row


def quantize_checkpoint(
    model_dir: str,
    output_dir: str,
    calibration: Sequence[np.ndarray],
    *,
    spec: LayerSpec,
    skip: Sequence[str] = ("lm_head",),
    sequential: bool = True,
    schedule: str | None = None,
) -> dict[str, Any]:
    """Quantizes a Hugging Face checkpoint and writes a compressed-tensors checkpoint.

    Args:
      model_dir: the float checkpoint (config.json + safetensors).
      output_dir: where the quantized checkpoint, `report.json` and `report.md` go.
      calibration: batches of (batch, seq_len) token ids (`calibration_batches`).
      spec: the `LayerSpec` of every quantized layer (its grid "signed" or "asymmetric").
      skip: patterns of layers kept float (those that match no layer of this model, such as
        "lm_head" of a model with a tied head, are dropped).
      sequential: `quantize_model`'s `sequential`.
      schedule: `quantize_model`'s `schedule` ("block_wise": one decoder block at a time, memory
        independent of depth; None: its automatic choice).

    Returns:
      The report (also written to `report.json`).
    """
    from qjax.llm import compressed

    start = time.perf_counter()
    model = llama.from_pretrained(model_dir)
    load_seconds = time.perf_counter() - start
    layers = [p.rsplit("/", 1)[0] for p, _ in llama.parameters(model) if p.endswith("/kernel")]
    keep = LayerSpec(method="skip")
    rules = [(p, keep) for p in skip if not unmatched_patterns([p], layers)]
    table = Rules(rules, default=spec)
    inputs = {
        p.rsplit("/", 1)[0]: v.get_value().shape[0]
        for p, v in llama.parameters(model)
        if p.endswith("/kernel")
    }
    uneven = [
        f"{layer} ({inputs[layer]} inputs)"
        for layer in layers
        if spec.group_size and not table.spec_for(layer).skip and inputs[layer] % spec.group_size
    ]
    if uneven:
        raise ValueError(
            f"group_size {spec.group_size} must divide the inputs of every quantized layer for "
            f"compressed-tensors; it does not for {', '.join(uneven)}"
        )
    start = time.perf_counter()
    quantized, reports = quantize_model(
        model,
        list(calibration),
        spec=spec,
        rules=rules,
        sequential=sequential,
        schedule=schedule,
    )
    quantize_seconds = time.perf_counter() - start
    alphabets = compressed.layer_alphabets(model, table)
    del model
    compressed.save_compressed(
        quantized, output_dir, alphabets=alphabets, config=llama.read_config(model_dir)
    )
    float_bytes = sum(int(np.prod(v.get_value().shape)) * 4 for _, v in llama.parameters(quantized))
    report = {
        "model_dir": os.path.abspath(model_dir),
        "output_dir": os.path.abspath(output_dir),
        "spec": {k: v for k, v in dataclasses.asdict(spec).items() if k != "alphabet"},
        "skipped": [p for p, _ in rules],
        "calibration": {"batches": len(calibration), "shape": list(np.shape(calibration[0]))},
        "schedule": schedule or "auto",
        "load_seconds": load_seconds,
        "quantize_seconds": quantize_seconds,
        "peak_host_memory_bytes": _peak_memory_bytes(),
        "float32_parameter_bytes": float_bytes,
        "layers": [_layer_row(r) for r in reports],
    }
    report["spec"]["method"] = spec.method_name
    report["spec"]["method_options"] = dataclasses.asdict(spec.quantizer)  # damping, block size
    with open(os.path.join(output_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(output_dir, "report.md"), "w") as f:
        f.write(
            f"# {report['model_dir']} quantized\n\n"
            f"spec: {report['spec']}\n\nquantization: {quantize_seconds:.1f} s; peak host memory "
            f"{report['peak_host_memory_bytes'] / 2**20:.0f} MiB (float32 weights "
            f"{float_bytes / 2**20:.1f} MiB)\n\n{format_report(reports)}\n"
        )
    return report
