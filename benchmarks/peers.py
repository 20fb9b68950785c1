"""qjax against qwix (Google's JAX quantization library) on one transformer language model.

The same trained `qjax.models.TransformerLM` and the same calibration windows of its training
split go through

* qwix: GPTQ (`qwix.contrib.gptq`: calibration provider, then `gptq.quantize_params`) and
  round-to-nearest (`qwix.PtqProvider` + `qwix.quantize_params`), both `int<bits>` per channel
  (absmax); QEP (`qwix.contrib.qep`) is attempted and reported as not run where qwix refuses
  the model (in qwix 0.1.8 it takes Linen models only; TransformerLM is NNX);
* qjax: GPFQ and GPTQ (`qjax.quantize_model`, one pass), per channel, absmax scales (C = 1,
  rule "max", the scale qwix uses) with 2^bits letters, sequential (each layer sees X~, its
  input in the partly quantized model: the "inputs" column says X~), and GPTQ also from the
  float model's inputs (`sequential=False`, inputs X), the setting of qwix's GPTQ;

quantizing every attention and MLP kernel of the blocks (embeddings and the tied head float).
Each is run twice in this process: cold (the first call, compilation included) and warm (the
second); the table gives both times, the test perplexity, and the ratios qjax time / qwix time.
qwix is an optional extra (`pip install 'qjax[peers]'`); without it the benchmark says so and
exits.

    python -m benchmarks.peers --workdir=/tmp/qjax/lm_ptb   # the PTB model of experiments/lm
    python -m benchmarks.peers                              # trains the tiny config's model
    python -m benchmarks.peers --small --bits=4             # a one-layer model (smoke test)
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

import qjax
from experiments.lm import pipeline, ptq
from experiments.lm.configs import tiny
from qjax.models import TransformerLM

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "An experiments/lm workdir with a trained float model.")
config_flags.DEFINE_config_file(
    "config",
    None,
    "The workdir's config (default: experiments/lm/configs/ptb.py with "
    "--workdir, the tiny config without).",
)
flags.DEFINE_list("bits", ["4", "3"], "Bit widths.")
flags.DEFINE_boolean("small", False, "Without --workdir: a one-layer 32-wide model, 1 epoch.")
flags.DEFINE_string("out", None, "Also write the rows as JSON here.")

BLOCKS = r"blocks/.*"  # the attention and MLP kernels; embeddings and the tied head stay float


def small_config() -> ml_collections.ConfigDict:
    """The tiny config at one layer of width 32, one epoch, 8 calibration windows."""
    config = tiny.get_config()
    config.model.update(num_layers=1, d_model=32, mlp_dim=64, num_heads=2)
    config.epochs, config.batch_size = 1, 64
    config.ptq.calibration_sequences = 8
    return config


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - start


def qjax_quantizer(
    method: str, bits: int, *, sequential: bool
) -> Callable[[nnx.Module, list], nnx.Module]:
    spec = qjax.LayerSpec(method=method, bits=bits, c=1.0, rule="max")

    def quantize(model, batches):
        quantized, _ = qjax.quantize_model(
            model, batches, spec=spec, sequential=sequential, progress=False
        )
        return quantized

    return quantize


def qwix_quantizer(method: str, bits: int) -> Callable[[nnx.Module, list], nnx.Module]:
    """qwix's GPTQ ("gptq"), round-to-nearest ("rtn") or QEP ("qep"), int<bits> per channel."""
    import qwix
    from qwix.contrib import gptq, qep

    qtype = f"int{bits}"

    def quantize(model, batches):
        model = nnx.view(model, deterministic=True, raise_if_not_found=False)
        first = jnp.asarray(batches[0])
        if method == "qep":
            rules = [qep.QepRule(module_path=BLOCKS, weight_qtype=qtype)]
            return qep.quantize(model, batches, rules)  # raises for an NNX model in qwix 0.1.8
        rule_type = gptq.GptqRule if method == "gptq" else qwix.QuantizationRule
        rules = [rule_type(module_path=BLOCKS, weight_qtype=qtype)]
        quantized = qwix.quantize_model(model, qwix.PtqProvider(rules), first)
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        if method == "rtn":
            nnx.update(quantized, qwix.quantize_params(params, quantized))
            return quantized
        calibrating = qwix.quantize_model(model, gptq.GptqCalibrationProvider(rules), first)
        for batch in batches:
            calibrating(jnp.asarray(batch))
        stats = nnx.to_pure_dict(nnx.state(calibrating, qwix.QuantStat))
        nnx.update(quantized, gptq.quantize_params(params, quantized, stats))
        return quantized

    return quantize


def measure(
    library: str,
    method: str,
    inputs: str,
    bits: int,
    quantize: Callable[[nnx.Module, list], nnx.Module],
    model: TransformerLM,
    batches: list,
    test_perplexity: Callable[[nnx.Module], float],
) -> dict[str, Any]:
    """Cold and warm time of one quantizer and its model's test perplexity (or why it failed).

    `inputs` is what each layer is quantized from: "X~" (the partly quantized model's inputs,
    layer after layer), "X" (the float model's), "–" (nothing: round to nearest)."""
    row = {"library": library, "method": method, "inputs": inputs, "bits": bits}
    try:
        _, row["cold_seconds"] = timed(lambda: nnx.state(quantize(model, batches)))
        quantized, row["warm_seconds"] = timed(lambda: quantize(model, batches))
        row["test_perplexity"] = test_perplexity(quantized)
    except Exception as error:  # a peer's refusal is a result to report, not a crash
        row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
    print(row_markdown(row), flush=True)
    return row


HEADER = (
    "| bits | library | method | inputs | cold (s) | warm (s) | test perplexity |\n"
    "|---|---|---|---|---|---|---|"
)


def row_markdown(row: dict[str, Any]) -> str:
    head = f"| {row['bits']} | {row['library']} | {row['method']} | {row['inputs']} |"
    if "error" in row:
        return f"{head} – | – | {row['error']} |"
    return (
        f"{head} {row['cold_seconds']:.2f} | {row['warm_seconds']:.2f} "
        f"| {row['test_perplexity']:.2f} |"
    )


def ratios(rows: list[dict[str, Any]]) -> list[str]:
    """qjax time / qwix time for each qjax method against qwix GPTQ, cold and warm, per bits."""
    lines = []
    for bits in dict.fromkeys(r["bits"] for r in rows):
        ok = [r for r in rows if r["bits"] == bits and "error" not in r]
        peer = next((r for r in ok if (r["library"], r["method"]) == ("qwix", "gptq")), None)
        if peer is None:
            lines.append(f"{bits}-bit: qwix GPTQ did not run, no ratio")
            continue
        for mine in ok:
            if mine["library"] == "qjax":
                lines.append(
                    f"{bits}-bit qjax {mine['method'].upper()} (inputs {mine['inputs']}) / qwix "
                    "GPTQ: warm "
                    f"{mine['warm_seconds'] / peer['warm_seconds']:.3f} "
                    f"(×{peer['warm_seconds'] / mine['warm_seconds']:.1f} faster), cold "
                    f"{mine['cold_seconds'] / peer['cold_seconds']:.3f} "
                    f"(×{peer['cold_seconds'] / mine['cold_seconds']:.1f} faster)"
                )
    return lines


def main(argv):
    del argv
    try:
        import qwix
    except ImportError:
        print("qwix is not installed: pip install 'qjax[peers]' (or qwix>=0.1.8) to compare.")
        return
    config = FLAGS.config
    with tempfile.TemporaryDirectory() as scratch:
        if FLAGS.workdir:
            if config is None:
                from experiments.lm.configs import ptb

                config = ptb.get_config()
            workdir = FLAGS.workdir
        else:
            config = config or (small_config() if FLAGS.small else tiny.get_config())
            workdir = scratch
        model = ptq.float_model(config, workdir)
        corpus = pipeline.load_corpus(config)
        batches = ptq.calibration(corpus, config)
        test = lambda m: ptq.perplexity(m, corpus.test, config)
        print(
            f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}); qwix "
            f"{qwix.__version__}; model: {config.model.num_layers} layers, d_model "
            f"{config.model.d_model}, {len(corpus.vocab)} tokens; calibration "
            f"{config.ptq.calibration_sequences} × {config.seq_len} training tokens; float test "
            f"perplexity {test(model):.2f}\n"
        )
        print(HEADER)
        rows = []
        for bits in map(int, FLAGS.bits):
            for method, sequential in (("gpfq", True), ("gptq", True), ("gptq", False)):
                quantize = qjax_quantizer(method, bits, sequential=sequential)
                inputs = "X~" if sequential else "X"
                rows.append(measure("qjax", method, inputs, bits, quantize, model, batches, test))
            for method, inputs in (("gptq", "X"), ("rtn", "–"), ("qep", "X~")):
                quantize = qwix_quantizer(method, bits)
                rows.append(measure("qwix", method, inputs, bits, quantize, model, batches, test))
    print()
    print("\n".join(ratios(rows)))
    if FLAGS.out:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
        with open(FLAGS.out, "w") as file:
            json.dump({"command": "python -m benchmarks.peers", "rows": rows}, file, indent=1)


if __name__ == "__main__":
    app.run(main)
