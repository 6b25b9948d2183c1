"""End to end on the smoke presets: every stage, the report, a re-run that skips them all, and a
second run from scratch that reproduces every number."""

import json
import os
import subprocess
import sys

import jax
import pytest

from configs import demo
from nextaccel_jax.stages import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_smoke_pipeline_end_to_end(smoke_pipeline, monkeypatch):
  root, config, metrics = smoke_pipeline
  state = json.loads((root / "pipeline.json").read_text())
  assert list(state["stages"]) == list(pipeline.STEPS)
  assert all(s["done"] and s["wall_s"] > 0 for s in state["stages"].values())
  assert (root / "tensorflow_datasets").is_dir()
  report = (root / "evaluate" / "report.md").read_text()
  assert "Zero-filled" in report and "distilled" in report and "base" in report
  for family in ("cartesian_y", "cartesian_x", "gaussian_2d", "radial"):
    assert (root / "evaluate" / "figures" / f"{family}.png").is_file()
    for row in ("zero_filled", "base/argmax", "distilled/argmax", "distilled+DC/argmax"):
      assert f"{row}/{family}/paper/ssim" in metrics
  assert "| evaluate |" in (root / "pipeline.md").read_text()
  # The evaluation read the distilled student back from its export.
  assert (root / "export").is_dir()

  # A second run finds every stage done and runs nothing.
  def boom(name):
    raise AssertionError(f"stage {name} ran again")

  monkeypatch.setattr(pipeline, "_stage_fn", boom)
  monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
  pipeline.run(config, root)


# Fields of a metrics.jsonl line that measure the machine, not the run.
_TIMING = ("step_time_s",)


def _training_lines(workdir):
  lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [{k: v for k, v in line.items() if k not in _TIMING} for line in lines]


def test_the_same_command_twice_gives_identical_numbers(smoke_pipeline, tmp_path):
  root, _, metrics = smoke_pipeline
  # The README's command in a fresh process, its output a log file (no terminal). The built
  # dataset is reused: the data are the input of the comparison, not part of it.
  env = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS="true")
  env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir
  env.pop("TFDS_DATA_DIR", None)
  workdir = tmp_path / "again"
  out = subprocess.run(
    [
      sys.executable,
      "-m",
      "nextaccel_jax.main",
      "--config=configs/demo.py:smoke",
      f"--workdir={workdir}",
      f"--config.data_dir={root / 'tensorflow_datasets'}",
    ],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  again = json.loads((workdir / "evaluate" / "metrics.json").read_text())
  assert again.keys() == metrics.keys()
  differ = [k for k in metrics if again[k] != metrics[k] and metrics[k] == metrics[k]]
  assert not differ, [(k, metrics[k], again[k]) for k in differ[:5]]
  for stage in ("aqvae", "student", "teacher", "distill", "unet"):
    assert _training_lines(workdir / stage) == _training_lines(root / stage), stage

  # What the user reads: a short console with progress and results, no library chatter.
  console = (out.stdout + out.stderr).splitlines()
  assert len(console) < 100, "\n".join(console)
  for k, stage in enumerate(pipeline.STEPS, 1):
    assert any(f"[pipeline {k}/{len(pipeline.STEPS)}] {stage}" in line for line in console), stage
  for stage in ("aqvae", "student", "teacher", "distill", "unet"):
    assert any(line.startswith(f"{stage} ") and "(100%)" in line for line in console), stage
  assert any(line.startswith("unet: recon/psnr") for line in console)
  assert any(line.startswith("## Winners") for line in console)
  assert not any("orbax" in line.lower() or "checkpoint_manager" in line for line in console)


def test_demo_presets_split_the_budget():
  short, long = demo.get_config("demo"), demo.get_config("long")
  for stage in ("aqvae", "student", "teacher", "distill"):
    assert long[stage].num_epochs > short[stage].num_epochs, stage
    # Same models: the long run differs only in how long each stage trains.
    assert long[stage].get("model") == short[stage].get("model"), stage
  assert long.unet.num_train_steps > short.unet.num_train_steps
  assert short.unet.eval.every == short.unet.num_train_steps // 4
  with pytest.raises(ValueError, match="unknown preset 'paper'"):
    demo.get_config("paper")


def test_one_seed_for_every_stage(tmp_path):
  config = demo.get_config("smoke")
  config.seed = 3
  stages = pipeline.stage_configs(config, tmp_path)
  seeded = [n for n, c in stages.items() if "seed" in c]
  assert set(seeded) >= {"aqvae", "student", "teacher", "distill", "unet", "evaluate"}
  assert all(stages[n].seed == 3 for n in seeded)


def test_a_rerun_names_what_changed_and_redoes_only_what_it_affects(tmp_path, monkeypatch, capsys):
  config = demo.get_config("smoke")
  recorded = {
    name: {"done": True, "wall_s": 60.0, "config": json.loads(json.dumps(c.to_dict(), default=str))}
    for name, c in pipeline.stage_configs(config, tmp_path).items()
  }
  for name in recorded:
    (tmp_path / name).mkdir()
  (tmp_path / "pipeline.json").write_text(json.dumps({"stages": recorded}))
  ran = []
  monkeypatch.setattr(pipeline, "_stage_fn", lambda name: lambda c, w, **kw: ran.append(name) or {})
  monkeypatch.delenv("TFDS_DATA_DIR", raising=False)

  # Logging and checkpoint periods do not change what a stage trained: nothing runs.
  config.unet.log_every = 7
  config.aqvae.ckpt.every = 5
  pipeline.run(config, tmp_path)
  assert ran == []
  out = capsys.readouterr().out
  assert "unet: kept; only run settings changed: log_every" in out
  assert "aqvae: kept; only run settings changed: ckpt.every" in out

  # The student's length changes the student and everything built on it, nothing else.
  config.student.num_train_steps = 5
  pipeline.run(config, tmp_path)
  assert ran == ["student", "teacher", "distill", "export", "evaluate"]
  out = capsys.readouterr().out
  assert "student: runs again (config.student.num_train_steps:" in out
  assert "distill: runs again (it builds on student, teacher, which runs again)" in out
  # The previous folders are kept aside, not deleted.
  assert len(list(tmp_path.glob("student.before-*"))) == 1
  assert (tmp_path / "aqvae").is_dir() and not list(tmp_path.glob("aqvae.before-*"))
  ran.clear()
  pipeline.run(config, tmp_path)
  assert ran == []
