"""Train a small Llama-family model on Penn Treebank, save it as a Hugging Face checkpoint, then
quantize it with GPFQ, Qronos, GPTQ and round to nearest into compressed-tensors checkpoints and
measure their test perplexity.

    python -m experiments.llm.main --config=experiments/llm/configs/tiny.py \
        --workdir=/tmp/qjax/llm_tiny
"""

from absl import app, flags, logging
from ml_collections import config_flags

from experiments.llm import pipeline

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, the models and results.")
config_flags.DEFINE_config_file("config", None, "Experiment configuration file.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError("Too many command-line arguments.")
    logging.set_verbosity(logging.INFO)
    logging.info("config:\n%s", FLAGS.config)
    results = pipeline.run(FLAGS.config, FLAGS.workdir)
    print(pipeline.results_markdown(results))


if __name__ == "__main__":
    app.run(main)
