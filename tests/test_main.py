"""The command line: clear one-line errors for set-up mistakes, multi-host detection."""

import os
import re
import subprocess
import sys

import pytest
from absl.testing import flagsaver

from nextaccel_jax import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", TFDS_DATA_DIR=str(tmp_path / "tfds"))
  env.pop("NEXTACCEL_TRACEBACK", None)
  env["XLA_FLAGS"] = ""
  return subprocess.run(
    [sys.executable, "-m", "nextaccel_jax.main", f"--workdir={tmp_path / 'work'}", *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )


def test_unknown_preset_is_named(tmp_path):
  out = _cli("--config=configs/distill.py:huge", tmp_path=tmp_path)
  assert out.returncode != 0
  assert "unknown preset 'huge'" in out.stderr
  assert "paper, demo, smoke" in out.stderr


def test_missing_previous_stage_and_missing_data(tmp_path):
  out = _cli("--config=configs/distill.py:smoke", tmp_path=tmp_path)
  assert out.returncode == 2
  assert "config.init_from is empty" in out.stderr
  assert "Traceback" not in out.stderr
  missing = tmp_path / "no_student"
  out = _cli(
    "--config=configs/student.py:smoke", f"--config.tokenizer_from={missing}", tmp_path=tmp_path
  )
  assert out.returncode == 2
  assert f"config.tokenizer_from={missing}: no such directory" in out.stderr
  # The paper preset never builds on its own: the missing dataset says how to get it.
  out = _cli("--config=configs/aqvae.py:paper", tmp_path=tmp_path)
  assert out.returncode == 2
  assert "fastmri_brain_multiscale/fastmri is not built" in out.stderr
  assert "manual_dir" in out.stderr and "configs/demo.py" in out.stderr


@pytest.mark.parametrize(
  "args, message",
  [
    (["--config=configs/aqvae.py:huge"], "unknown preset 'huge'; choose one of paper, demo, smoke"),
    (
      ["--config=configs/aqvae.py:smoke", "--config.num_epoch=1"],
      "--config.num_epoch: config has no field 'num_epoch'; did you mean \"num_epochs\"",
    ),
    (["--config=configs/aqvae.py:smoke", "--config.optim.nope=1"], "no field 'nope'"),
    (["--config=configs/no_such.py"], "--config: no such config file configs/no_such.py"),
  ],
)
def test_config_mistakes_end_with_one_line(tmp_path, args, message):
  out = _cli(*args, tmp_path=tmp_path)
  assert out.returncode == 2
  # Everything but absl's log lines (`I1203 18:30:03.5 ...`) is what the user reads.
  errors = [ln for ln in out.stderr.splitlines() if not re.match(r"[IWEF]\d{4} ", ln)]
  assert len(errors) == 1 and errors[0].startswith("error: "), out.stderr
  assert message in errors[0]


def test_help_lists_presets_and_overrides(tmp_path):
  out = _cli("--helpshort", tmp_path=tmp_path)
  assert "presets paper, demo, smoke" in out.stdout
  assert "--config.<field>=<value>" in out.stdout and "did you mean" in out.stdout


def test_a_workdir_that_is_a_file_ends_with_one_line(tmp_path):
  (tmp_path / "work").write_text("not a folder")
  out = _cli("--config=configs/aqvae.py:smoke", tmp_path=tmp_path)
  assert out.returncode == 2
  assert "Traceback" not in out.stderr
  assert f"--workdir={tmp_path / 'work'} is a file, not a folder" in out.stderr
  assert (tmp_path / "work").read_text() == "not a folder"


def test_a_fault_inside_a_stage_keeps_its_traceback(tmp_path, monkeypatch):
  def broken(config, workdir):
    raise ValueError("an internal fault")

  def setup(config, workdir):
    raise main.ConfigError("config.x: a set-up mistake")

  monkeypatch.setattr(main, "_stages", lambda: {"aqvae": broken, "data": setup})
  monkeypatch.setattr(main, "initialize_distributed", lambda *a: False)
  monkeypatch.delenv("NEXTACCEL_TRACEBACK", raising=False)
  args = ["prog", f"--workdir={tmp_path / 'w'}"]
  with flagsaver.flagsaver():
    main.parse_flags(args + ["--config=configs/aqvae.py:smoke"])
    # Not a set-up error: `main` lets it through, so absl prints the whole trace.
    with pytest.raises(ValueError, match="an internal fault"):
      main.main(["prog"])
  with flagsaver.flagsaver():
    main.parse_flags(args + ["--config=configs/data.py:smoke"])
    with pytest.raises(SystemExit) as exit_info:
      main.main(["prog"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize(
  "env, expected",
  [
    ({}, False),
    ({"SLURM_NTASKS": "1"}, False),
    ({"SLURM_NTASKS": "4"}, True),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, True),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, True),
    ({"TPU_WORKER_HOSTNAMES": "t1"}, False),
    ({"TPU_WORKER_HOSTNAMES": "t1,t2"}, True),
  ],
)
def test_multihost_detection(monkeypatch, env, expected):
  for name in (
    "SLURM_NTASKS",
    "OMPI_COMM_WORLD_SIZE",
    "JAX_COORDINATOR_ADDRESS",
    "COORDINATOR_ADDRESS",
    "TPU_WORKER_HOSTNAMES",
  ):
    monkeypatch.delenv(name, raising=False)
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  assert main.is_multihost_environment() is expected
  assert main.initialize_distributed("no") is False


def test_named_jobs_reach_jax_distributed(monkeypatch):
  calls = []
  monkeypatch.setattr(main.jax.distributed, "initialize", lambda **kw: calls.append(kw))
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS"):
    monkeypatch.delenv(name, raising=False)
  # One process is no job to join.
  assert main.initialize_distributed("auto", num_processes=1) is False
  assert main.initialize_distributed("auto", "127.0.0.1:9", 2, 1) is True
  assert calls[-1] == {"coordinator_address": "127.0.0.1:9", "num_processes": 2, "process_id": 1}
  # The environment fills what the flags leave out.
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:5")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
  monkeypatch.setenv("JAX_PROCESS_ID", "3")
  assert main.initialize_distributed() is True
  assert calls[-1] == {"coordinator_address": "10.0.0.1:5", "num_processes": 4, "process_id": 3}
  with pytest.raises(ValueError, match="process_id=4 must lie in"):
    main.initialize_distributed("auto", process_id=4)
  monkeypatch.setenv("JAX_NUM_PROCESSES", "four")
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='four' is not an integer"):
    main.initialize_distributed()
