"""End to end on the smoke presets: every stage, the report, a re-run that skips them all, and a
second run from scratch that reproduces every number."""

import json

import jax
import pytest

from configs import demo
from nextaccel_jax.stages import pipeline


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

  # A finished stage whose config changed is refused, not silently reused.
  changed = demo.get_config("smoke")
  changed.student.num_train_steps = 5
  with pytest.raises(ValueError, match="finished with a different config"):
    pipeline.run(changed, root)


# Fields of a metrics.jsonl line that measure the machine, not the run.
_TIMING = ("step_time_s",)


def _training_lines(workdir):
  lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return [{k: v for k, v in line.items() if k not in _TIMING} for line in lines]


def test_the_same_command_twice_gives_identical_numbers(smoke_pipeline, tmp_path, monkeypatch):
  root, _, metrics = smoke_pipeline
  config = demo.get_config("smoke")
  # The built dataset is reused: the data are the input of the comparison, not part of it.
  config.data_dir = str(root / "tensorflow_datasets")
  monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    again = pipeline.run(config, tmp_path)
  finally:
    jax.config.update("jax_disable_most_optimizations", previous)
  assert again.keys() == metrics.keys()
  differ = [k for k in metrics if again[k] != metrics[k] and metrics[k] == metrics[k]]
  assert not differ, [(k, metrics[k], again[k]) for k in differ[:5]]
  for stage in ("aqvae", "student", "teacher", "distill", "unet"):
    assert _training_lines(tmp_path / stage) == _training_lines(root / stage), stage


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
