"""Train a transformer language model and measure its float perplexity (the PTQ experiment's base).

    python -m experiments.lm.main --config=experiments/lm/configs/tiny.py \
        --workdir=/tmp/qjax/lm_tiny
"""

from absl import app, flags, logging
from ml_collections import config_flags

from experiments.lm import pipeline

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, the float model and results.")
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
