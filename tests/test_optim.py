"""Tests for nextaccel_jax.optim: schedules, AdamW with no-decay groups, clipping."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from nextaccel_jax import optim
from nextaccel_jax.stages import common


def test_cosine_schedule_shape():
  lr = optim.make_schedule(base_lr=1.0, total_steps=110, warmup_steps=10, end_lr=0.1)
  values = np.asarray([lr(s) for s in range(0, 121)])
  # Linear warm-up whose first step already trains, at the peak on its last step.
  np.testing.assert_allclose(values[:10], np.arange(1, 11) / 10, atol=1e-6)
  np.testing.assert_allclose(values[10], 1.0, atol=1e-6)
  # Cosine from the peak to end_lr at total_steps, halfway at the midpoint, flat afterwards.
  assert np.all(np.diff(values[10:111]) <= 1e-7)
  np.testing.assert_allclose(values[60], 0.55, atol=1e-6)
  np.testing.assert_allclose(values[110:], 0.1, atol=1e-6)


def test_linear_and_constant_schedules():
  linear = optim.make_schedule(
    base_lr=2.0, total_steps=20, warmup_steps=0, schedule="linear", end_lr=0.0
  )
  np.testing.assert_allclose([linear(s) for s in (0, 10, 20, 30)], [2.0, 1.0, 0.0, 0.0], atol=1e-6)
  const = optim.make_schedule(base_lr=3.0, total_steps=20, warmup_steps=4, schedule="constant")
  np.testing.assert_allclose(
    [const(s) for s in (0, 2, 3, 4, 19, 40)], [0.75, 2.25, 3.0, 3.0, 3.0, 3.0], atol=1e-6
  )
  with pytest.raises(ValueError, match="schedule"):
    optim.make_schedule(base_lr=1.0, total_steps=10, warmup_steps=0, schedule="step")
  with pytest.raises(ValueError, match="warmup_steps"):
    optim.make_schedule(base_lr=1.0, total_steps=10, warmup_steps=11)


def test_warmup_and_decay_in_epochs_then_hold():
  # The AQ-VAE's supplement: 10 warm-up epochs, 10 cosine epochs to 1e-6, of 100 epochs.
  config = ml_collections.ConfigDict(
    dict(
      lr=1e-4,
      end_lr=1e-6,
      schedule="cosine",
      warmup_epochs=10,
      decay_epochs=10,
      b1=0.9,
      b2=0.999,
      weight_decay=1e-4,
      grad_clip=5.0,
    )
  )
  _, lr = optim.optimizer_from_config(config, total_steps=500, steps_per_epoch=5)
  values = np.asarray([lr(s) for s in range(500)])
  np.testing.assert_allclose(values[0], 1e-4 / 50, rtol=1e-5)
  np.testing.assert_allclose(values[49:51], 1e-4, rtol=1e-5)
  np.testing.assert_allclose(values[75], (1e-4 + 1e-6) / 2, rtol=1e-4)
  assert np.all(np.diff(values[50:101]) <= 1e-12)
  np.testing.assert_allclose(values[100:], 1e-6, rtol=1e-4)
  # decay_epochs = 0 decays to the end of the run.
  config.decay_epochs = 0
  _, lr = optim.optimizer_from_config(config, total_steps=500, steps_per_epoch=5)
  np.testing.assert_allclose([lr(275), lr(500)], [(1e-4 + 1e-6) / 2, 1e-6], rtol=1e-4)
  with pytest.raises(ValueError, match="steps per epoch"):
    optim.optimizer_from_config(config, total_steps=500)
  assert optim.epochs_to_steps(0.1, 4, 100) == 1 and optim.epochs_to_steps(0, 4, 100) == 0
  assert optim.epochs_to_steps(50, 4, 100) == 100


def test_optimizer_clips_huge_gradients():
  params = {"kernel": jnp.ones((4, 4)), "bias": jnp.ones((4,))}
  grads = jax.tree.map(lambda p: jnp.full_like(p, 1e6), params)
  lr, clip, wd = 1e-2, 1.0, 1e-2
  tx = optim.make_optimizer(
    learning_rate=lr, weight_decay=wd, grad_clip=clip, no_decay_mask_fn=optim.no_decay_mask
  )
  state = tx.init(params)
  updates, state = tx.update(grads, state, params)
  # Adam's first moment sees the clipped gradient: (1 - b1) times a norm-`clip` vector.
  mu = state[1][0].mu  # (clip state, (adam, decay, scale))
  np.testing.assert_allclose(float(common.tree_norm(mu)), 0.1 * clip, rtol=1e-5)
  # Each coordinate moves by at most lr · (1 + wd · |param|).
  assert float(jnp.max(jnp.abs(updates["kernel"]))) <= lr * (1 + wd) * (1 + 1e-6)
  np.testing.assert_allclose(np.asarray(updates["kernel"]), -lr * (1 + wd), rtol=1e-5)
  # The bias (1.0, like the kernel) is not decayed: its update is the Adam step alone.
  np.testing.assert_allclose(np.asarray(updates["bias"]), -lr, rtol=1e-5)

  unclipped = optim.make_optimizer(learning_rate=lr)
  _, raw_state = unclipped.update(grads, unclipped.init(params), params)
  assert float(common.tree_norm(raw_state[0][0].mu)) > 1e5


def test_optimizer_accepts_schedule():
  lr = optim.make_schedule(base_lr=1.0, total_steps=10, warmup_steps=2)
  tx = optim.make_optimizer(learning_rate=lr)
  params = {"w": jnp.ones(3)}
  updates, _ = tx.update({"w": jnp.ones(3)}, tx.init(params), params)
  # Step 0 of the warm-up already moves the parameters (half the peak rate here).
  np.testing.assert_allclose(np.asarray(updates["w"]), -0.5, rtol=1e-4)


def test_no_decay_mask_matches_biases_scales_and_embeddings():
  params = {
    "conv_in": {"kernel": 1, "bias": 1},
    "down_0": {"block_1": {"norm1": {"scale": 1, "bias": 1}, "conv1": {"kernel": 1}}},
    "class_emb": {"embedding": 1},
    "pos_1LC": 1,
    "pos_start": 1,
    "blocks_0": {"attn": {"scale_mul_1H11": 1, "qkv": {"kernel": 1}}},
    "head": {"kernel": 1},
    "scaled_proj": {"kernel": 1},
  }
  mask = optim.no_decay_mask(params)
  assert mask == {
    "conv_in": {"kernel": True, "bias": False},
    "down_0": {"block_1": {"norm1": {"scale": False, "bias": False}, "conv1": {"kernel": True}}},
    "class_emb": {"embedding": False},
    "pos_1LC": False,
    "pos_start": False,
    "blocks_0": {"attn": {"scale_mul_1H11": False, "qkv": {"kernel": True}}},
    "head": {"kernel": True},
    "scaled_proj": {"kernel": True},
  }
  custom = optim.no_decay_mask(params, no_decay_patterns=(r"head/.*",))
  assert custom["head"]["kernel"] is False and custom["conv_in"]["bias"] is True
