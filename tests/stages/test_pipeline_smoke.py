"""End to end on the smoke presets: every stage, the report, and a re-run that skips them all."""

import json

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
