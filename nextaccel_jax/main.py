r"""Command-line entry point: reads the config, sets up JAX, dispatches to the stage.

  python -m nextaccel_jax.main --config=configs/demo.py --workdir=runs/demo
  python -m nextaccel_jax.main --config=configs/distill.py:paper --workdir=runs/distill \
      --config.init_from=runs/student --config.teacher_from=runs/teacher

Configs and presets: `--config=configs/<name>.py:<preset>`. The stage configs (data, aqvae,
student, teacher, distill, eval, pipeline, ablations) have the presets `paper` (256², real
fastMRI), `demo` (64² synthetic data, two CPU cores; the default when no preset is named) and
`smoke` (seconds, for tests); `configs/demo.py` has `demo` (half an hour), `long` (about two
hours) and `smoke`; `configs/baseline.py:<model>[,<preset>]` takes `unet` or `varnet`. Any field
is overridden with `--config.<field>=<value>` (nested: `--config.optim.lr=3e-4`,
`--config.data.batch_size=16`); a mistyped field is named with a "did you mean".

`config.stage` picks the function; every stage has the signature `(config, workdir) -> metrics`
and is importable for tests and notebooks. On several hosts (a TPU pod slice, a SLURM or
Open MPI job, or an explicit coordinator) `jax.distributed.initialize()` runs first; the
cluster is auto-detected, `--multihost` forces the choice either way. Elsewhere (several
processes on one machine, a cluster JAX does not know) name the job explicitly:

  python -m nextaccel_jax.main --config=... --workdir=... \
      --coordinator_address=10.0.0.1:12355 --num_processes=2 --process_id=0

or set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (flags win).
"""

from __future__ import annotations

import logging as std_logging
import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from nextaccel_jax import ConfigError, SetupError

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "configs/<name>.py[:<preset>] (presets paper, demo, smoke; demo when none is named); override "
  "any field with --config.<field>=<value>.",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and reports.")
_MULTIHOST = flags.DEFINE_enum(
  "multihost",
  "auto",
  ["auto", "yes", "no"],
  "Call jax.distributed.initialize(): auto = when the environment names several processes.",
)
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address",
  None,
  "host:port of process 0's coordinator (default $JAX_COORDINATOR_ADDRESS, else auto-detected).",
)
_NUM_PROCESSES = flags.DEFINE_integer(
  "num_processes", None, "Processes in the job (default $JAX_NUM_PROCESSES, else auto-detected)."
)
_PROCESS_ID = flags.DEFINE_integer(
  "process_id", None, "This process's index (default $JAX_PROCESS_ID, else auto-detected)."
)
flags.mark_flags_as_required(["config", "workdir"])


def _stages() -> dict:
  # Imported here so `--help` and config errors do not pay for loading every stage.
  from nextaccel_jax.stages import (
    ablations,
    baseline,
    evaluate,
    pipeline,
    stage1_aqvae,
    stage2_transformer,
    stage3_distill,
  )
  from nextaccel_jax.stages import data as data_stage

  return {
    "data": data_stage.run,
    "aqvae": stage1_aqvae.train_and_evaluate,
    "transformer": stage2_transformer.train_and_evaluate,
    "distill": stage3_distill.train_and_evaluate,
    "baseline": baseline.train_and_evaluate,
    "evaluate": evaluate.run,
    "ablations": ablations.run,
    "pipeline": pipeline.run,
  }


def _env_int(name: str) -> int:
  try:
    return int(os.environ.get(name, "1").split("(")[0])
  except ValueError:
    return 1


def _env_optional_int(name: str) -> int | None:
  value = os.environ.get(name, "").strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError as e:
    raise ValueError(f"${name}={value!r} is not an integer") from e


def is_multihost_environment() -> bool:
  """Whether the environment describes a job of several processes."""
  if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("COORDINATOR_ADDRESS"):
    return True
  if _env_int("SLURM_NTASKS") > 1 or _env_int("OMPI_COMM_WORLD_SIZE") > 1:
    return True
  # TPU VMs of a multi-host slice list every worker.
  return len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


def initialize_distributed(
  mode: str = "auto",
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> bool:
  """Runs `jax.distributed.initialize()` when asked, named or detected.

  Arguments left as None come from $JAX_COORDINATOR_ADDRESS, $JAX_NUM_PROCESSES and
  $JAX_PROCESS_ID, then from JAX's cluster auto-detection (TPU pods, SLURM, Open MPI).
  """
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
  if num_processes is None:
    num_processes = _env_optional_int("JAX_NUM_PROCESSES")
  if process_id is None:
    process_id = _env_optional_int("JAX_PROCESS_ID")
  named = num_processes is not None and num_processes > 1
  if mode == "no" or (mode == "auto" and not named and not is_multihost_environment()):
    return False
  if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"--process_id={process_id} must lie in [0, --num_processes={num_processes})")
  jax.distributed.initialize(
    coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
  )
  return True


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class QuietThirdParty(std_logging.Filter):
  """Keeps the project's own log records and the warnings of other libraries.

  Orbax logs every file operation at INFO (hundreds of lines per stage), TFDS and absl more;
  that breaks the progress display and hides what the run says.
  """

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.pathname.startswith(_PACKAGE_DIR):
      return True
    return record.levelno >= std_logging.WARNING


def quiet_third_party_logs() -> None:
  """Installs `QuietThirdParty` on the absl handler (which every library's logging reaches)."""
  handler = logging.get_absl_handler()
  if not any(isinstance(f, QuietThirdParty) for f in handler.filters):
    handler.addFilter(QuietThirdParty())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    quiet_third_party_logs()
  config = _CONFIG.value
  config_file = flags.FLAGS["config"].config_filename
  if ":" not in config_file:
    print(f"{config_file}: no preset named, so its demo preset runs (see --help for the others)")
  stages = _stages()
  stage = config.get("stage")
  if stage not in stages:
    raise app.UsageError(
      f"{flags.FLAGS['config'].config_filename}: config.stage {stage!r} is not one of "
      f"{sorted(stages)}"
    )
  try:
    initialize_distributed(
      _MULTIHOST.value, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value
    )
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
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
    check_workdir(_WORKDIR.value)
    stages[stage](config, _WORKDIR.value)
  except SetupError as e:
    # Set-up mistakes (missing data, previous stage or weights) get one clear line; a fault of
    # the code raises anything else and keeps its traceback.
    if os.environ.get("NEXTACCEL_TRACEBACK"):
      raise
    _exit_with(f"{e} [NEXTACCEL_TRACEBACK=1 shows where]")


def check_workdir(workdir: str) -> None:
  """Raises `ConfigError` when `workdir` exists and is not a folder."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir={workdir} is a file, not a folder; choose a new folder")


def _exit_with(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def config_error_line(error: BaseException, argv: list[str]) -> str:
  """One line for a config that does not load: a wrong preset or a mistyped `--config.<field>`.

  `ml_collections` reports an unknown field as an AttributeError (its first line the quoted
  field, then its own "Did you mean" hint) and a failing `get_config` as a flags error holding
  the whole traceback; the user needs the field, the hint and the last line of that traceback.
  """
  if isinstance(error, AttributeError | KeyError):
    text = str(error.args[0] if error.args else error)
    lines = [ln.strip() for ln in text.strip("'\"").replace("\\n", "\n").split("\n") if ln]
    field = lines[0].strip("'\"\\") if lines else "?"
    flag = next((a.split("=")[0] for a in argv if a.startswith("--config.") and field in a), "")
    hint = next((ln.strip("'\"") for ln in lines[1:] if ln.startswith("Did you mean")), "")
    where = f"{flag}: " if flag else ""
    return f"{where}config has no field {field!r}" + (
      f"; {hint[0].lower()}{hint[1:]}" if hint else ""
    )
  lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
  head = lines[0] if lines else type(error).__name__
  # The flag's own line names the file and preset; the traceback's last line says what failed.
  last = lines[-1] if len(lines) > 1 and "Traceback" in str(error) else ""
  head = head.split(": Error whilst parsing config file")[0]
  return f"{head}: {last}" if last else head


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with config files that fail to load reported in one line."""
  try:
    argv = flags.FLAGS(argv)
    # A missing config file is only reported when the config is first read, with a trace.
    path = (flags.FLAGS["config"].config_filename or "").split(":", 1)[0]
    if path and not os.path.isfile(path):
      raise ConfigError(f"--config: no such config file {path}")
    return argv
  except (flags.Error, AttributeError, KeyError, ValueError, TypeError) as e:
    if os.environ.get("NEXTACCEL_TRACEBACK"):
      raise
    _exit_with(config_error_line(e, argv))
    raise  # unreachable: `_exit_with` exits


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
