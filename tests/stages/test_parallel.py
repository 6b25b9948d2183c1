"""Every stage's train step on one device, data-parallel over 8 and FSDP (data 2 × fsdp 4): same
losses and updated parameters, one trace per layout; and the bf16 + remat settings of the paper
presets on the smoke models."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import aqvae as aqvae_config
from configs import distill as distill_config
from configs import transformer as transformer_config
from nextaccel_jax import sharding, testing
from nextaccel_jax.data import pipeline
from nextaccel_jax.stages import stage1_aqvae as aqvae
from nextaccel_jax.stages import stage2_transformer as transformer
from nextaccel_jax.stages import stage3_distill as distill

LAYOUTS = {
  "one": ((("data", 1), ("fsdp", 1)), 1),
  "dp": ((("data", 8), ("fsdp", 1)), 8),
  "fsdp": ((("data", 2), ("fsdp", 4)), 8),
}
# The fsdp layout splits the batch eight ways too, so it is also the data-parallel check of the
# stages that skip the plain "dp" one (their compiles dominate the test's time).
LAYOUTS_OF = {"aqvae": ("fsdp",), "transformer": ("dp", "fsdp"), "distill": ("fsdp",)}
STEPS = 2  # the smoke warm-up gives step 1 a zero learning rate, so step 2 is the first update


def _mesh(layout: str):
  axes, n = LAYOUTS[layout]
  return sharding.make_mesh(axes, devices=jax.devices()[:n])


def _tiny_sharding(config):
  # Shard every leaf the fsdp axis divides, however small: the smoke models have no 1 MiB leaves.
  config.sharding.fsdp_min_size = 0
  return config


CONFIGS = {
  "aqvae": lambda: aqvae_config.get_config("smoke"),
  "transformer": lambda: transformer_config.get_config("teacher", "smoke"),
  "distill": lambda: distill_config.get_config("smoke"),
}
MODULES = {"aqvae": aqvae, "transformer": transformer, "distill": distill}


def _config(stage, dtype, remat):
  config = _tiny_sharding(CONFIGS[stage]())
  config.model.dtype, config.model.remat = dtype, remat
  if stage == "aqvae":
    config.disc.tower_dtype = dtype
  if stage == "distill":
    config.teacher.dtype = dtype
  return config


def _run(stage, layout, source, monkeypatch, dtype="float32", remat="none"):
  mesh = _mesh(layout)
  chex.clear_trace_counter()
  # Counted below jax.jit: a second trace (a new shape, dtype, weak type or sharding in the state
  # the step hands back) fails the run.
  monkeypatch.setattr(MODULES[stage], "train_step", chex.assert_max_traces(ORIGINAL[stage], n=1))
  step = testing.stage_step(stage, _config(stage, dtype, remat), mesh, total_steps=4)
  state, state_sharding = step.state, step.state_sharding
  # Read before the first step donates the state.
  start = sharding.to_host(state.params)
  loader = pipeline.TrainLoader(source, global_batch_size=8, mesh=mesh, seed=0)
  losses = []
  try:
    for _ in range(STEPS):
      state, m = step(state, next(loader))
      losses.append(float(m["loss"]))
  finally:
    loader.close()
  assert sharding.shardings_of(state) == state_sharding
  return losses, sharding.to_host(state.params), state_sharding, start


ORIGINAL = {name: module.train_step for name, module in MODULES.items()}


@pytest.fixture(scope="module")
def train_source(smoke_data_dir):
  return pipeline.load_split("fastmri_brain_multiscale/smoke", "train", smoke_data_dir)


def _determined(name: str, x: np.ndarray) -> np.ndarray:
  """The part of a parameter its gradient determines.

  The key third of a stage-1 attention `qkv/bias` adds the same q·b_k to every logit of a softmax
  row, so its exact gradient is zero: what it receives is rounding noise, which Adam normalises to
  full-size steps of arbitrary sign in any layout.
  """
  if name.endswith("qkv/bias"):
    c = x.shape[-1] // 3
    return np.concatenate([x[..., :c], x[..., 2 * c :]], axis=-1)
  return x


_REFERENCE: dict = {}


def _reference(stage, source, monkeypatch):
  """The one-device float32 run, shared by the tests below."""
  if stage not in _REFERENCE:
    _REFERENCE[stage] = _run(stage, "one", source, monkeypatch)
  return _REFERENCE[stage]


def _updates(params, start) -> np.ndarray:
  """Every determined parameter's change over the run, flattened into one vector."""
  return np.concatenate(
    [
      (_determined(sharding.leaf_path(path), p) - _determined(sharding.leaf_path(path), s)).ravel()
      for (path, p), s in zip(
        jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(start), strict=True
      )
    ]
  )


@pytest.mark.parametrize("stage", sorted(MODULES))
def test_data_parallel_and_fsdp_steps_match_one_device(stage, train_source, monkeypatch):
  ref_losses, ref_params, _, ref_start = _reference(stage, train_source, monkeypatch)
  assert np.isfinite(ref_losses).all()
  for layout in LAYOUTS_OF[stage]:
    losses, params, state_sharding, start = _run(stage, layout, train_source, monkeypatch)
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5, atol=1e-7, err_msg=layout)
    if stage == "aqvae":
      # The quantizer's nearest-code choice is discontinuous: a near-tie that another reduction
      # order rounds the other way moves a token and perturbs the gradients slightly. Adam's
      # first step is about ±lr per element, so wherever a gradient entry is near zero its sign,
      # and a full-size step, follows that perturbation (measured on a 2-core CPU: 0.06 % of the
      # elements off by more than half a typical step, 4 % of the update's norm). The update
      # as a whole has to be the same one.
      ref_update = _updates(ref_params, ref_start)
      delta = np.abs(_updates(params, start) - ref_update)
      typical = np.median(np.abs(ref_update))
      assert (delta > 0.5 * typical).mean() < 1e-2, layout
      assert np.linalg.norm(delta) < 0.1 * np.linalg.norm(ref_update), layout
    else:
      for (path, got), want in zip(
        jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(ref_params), strict=True
      ):
        name = sharding.leaf_path(path)
        np.testing.assert_allclose(
          _determined(name, got), _determined(name, want), rtol=2e-4, atol=5e-6, err_msg=name
        )
    specs = sharding.describe(state_sharding)
    if layout == "fsdp":
      # The comparison means something only if parameters really were split.
      assert any("fsdp" in spec for spec in specs), specs
    else:
      assert not any("fsdp" in spec for spec in specs), specs


@pytest.mark.parametrize("stage", sorted(MODULES))
def test_bfloat16_with_remat_stays_close_to_float32(stage, train_source, monkeypatch):
  ref_losses = _reference(stage, train_source, monkeypatch)[0]
  losses, params, _, _ = _run(
    stage, "one", train_source, monkeypatch, dtype="bfloat16", remat="dots"
  )
  np.testing.assert_allclose(losses, ref_losses, rtol=0.05)
  # Parameters stay float32: bf16 is the compute dtype only.
  assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(np.float32)}


def test_paper_presets_compute_in_bfloat16_with_remat():
  models = (
    aqvae_config.get_config("paper").model,
    transformer_config.get_config("student", "paper").model,
    distill_config.get_config("paper").model,
  )
  assert all(m.dtype == "bfloat16" and m.remat == "full" for m in models)
  # Stage 2 runs the frozen tokenizer in the dtype stage 1 trained it with.
  config = transformer_config.get_config("student", "paper")
  assert transformer.make_tokenizer(config).dtype == jnp.bfloat16
