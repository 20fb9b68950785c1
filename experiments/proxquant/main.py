"""ProxQuant vs BinaryConnect on CIFAR-10: float warm start, quantized training, sign changes.

    python -m experiments.proxquant.main --config=experiments/proxquant/configs/reduced.py \
        --workdir=/tmp/qjax/proxquant_reduced
"""

from absl import app, flags, logging
from ml_collections import config_flags

from experiments.proxquant import train

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
