"""ProxQuant vs straight-through multi-bit quantization of an LSTM language model on PTB.

    python -m experiments.ptb.main --config=experiments/ptb/configs/medium.py \
        --workdir=/tmp/qjax/ptb_medium
"""

from absl import app, flags, logging
from ml_collections import config_flags

from experiments.ptb import train

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints and results.")
config_flags.DEFINE_config_file("config", None, "Experiment configuration file.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    logging.set_verbosity(logging.INFO)
    results = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    print(train.results_table(results))


if __name__ == "__main__":
    app.run(main)
