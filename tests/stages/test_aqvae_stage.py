"""Stage 1 end to end on the smoke preset: train, evaluate, checkpoint, resume, NaN stop."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import aqvae as aqvae_config
from nextaccel_jax import checkpointing, sharding
from nextaccel_jax.convert import checkpoints
from nextaccel_jax.data import pipeline
from nextaccel_jax.stages import common
from nextaccel_jax.stages import stage1_aqvae as aqvae


def _config(data_dir, **overrides):
  config = aqvae_config.get_config("smoke")
  config.data.data_dir = data_dir
  config.update_from_flattened_dict(overrides)
  return config


def _train_losses(workdir, key="loss"):
  lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r[key] for r in lines if r.get("split") == "train"}


def _step(config):
  """The stage's own step (`build_step`) with its frozen networks."""
  mesh = sharding.make_mesh()
  frozen = aqvae.load_frozen(config, aqvae.make_discriminator(config), mesh)
  return frozen, aqvae.build_step(config, mesh, frozen, 4)


def test_smoke_run_trains_evaluates_and_checkpoints(smoke_pipeline):
  # The smoke pipeline's stage 1 is this stage's smoke run.
  workdir = smoke_pipeline[0] / "aqvae"
  final = json.loads((workdir / "final_metrics.json").read_text())
  for key in ("recon_all/ssim", "recon_all/psnr", "recon_r32/ssim", "zero_filled/psnr"):
    assert np.isfinite(final[key]), key
  ckpt = checkpointing.Checkpointer(workdir)
  assert ckpt.latest_step() == 4
  assert ckpt.best_value() == pytest.approx(final["recon_all/ssim"])
  ckpt.close()
  records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
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
    "lpips_loss",
    "g_adv_loss",
    "d_loss",
    "d_real",
    "d_fake",
  ):
    assert key in train[-1], key
  for key in ("recon_all/lpips_alex", "zero_filled/lpips_alex"):
    assert np.isfinite(final[key]), key
  assert (workdir / "config.json").exists()


def test_resume_gives_identical_losses(smoke_pipeline, stage_config, tmp_path):
  # The pipeline ran stage 1 straight through; the same config in two halves must repeat it.
  straight = smoke_pipeline[0] / "aqvae"
  split = tmp_path / "split"
  aqvae.train_and_evaluate(stage_config("aqvae", max_steps_per_run=2), split)
  assert checkpointing.Checkpointer(split).latest_step() == 2
  aqvae.train_and_evaluate(stage_config("aqvae", max_steps_per_run=2), split)
  assert sorted(_train_losses(split)) == [1, 2, 3, 4]
  # The discriminator's loss continuing identically shows its heads, optimizer and spectral
  # vectors were restored along with the generator.
  for key in ("loss", "d_loss", "d_fake"):
    a, b = _train_losses(straight, key), _train_losses(split, key)
    for step in (3, 4):
      assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), (key, step)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(
  smoke_data_dir, tmp_path, monkeypatch
):
  orig_next = pipeline.TrainLoader.__next__

  def poisoned_next(self):
    batch = orig_next(self)
    # A corrupt third batch: NaN levels give a NaN loss at step 3.
    if self.step == 3:
      batch = dict(batch, levels=batch["levels"] * jnp.nan)
    return batch

  monkeypatch.setattr(pipeline.TrainLoader, "__next__", poisoned_next)
  with pytest.raises(common.NonFiniteLossError, match="step 3"):
    aqvae.train_and_evaluate(_config(smoke_data_dir), tmp_path)
  ckpt = checkpointing.Checkpointer(tmp_path)
  assert ckpt.latest_step() == 2
  ckpt.close()


def test_init_from_converted_variables(smoke_data_dir, tmp_path):
  config = _config(smoke_data_dir, seed=7)
  state = _step(config)[1].state
  variables = {"params": jax.device_get(state.params), "vq_ema": jax.device_get(state.vq_ema)}
  src = checkpoints.save_variables(variables, tmp_path / "init", {"source": "test"})
  run = tmp_path / "run"
  aqvae.train_and_evaluate(_config(smoke_data_dir, init_from=str(src), num_train_steps=1), run)
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


def test_unknown_loss_term_is_named():
  x = jnp.zeros((1, 8, 8, 2))
  inp = aqvae.LossInputs(x, x, x[..., 0], x[..., 0], {}, {}, None, "alex", "tokens")
  with pytest.raises(ValueError, match="no such loss term"):
    aqvae.total_loss(inp, {"nope": 1.0})


def test_one_step_updates_generator_and_discriminator_heads(smoke_data_dir):
  config = _config(smoke_data_dir)
  config.disc.start_step = 1
  frozen, step = _step(config)
  mesh, state, train_fn = sharding.make_mesh(), step.state, step.train
  src = pipeline.load_split("fastmri_brain_multiscale/smoke", "train", smoke_data_dir)
  loader = pipeline.TrainLoader(src, global_batch_size=8, mesh=mesh, seed=0)
  batch = next(loader)
  loader.close()
  before = jax.device_get(state)
  tower_before = jax.device_get(frozen["tower"])
  state, m = train_fn(state, batch, frozen)
  after = jax.device_get(state)
  # The generator's adversarial term is gated off at step 0 (start_step=1) but D still learns.
  assert float(m["adv_on"]) == 0.0 and np.isfinite(float(m["g_adv_loss"]))
  moved = jax.tree.map(
    lambda a, b: float(np.abs(a - b).max()), before.disc_params, after.disc_params
  )
  assert max(jax.tree.leaves(moved)) > 0
  sn_moved = jax.tree.map(
    lambda a, b: float(np.abs(a - b).max()), before.disc_spectral, after.disc_spectral
  )
  assert max(jax.tree.leaves(sn_moved)) > 0
  # The tower is a frozen argument, never part of the update.
  jax.tree.map(np.testing.assert_array_equal, tower_before, jax.device_get(frozen["tower"]))
  state, m = train_fn(state, batch, frozen)
  assert float(m["adv_on"]) == 1.0


def test_adversarial_off_builds_no_discriminator(smoke_data_dir):
  config = _config(smoke_data_dir)
  config.loss.adversarial = 0.0
  frozen, step = _step(config)
  assert step.models["discriminator"] is None
  assert step.state.disc_params == {} and frozen["tower"] == {}


def test_missing_tower_weights_file_is_named(smoke_data_dir, tmp_path):
  config = _config(smoke_data_dir)
  config.disc.weights = str(tmp_path / "missing.npz")
  with pytest.raises(FileNotFoundError, match="missing.npz"):
    _step(config)


def test_codebook_starts_from_the_first_batches_latents(smoke_data_dir):
  config = _config(smoke_data_dir)
  mesh = sharding.make_mesh()
  _, step = _step(config)
  train_src = pipeline.load_split("fastmri_brain_multiscale/smoke", "train", smoke_data_dir)
  state = aqvae.init_codebook(config, step.state, step, train_src, mesh)
  vq = jax.device_get(state.vq_ema["quantize"])
  np.testing.assert_array_equal(vq["embed"], vq["embed_avg"])
  np.testing.assert_array_equal(vq["cluster_size"], 1.0)
  assert (
    state.vq_ema["quantize"]["embed"].sharding == step.state_sharding.vq_ema["quantize"]["embed"]
  )
  # Every code is one of the latents the encoder gives the first training batch.
  loader = pipeline.TrainLoader(
    train_src, global_batch_size=config.data.batch_size, mesh=mesh, seed=config.seed
  )
  batch = next(loader)
  loader.close()
  model = step.models["model"]
  latents = np.asarray(
    jax.jit(
      lambda s, b: model.apply(
        {"params": s.params, "vq_ema": s.vq_ema},
        b["levels"],
        b["family"],
        method=type(model).codebook_latents,
      )
    )(step.state, batch)
  )
  gap = np.abs(vq["embed"][:, None, :] - latents[None]).max(-1).min(-1)
  assert gap.max() < 1e-5
  assert len(np.unique(vq["embed"], axis=0)) > 0.9 * config.model.vocab_size


def test_unknown_codebook_init_is_named(smoke_data_dir, tmp_path):
  config = _config(smoke_data_dir)
  config.codebook_init.method = "random"
  with pytest.raises(ValueError, match="config.codebook_init.method='random'"):
    aqvae.train_and_evaluate(config, tmp_path)
