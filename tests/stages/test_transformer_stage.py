"""Stage 2 on the smoke preset: student and teacher training, resume, sharding, errors."""

import json

import jax
import numpy as np
import pytest

from configs import transformer as transformer_config
from nextaccel_jax import checkpointing, sharding
from nextaccel_jax.data import pipeline
from nextaccel_jax.stages import common
from nextaccel_jax.stages import stage2_transformer as transformer


def _config(role, data_dir, tokenizer_dir, **overrides):
  config = transformer_config.get_config(role, "smoke")
  config.data.data_dir = data_dir
  config.tokenizer_from = tokenizer_dir
  config.update_from_flattened_dict(overrides)
  return config


def _train(workdir, key="loss"):
  lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r[key] for r in lines if r.get("split") == "train"}


def test_student_smoke_run(smoke_pipeline):
  # The smoke pipeline's student is this stage's smoke run (with a 4-step stage-1 tokenizer).
  workdir = smoke_pipeline[0] / "student"
  final = json.loads((workdir / "final_metrics.json").read_text())
  for key in ["ce", "acc", "recon/ssim", "recon/psnr", "recon/lpips_alex", "zero_filled/ssim"] + [
    f"{m}/scale_{k}" for m in ("ce", "acc") for k in range(1, 6)
  ]:
    assert np.isfinite(final[key]), key
  per_family = [k for k in final if k.startswith("recon/") and k.count("/") == 2]
  assert per_family and all(np.isfinite(final[k]) for k in per_family)
  # A near-uniform start: the CE is close to log V.
  assert final["ce"] == pytest.approx(np.log(64), abs=1.0)
  assert set(_train(workdir, "prefix_prob").values()) == {0.0}
  with checkpointing.Checkpointer(workdir) as ckpt:
    assert ckpt.latest_step() == 3


def test_teacher_resume_is_exact(smoke_pipeline, stage_config, tmp_path):
  # The teacher's prefix noise and dropout keys are functions of (seed, step), so a resumed run
  # repeats the straight run's losses: the pipeline's teacher (three steps, started from the
  # student) against the same config in two invocations.
  straight, split = smoke_pipeline[0] / "teacher", tmp_path / "split"
  for _ in range(2):
    transformer.train_and_evaluate(stage_config("teacher", max_steps_per_run=2), split)
  a, b = _train(straight), _train(split)
  assert sorted(b) == sorted(a) == [1, 2, 3]
  for step in (1, 2, 3):
    assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), step
  assert all(p > 0 for p in _train(straight, "prefix_prob").values())


def test_frozen_context_encoder_does_not_move(smoke_data_dir, tokenizer_dir):
  config = _config("student", smoke_data_dir, tokenizer_dir, trainable_context_encoder=False)
  mesh = sharding.make_mesh()
  tok_vars = transformer.load_tokenizer(config, transformer.make_tokenizer(config), mesh)
  step = transformer.build_step(config, mesh, tok_vars, 3)
  state = step.state
  # The context encoder starts as the stage-1 encoder.
  jax.tree.map(
    np.testing.assert_array_equal,
    jax.device_get(state.params["context_encoder"]),
    jax.device_get(tok_vars["params"]["encoder"]),
  )
  src = pipeline.load_split("fastmri_brain_multiscale/smoke", "train", smoke_data_dir)
  loader = pipeline.TrainLoader(src, global_batch_size=8, mesh=mesh, seed=0)
  before = jax.device_get(state.params)
  # Two steps: the warm-up gives the first one a zero learning rate.
  for _ in range(2):
    state, _ = step(state, next(loader))
  loader.close()
  after = jax.device_get(state.params)
  jax.tree.map(np.testing.assert_array_equal, before["context_encoder"], after["context_encoder"])
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), before["head"], after["head"])
  assert max(jax.tree.leaves(moved)) > 0


def test_step_that_cannot_fit_stops_before_any_data_or_file(
  smoke_data_dir, tokenizer_dir, tmp_path, capsys
):
  config = _config("student", smoke_data_dir, tokenizer_dir, **{"memory.limit_gib": 1e-4})
  with pytest.raises(common.StepMemoryError, match=r"student: the train step needs .* but only"):
    transformer.train_and_evaluate(config, tmp_path)
  assert "student: train step compiled in" in capsys.readouterr().out
  assert not (tmp_path / "metrics.jsonl").exists()
  assert not (tmp_path / "checkpoints").exists()


def test_missing_tokenizer_is_explained(smoke_data_dir, tmp_path):
  with pytest.raises(ValueError, match="tokenizer_from is empty"):
    transformer.train_and_evaluate(_config("student", smoke_data_dir, ""), tmp_path / "a")
  with pytest.raises(FileNotFoundError, match="nowhere"):
    transformer.train_and_evaluate(
      _config("student", smoke_data_dir, str(tmp_path / "nowhere")), tmp_path / "b"
    )


def test_unknown_role_is_named():
  with pytest.raises(ValueError, match="unknown role"):
    transformer_config.get_config("critic", "smoke")
