"""Stage 2 on the smoke preset: student and teacher training, resume, sharding, errors."""

import json

import jax
import numpy as np
import pytest

from configs import aqvae as aqvae_config
from configs import transformer as transformer_config
from nextaccel_jax import checkpointing, sharding
from nextaccel_jax.data import pipeline
from nextaccel_jax.stages import aqvae, transformer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
  """A stage-1 workdir holding a (randomly initialised) smoke tokenizer checkpoint."""
  config = aqvae_config.get_config("smoke")
  config.loss.adversarial = 0.0
  mesh = sharding.make_mesh()
  model = aqvae.make_model(config)
  tx, _ = aqvae.make_optimizer(config, 4)
  state, _ = aqvae.create_train_state(config, model, tx, mesh, jax.random.key(3))
  d = tmp_path_factory.mktemp("aqvae")
  with checkpointing.Checkpointer(d) as ckpt:
    ckpt.save(1, state)
  return str(d)


def _config(role, data_dir, tokenizer_dir, **overrides):
  config = transformer_config.get_config(role, "smoke")
  config.data.data_dir = data_dir
  config.tokenizer_from = tokenizer_dir
  config.update_from_flattened_dict(overrides)
  return config


def _train(workdir, key="loss"):
  lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r[key] for r in lines if r.get("split") == "train"}


def test_student_smoke_run(smoke_data_dir, tokenizer_dir, tmp_path):
  final = transformer.train_and_evaluate(
    _config("student", smoke_data_dir, tokenizer_dir), tmp_path
  )
  for key in ["ce", "acc", "recon/ssim", "recon/psnr", "recon/lpips_alex", "zero_filled/ssim"] + [
    f"{m}/scale_{k}" for m in ("ce", "acc") for k in range(1, 6)
  ]:
    assert np.isfinite(final[key]), key
  per_family = [k for k in final if k.startswith("recon/") and k.count("/") == 2]
  assert per_family and all(np.isfinite(final[k]) for k in per_family)
  # A near-uniform start: the CE is close to log V.
  assert final["ce"] == pytest.approx(np.log(64), abs=1.0)
  assert json.loads((tmp_path / "final_metrics.json").read_text()) == pytest.approx(final)
  assert set(_train(tmp_path, "prefix_prob").values()) == {0.0}
  with checkpointing.Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() == 3


def test_teacher_resume_is_exact(smoke_data_dir, tokenizer_dir, tmp_path):
  # The teacher's prefix noise and dropout keys are functions of (seed, step), so a resumed run
  # repeats the straight run's losses.
  straight, split = tmp_path / "straight", tmp_path / "split"
  kw = dict(num_train_steps=4, **{"eval.every": 0})
  transformer.train_and_evaluate(_config("teacher", smoke_data_dir, tokenizer_dir, **kw), straight)
  for _ in range(2):
    transformer.train_and_evaluate(
      _config("teacher", smoke_data_dir, tokenizer_dir, max_steps_per_run=2, **kw), split
    )
  a, b = _train(straight), _train(split)
  assert sorted(b) == [1, 2, 3, 4]
  for step in (3, 4):
    assert b[step] == pytest.approx(a[step], rel=1e-6, abs=1e-7), step
  assert all(p > 0 for p in _train(straight, "prefix_prob").values())


def test_sharded_step_matches_one_device(smoke_data_dir, tokenizer_dir):
  config = _config("student", smoke_data_dir, tokenizer_dir)
  tokenizer = transformer.make_tokenizer(config)
  model = transformer.make_model(config)
  src = pipeline.load_split("fastmri_brain_multiscale/smoke", "train", smoke_data_dir)
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = jax.make_mesh(
      (len(devices),), ("data",), devices=devices, axis_types=(jax.sharding.AxisType.Auto,)
    )
    tok_vars = transformer.load_tokenizer(config, tokenizer, mesh)
    tx, _ = transformer.make_optimizer(config, 3)
    state, state_sharding = transformer.create_train_state(
      config, model, tx, mesh, jax.random.key(0), tok_vars
    )
    train_fn, _, _ = transformer.jit_steps(config, model, tokenizer, tx, mesh, state_sharding)
    loader = pipeline.TrainLoader(src, global_batch_size=8, mesh=mesh, seed=0)
    batch = next(loader)
    loader.close()
    state, m = train_fn(state, batch, tok_vars)
    results.append((jax.device_get(m), jax.device_get(state.params)))
  (m1, p1), (m8, p8) = results
  assert m8["loss"] == pytest.approx(m1["loss"], rel=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), p1, p8)


def test_frozen_context_encoder_does_not_move(smoke_data_dir, tokenizer_dir):
  config = _config("student", smoke_data_dir, tokenizer_dir, trainable_context_encoder=False)
  mesh = sharding.make_mesh()
  tokenizer = transformer.make_tokenizer(config)
  model = transformer.make_model(config)
  tok_vars = transformer.load_tokenizer(config, tokenizer, mesh)
  tx, _ = transformer.make_optimizer(config, 3)
  state, state_sharding = transformer.create_train_state(
    config, model, tx, mesh, jax.random.key(0), tok_vars
  )
  # The context encoder starts as the stage-1 encoder.
  jax.tree.map(
    np.testing.assert_array_equal,
    jax.device_get(state.params["context_encoder"]),
    jax.device_get(tok_vars["params"]["encoder"]),
  )
  train_fn, _, _ = transformer.jit_steps(config, model, tokenizer, tx, mesh, state_sharding)
  src = pipeline.load_split("fastmri_brain_multiscale/smoke", "train", smoke_data_dir)
  loader = pipeline.TrainLoader(src, global_batch_size=8, mesh=mesh, seed=0)
  before = jax.device_get(state.params)
  # Two steps: the warm-up gives the first one a zero learning rate.
  for _ in range(2):
    state, _ = train_fn(state, next(loader), tok_vars)
  loader.close()
  after = jax.device_get(state.params)
  jax.tree.map(np.testing.assert_array_equal, before["context_encoder"], after["context_encoder"])
  moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), before["head"], after["head"])
  assert max(jax.tree.leaves(moved)) > 0


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
