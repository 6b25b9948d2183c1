"""The demo on built-in synthetic data (fastMRI-format volumes made from the MNI152 template).

  python -m nextaccel_jax.main --config=configs/demo.py --workdir=runs/demo

Builds the demo dataset and prints its summary; `:smoke` is a tiny version for tests.
"""

import ml_collections

from configs import common
from configs import data as data_config


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
  return data_config.get_config(common.check_preset(arg, ("demo", "smoke")))
