"""Quantize the trained transformer LM with GPFQ, GPTQ and RTN at 4, 3 and 2 bits.

    python -m experiments.lm.quantize --config=experiments/lm/configs/tiny.py \
        --workdir=/tmp/qjax/lm_tiny

The workdir is the one `experiments.lm.main` trained (it is trained first if it holds no float
model); results go to `<workdir>/ptq` (see `experiments.lm.ptq`).
"""

from absl import app, flags, logging
from ml_collections import config_flags

from experiments.lm import ptq

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "The float model's workdir; results go to <workdir>/ptq.")
config_flags.DEFINE_config_file("config", None, "Experiment configuration file.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError("Too many command-line arguments.")
    logging.set_verbosity(logging.INFO)
    logging.info("config:\n%s", FLAGS.config)
    results = ptq.run(FLAGS.config, FLAGS.workdir)
    print(ptq.results_markdown(results))


if __name__ == "__main__":
    app.run(main)
