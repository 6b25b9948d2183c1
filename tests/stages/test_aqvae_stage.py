"""Stage 1 end to end on the smoke preset: train, evaluate, checkpoint, resume, NaN stop."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import aqvae as aqvae_config
from nextaccel_jax import checkpointing
from nextaccel_jax.data import build, pipeline
from nextaccel_jax.stages import aqvae, common


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("tfds")
  build.build("smoke", data_dir=d)
  return str(d)


def _config(data_dir, **overrides):
  config = aqvae_config.get_config("smoke")
  config.data.data_dir = data_dir
  for k, v in overrides.items():
    node = config
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return config


def _train_losses(workdir):
  lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["loss"] for r in lines if r.get("split") == "train"}


def test_smoke_run_trains_evaluates_and_checkpoints(data_dir, tmp_path):
  final = aqvae.train_and_evaluate(_config(data_dir), tmp_path)
  for key in ("recon_all/ssim", "recon_all/psnr", "recon_r32/ssim", "zero_filled/psnr"):
    assert np.isfinite(final[key]), key
  saved = json.loads((tmp_path / "final_metrics.json").read_text())
  assert saved == pytest.approx(final)
  ckpt = checkpointing.Checkpointer(tmp_path)
  assert ckpt.latest_step() == 4
  assert ckpt.best_value() == pytest.approx(final["recon_all/ssim"])
  ckpt.close()
  records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in records if r.get("split") == "train"]
  assert [r["step"] for r in train] == [1, 2, 3, 4]
  for key in (
    "loss",
    "ssim_loss",
    "commitment",
    "grad_norm",
    "param_norm",
    "usage/scale_0",
    "perplexity/scale_5",
    "lr",
    "step_time_s",
  ):
    assert key in train[-1], key
  assert (tmp_path / "config.json").exists()


def test_resume_gives_identical_losses(data_dir, tmp_path):
  straight = tmp_path / "straight"
  aqvae.train_and_evaluate(_config(data_dir), straight)
  split = tmp_path / "split"
  aqvae.train_and_evaluate(_config(data_dir, max_steps_per_run=2), split)
  assert checkpointing.Checkpointer(split).latest_step() == 2
  aqvae.train_and_evaluate(_config(data_dir, max_steps_per_run=2), split)
  a, b = _train_losses(straight), _train_losses(split)
  assert sorted(b) == [1, 2, 3, 4]
  for step in (3, 4):
    assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), step


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
  orig_next = pipeline.TrainLoader.__next__

  def poisoned_next(self):
    batch = orig_next(self)
    # A corrupt third batch: NaN levels give a NaN loss at step 3.
    if self.step == 3:
      batch = dict(batch, levels=batch["levels"] * jnp.nan)
    return batch

  monkeypatch.setattr(pipeline.TrainLoader, "__next__", poisoned_next)
  with pytest.raises(common.NonFiniteLossError, match="step 3"):
    aqvae.train_and_evaluate(_config(data_dir), tmp_path)
  ckpt = checkpointing.Checkpointer(tmp_path)
  assert ckpt.latest_step() == 2
  ckpt.close()


def test_init_from_converted_variables(data_dir, tmp_path):
  config = _config(data_dir)
  model = aqvae.make_model(config)
  tx, _ = aqvae.make_optimizer(config, 4)
  from nextaccel_jax import sharding

  mesh = sharding.make_mesh()
  state, _ = aqvae.create_train_state(config, model, tx, mesh, jax.random.key(7))
  variables = {"params": jax.device_get(state.params), "vq_ema": jax.device_get(state.vq_ema)}
  from nextaccel_jax.models import convert_var

  src = convert_var.save_variables(variables, tmp_path / "init", {"source": "test"})
  run = tmp_path / "run"
  aqvae.train_and_evaluate(_config(data_dir, init_from=str(src), num_train_steps=1), run)
  ckpt = checkpointing.Checkpointer(run)
  restored, _ = ckpt.restore(checkpointing.abstract_like(state), 1)
  ckpt.close()
  # One step away from the init, not from the seed-0 scratch init.
  diff = jax.tree.map(
    lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
    restored.params,
    variables["params"],
  )
  assert max(jax.tree.leaves(diff)) < 0.05


def test_unknown_loss_term_is_named(data_dir):
  with pytest.raises(ValueError, match="no such loss term"):
    aqvae.total_loss(jnp.zeros((1, 8, 8, 2)), jnp.zeros((1, 8, 8, 2)), {}, {}, {"nope": 1.0})
