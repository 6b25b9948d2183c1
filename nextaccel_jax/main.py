"""Command-line entry point: reads the config, sets up JAX, dispatches to the stage.

  python -m nextaccel_jax.main --config=configs/demo.py --workdir=runs/demo
  python -m nextaccel_jax.main --config=configs/distill.py:paper --workdir=runs/distill \
      --config.init_from=runs/student --config.teacher_from=runs/teacher

`config.stage` picks the function; every stage has the signature `(config, workdir) -> metrics`
and is importable for tests and notebooks. On several hosts (a TPU pod slice, a SLURM or
Open MPI job, or an explicit coordinator) `jax.distributed.initialize()` runs first; the
cluster is auto-detected, `--multihost` forces the choice either way.
"""

from __future__ import annotations

import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and reports.")
_MULTIHOST = flags.DEFINE_enum(
  "multihost",
  "auto",
  ["auto", "yes", "no"],
  "Call jax.distributed.initialize(): auto = when the environment names several processes.",
)
flags.mark_flags_as_required(["config", "workdir"])


def _stages() -> dict:
  # Imported here so `--help` and config errors do not pay for loading every stage.
  from nextaccel_jax.data import prepare
  from nextaccel_jax.stages import aqvae, distill, evaluate, pipeline, transformer

  return {
    "data": prepare.run,
    "aqvae": aqvae.train_and_evaluate,
    "transformer": transformer.train_and_evaluate,
    "distill": distill.train_and_evaluate,
    "evaluate": evaluate.run,
    "pipeline": pipeline.run,
  }


def _env_int(name: str) -> int:
  try:
    return int(os.environ.get(name, "1").split("(")[0])
  except ValueError:
    return 1


def is_multihost_environment() -> bool:
  """Whether the environment describes a job of several processes."""
  if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("COORDINATOR_ADDRESS"):
    return True
  if _env_int("SLURM_NTASKS") > 1 or _env_int("OMPI_COMM_WORLD_SIZE") > 1:
    return True
  # TPU VMs of a multi-host slice list every worker.
  return len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


def initialize_distributed(mode: str = "auto") -> bool:
  """Runs `jax.distributed.initialize()` (cluster auto-detection) when asked or detected."""
  if mode == "no" or (mode == "auto" and not is_multihost_environment()):
    return False
  jax.distributed.initialize()
  return True


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  stages = _stages()
  stage = config.get("stage")
  if stage not in stages:
    raise app.UsageError(
      f"{flags.FLAGS['config'].config_filename}: config.stage {stage!r} is not one of "
      f"{sorted(stages)}"
    )
  initialize_distributed(_MULTIHOST.value)
  logging.info(
    "JAX %s, process %d of %d, %d local / %d global %s device(s)",
    jax.__version__,
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
    jax.default_backend(),
  )
  try:
    stages[stage](config, _WORKDIR.value)
  except (FileNotFoundError, ValueError) as e:
    # Set-up mistakes (missing data, previous stage or weights) get one clear line, not a trace.
    if os.environ.get("NEXTACCEL_TRACEBACK"):
      raise
    print(f"error: {e}\n(set NEXTACCEL_TRACEBACK=1 to see where it was raised)", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
