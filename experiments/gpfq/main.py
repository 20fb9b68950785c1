"""GPFQ experiments: train a float model, quantize it with GPFQ, MSQ and GPTQ, evaluate.

  python -m experiments.gpfq.main --config=experiments/gpfq/configs/mnist_embedded.py \
      --workdir=/tmp/emb
"""

from absl import app, flags, logging
from ml_collections import config_flags

from experiments.gpfq import pipeline

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, results.json, tables, plots.")
config_flags.DEFINE_config_file("config", None, "Experiment configuration file.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError("Too many command-line arguments.")
    logging.info("config:\n%s", FLAGS.config)
    pipeline.run(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
