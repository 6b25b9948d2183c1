"""The demo on built-in synthetic data (fastMRI-format volumes made from the MNI152 template).

  python -m nextaccel_jax.main --config=configs/demo.py --workdir=/tmp/nextaccel_demo

Builds the demo dataset and prints its summary; `:smoke` is a tiny version for tests.
"""

import ml_collections

from configs import data as data_config


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
  if arg not in ("demo", "smoke"):
    raise ValueError(f"unknown preset {arg!r}; choose demo or smoke")
  return data_config.get_config(arg)
