"""Export of the paper's CIFAR-10 CNN after GPFQ (full CIFAR-10 from ../shared/data).

Run from the repository root (training takes about 25 minutes on 2 CPU cores; to reuse the float
checkpoint in a workdir of the GPFQ experiment, add --config.allow_config_change=True, since the
export fields make this a different config):
  python -m experiments.export.main --config=experiments/export/configs/cifar10.py \
      --workdir=/tmp/qjax/export_cifar10
Tiny variant (seconds, for the tests): --config=experiments/export/configs/cifar10.py:tiny
"""

import ml_collections

from experiments.export.configs import export_fields
from experiments.gpfq.configs import cifar10


def get_config(variant: str = "full") -> ml_collections.ConfigDict:
    config = cifar10.get_config(variant)
    export_fields(config)
    return config
