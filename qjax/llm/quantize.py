"""Quantize a Hugging Face Llama-family checkpoint into a compressed-tensors checkpoint.

    python -m qjax.llm.quantize --model_dir=path/to/model --output_dir=path/to/out \
        --method=gptq --bits=4 --group_size=128 --grid=signed [--damping=0.01] \
        --calibration=ptb --num_samples=128 --seq_len=2048

writes `output_dir/` (config.json with its quantization_config, model.safetensors: a
pack-quantized checkpoint that transformers and vLLM load) plus `report.json` and `report.md`:
each layer's relative error ||XW - X~Q|| / ||XW|| (and round-to-nearest's), the time and the
peak host memory. Evaluate it with `python -m qjax.llm.perplexity --model_dir=path/to/out`.
"""

from absl import app, flags, logging

from qjax.engine import SCHEDULES
from qjax.llm import pipeline
from qjax.models import llama
from qjax.rules import LayerSpec

FLAGS = flags.FLAGS
flags.DEFINE_string("model_dir", None, "The float checkpoint (config.json + safetensors).")
flags.DEFINE_string("output_dir", None, "Where the quantized checkpoint and report go.")
flags.DEFINE_enum("method", "gptq", ["gpfq", "gptq", "qronos", "msq"], "Quantization method.")
flags.DEFINE_integer("bits", 4, "Bits b: 2^b letters (compressed-tensors stores 2 to 8).")
flags.DEFINE_integer("group_size", 128, "Inputs per scale group; 0: one scale per channel.")
flags.DEFINE_enum(
    "grid",
    "signed",
    ["signed", "asymmetric"],
    "signed: {-2^(b-1)..2^(b-1)-1}·s; asymmetric: (k-z)·s.",
)
flags.DEFINE_float(
    "damping",
    None,
    "Relative damping of gptq (λ·mean(diag G)) or qronos (α·||X~ᵀX~||₂); unset: the default.",
)
flags.DEFINE_float("c", None, "Scale constant C (1: absmax/min-max); unset: MSE-optimal per group.")
flags.DEFINE_string(
    "calibration", "ptb", "Calibration tokens: 'ptb', 'char', a .npy of ids or a text file."
)
flags.DEFINE_string("data_dir", None, "Where to look for PTB (default: the usual data folders).")
flags.DEFINE_integer("num_samples", 128, "Calibration sequences.")
flags.DEFINE_integer("seq_len", 2048, "Tokens per calibration sequence (at most the context).")
flags.DEFINE_integer("batch_size", 8, "Calibration sequences per forward pass.")
flags.DEFINE_integer("seed", 0, "Seed of the calibration draw.")
flags.DEFINE_list("skip", ["lm_head"], "Layer patterns kept float (if the model has them).")
flags.DEFINE_enum(
    "schedule",
    "auto",
    list(SCHEDULES),
    "How the model is run: block_wise (one decoder block at a time, memory independent of "
    "depth), one_pass, layer_by_layer; auto: one_pass unless it would not fit, then block_wise.",
)
flags.DEFINE_bool("sequential", True, "Each layer sees the inputs of the partly quantized model.")
flags.mark_flags_as_required(["model_dir", "output_dir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError("Too many command-line arguments.")
    logging.set_verbosity(logging.INFO)
    try:
        method = pipeline.make_method(FLAGS.method, damping=FLAGS.damping)
    except ValueError as e:
        raise app.UsageError(f"--damping: {e}") from e
    config = llama.LlamaConfig.from_hf(llama.read_config(FLAGS.model_dir))
    seq_len = min(FLAGS.seq_len, config.max_position_embeddings)
    tokens = pipeline.load_tokens(
        FLAGS.calibration, split="train", model_dir=FLAGS.model_dir, data_dir=FLAGS.data_dir
    )
    calibration = pipeline.calibration_batches(
        tokens,
        num_samples=FLAGS.num_samples,
        seq_len=seq_len,
        batch_size=FLAGS.batch_size,
        seed=FLAGS.seed,
    )
    spec = LayerSpec(
        method=method,
        bits=FLAGS.bits,
        c=FLAGS.c,
        rule="max",
        per_channel=True,
        group_size=FLAGS.group_size or None,
        grid=FLAGS.grid,
    )
    report = pipeline.quantize_checkpoint(
        FLAGS.model_dir,
        FLAGS.output_dir,
        calibration,
        spec=spec,
        skip=FLAGS.skip,
        sequential=FLAGS.sequential,
        schedule=FLAGS.schedule,
    )
    print(
        f"wrote {FLAGS.output_dir}: {len(report['layers'])} layers in "
        f"{report['quantize_seconds']:.1f} s, peak host memory "
        f"{report['peak_host_memory_bytes'] / 2**20:.0f} MiB"
    )


if __name__ == "__main__":
    app.run(main)
