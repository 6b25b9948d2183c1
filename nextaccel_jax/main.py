"""Command-line entry point: reads the config, sets up JAX, dispatches to the stage.

  python -m nextaccel_jax.main --config=configs/demo.py --workdir=/tmp/nextaccel_demo

Kept short on purpose: the work lives in functions that tests and notebooks call directly.
"""

from __future__ import annotations

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from nextaccel_jax.data import prepare
from nextaccel_jax.stages import aqvae, transformer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and reports.")
flags.mark_flags_as_required(["config", "workdir"])

STAGES = {
  "data": prepare.run,
  "aqvae": aqvae.train_and_evaluate,
  "transformer": transformer.train_and_evaluate,
}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  if config.stage not in STAGES:
    raise app.UsageError(f"config.stage {config.stage!r} is not one of {sorted(STAGES)}")
  logging.info(
    "JAX %s on %d %s device(s)", jax.__version__, jax.device_count(), jax.default_backend()
  )
  STAGES[config.stage](config, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
