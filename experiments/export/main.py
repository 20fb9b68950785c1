"""Export a trained, quantized classifier to packed integer codes and evaluate the packed model.

  python -m experiments.export.main --config=experiments/export/configs/mnist_embedded.py \
      --workdir=/tmp/qjax/export_mnist
"""

from absl import app, flags, logging
from ml_collections import config_flags

from experiments.export import pipeline

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, results.json, results.md, plots.")
config_flags.DEFINE_config_file("config", None, "Experiment configuration file.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError("Too many command-line arguments.")
    logging.info("config:\n%s", FLAGS.config)
    pipeline.export_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
