"""Two processes × four CPU devices on 127.0.0.1 train stage 2 like one process with eight (the
smoke pipeline's student): the same losses and validation, checkpoints written by both, and a
restart of both processes resumes from them."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  # Tiny models spend their time in XLA's optimisation passes; every run here skips them alike.
  env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
  env.pop("JAX_COORDINATOR_ADDRESS", None)
  # The session's compilation cache: the restarted processes compile what the first ones did.
  env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
  return env


def _main_args(workdir, root, max_steps: int) -> list[str]:
  # The smoke pipeline's student config: the student smoke preset on its data and tokenizer.
  return [
    sys.executable,
    "-m",
    "nextaccel_jax.main",
    "--config=configs/student.py:smoke",
    f"--workdir={workdir}",
    f"--config.data.data_dir={root / 'tensorflow_datasets'}",
    "--config.data.build=False",
    f"--config.tokenizer_from={root / 'aqvae'}",
    f"--config.max_steps_per_run={max_steps}",
  ]


def _run_processes(commands, envs, timeout=600):
  procs = [
    subprocess.Popen(
      c, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    for c, e in zip(commands, envs, strict=True)
  ]
  outputs = []
  try:
    for p in procs:
      out, _ = p.communicate(timeout=timeout)
      outputs.append(out)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, out in zip(procs, outputs, strict=True):
    assert p.returncode == 0, out[-4000:]
  return outputs


def _multi(workdir, root, max_steps: int):
  port = _free_port()
  base = _main_args(workdir, root, max_steps)
  commands = [
    base + [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"]
    for i in range(2)
  ]
  return _run_processes(commands, [_env(4), _env(4)])


def _train_losses(workdir: pathlib.Path) -> dict[int, float]:
  lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["loss"] for r in lines if r["split"] == "train"}


def _steps(workdir: pathlib.Path) -> list[int]:
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.mark.slow
def test_two_processes_match_one_and_resume(smoke_pipeline, tmp_path):
  root = smoke_pipeline[0]
  single, multi = root / "student", tmp_path / "multi"
  written = json.loads((single / "config.json").read_text())
  steps = written["num_train_steps"]

  # Both processes stop after two steps, as a job at the end of its allocation would...
  outputs = _multi(multi, root, max_steps=2)
  # (the command line gives the pipeline's student config, but for the per-run step limit)
  ran = json.loads((multi / "config.json").read_text())
  assert {**ran, "max_steps_per_run": 0} == written
  for i, out in enumerate(outputs):
    assert f"process {i} of 2, 4 local / 8 global" in out, out[-2000:]
  assert _steps(multi) == [2]
  assert sorted(_train_losses(multi)) == [1, 2]
  # ...and a fresh start of both continues from the checkpoint they wrote together.
  outputs = _multi(multi, root, max_steps=0)
  assert any("resumed" in out and "at step 2" in out for out in outputs), outputs[0][-2000:]
  assert _steps(multi)[-1] == steps

  want, got = _train_losses(single), _train_losses(multi)
  assert sorted(got) == sorted(want) == list(range(1, steps + 1))
  for step in want:
    assert got[step] == pytest.approx(want[step], rel=1e-5), step
  # Both validated the final step over the whole validation split (gathered across processes).
  final_single = json.loads((single / "final_metrics.json").read_text())
  final_multi = json.loads((multi / "final_metrics.json").read_text())
  for key in ("ce", "acc", "recon/psnr", "recon/ssim"):
    assert final_multi[key] == pytest.approx(final_single[key], rel=1e-4), key
