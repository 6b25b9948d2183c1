"""Tests for nextaccel_jax.stages.common: metric files, schedules, optimiser, checks and timing."""

import io
import json
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from nextaccel_jax.stages import common


def test_metric_writer_jsonl_and_config(tmp_path):
  with common.MetricWriter(tmp_path) as writer:
    writer.write(1, {"loss": jnp.float32(0.25), "ssim": np.float64(0.5), "epoch": 0})
    writer.write(2, {"psnr": jnp.asarray([31.0]), "step_time_s": None}, split="validation")
    with pytest.raises(ValueError, match="scalar"):
      writer.write(3, {"bad": np.zeros(3)})
    with pytest.raises(ValueError, match="reserved"):
      writer.write(3, {"step": 1.0})
    config = ml_collections.ConfigDict({"optim": {"lr": 1e-4}, "stage": "aqvae"})
    writer.write_config(config)
  # Reopening appends, as a resumed job does.
  with common.MetricWriter(tmp_path) as writer:
    writer.write(3, {"loss": 0.125})

  lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert lines == [
    {"step": 1, "split": "train", "loss": 0.25, "ssim": 0.5, "epoch": 0},
    {"step": 2, "split": "validation", "psnr": 31.0, "step_time_s": None},
    {"step": 3, "split": "train", "loss": 0.125},
  ]
  assert isinstance(lines[0]["loss"], float)
  assert json.loads((tmp_path / "config.json").read_text()) == {
    "optim": {"lr": 1e-4},
    "stage": "aqvae",
  }


def test_cosine_schedule_shape():
  lr = common.make_schedule(base_lr=1.0, total_steps=110, warmup_steps=10, end_lr=0.1)
  values = np.asarray([lr(s) for s in range(0, 121)])
  # Linear warm-up from 0.
  np.testing.assert_allclose(values[:11], np.arange(11) / 10, atol=1e-6)
  # Cosine from the peak to end_lr at total_steps, halfway at the midpoint, flat afterwards.
  assert np.all(np.diff(values[10:111]) <= 1e-7)
  np.testing.assert_allclose(values[60], 0.55, atol=1e-6)
  np.testing.assert_allclose(values[110:], 0.1, atol=1e-6)


def test_linear_and_constant_schedules():
  linear = common.make_schedule(
    base_lr=2.0, total_steps=20, warmup_steps=0, schedule="linear", end_lr=0.0
  )
  np.testing.assert_allclose([linear(s) for s in (0, 10, 20, 30)], [2.0, 1.0, 0.0, 0.0], atol=1e-6)
  const = common.make_schedule(base_lr=3.0, total_steps=20, warmup_steps=4, schedule="constant")
  np.testing.assert_allclose([const(s) for s in (2, 4, 19, 40)], [1.5, 3.0, 3.0, 3.0], atol=1e-6)
  with pytest.raises(ValueError, match="schedule"):
    common.make_schedule(base_lr=1.0, total_steps=10, warmup_steps=0, schedule="step")
  with pytest.raises(ValueError, match="warmup_steps"):
    common.make_schedule(base_lr=1.0, total_steps=10, warmup_steps=11)


def test_optimizer_clips_huge_gradients():
  params = {"kernel": jnp.ones((4, 4)), "bias": jnp.ones((4,))}
  grads = jax.tree.map(lambda p: jnp.full_like(p, 1e6), params)
  lr, clip, wd = 1e-2, 1.0, 1e-2
  tx = common.make_optimizer(
    learning_rate=lr, weight_decay=wd, grad_clip=clip, no_decay_mask_fn=common.no_decay_mask
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

  unclipped = common.make_optimizer(learning_rate=lr)
  _, raw_state = unclipped.update(grads, unclipped.init(params), params)
  assert float(common.tree_norm(raw_state[0][0].mu)) > 1e5


def test_optimizer_accepts_schedule():
  lr = common.make_schedule(base_lr=1.0, total_steps=10, warmup_steps=2)
  tx = common.make_optimizer(learning_rate=lr)
  params = {"w": jnp.ones(3)}
  updates, _ = tx.update({"w": jnp.ones(3)}, tx.init(params), params)
  # Step 0 of the warm-up has learning rate 0.
  np.testing.assert_array_equal(np.asarray(updates["w"]), 0.0)


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
  mask = common.no_decay_mask(params)
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
  custom = common.no_decay_mask(params, no_decay_patterns=(r"head/.*",))
  assert custom["head"]["kernel"] is False and custom["conv_in"]["bias"] is True


def test_tree_norm_and_count_params():
  tree = {"a": jnp.full((2, 2), 3.0, jnp.bfloat16), "b": [jnp.asarray([4.0])]}
  norm = common.tree_norm(tree)
  assert norm.dtype == jnp.float32
  np.testing.assert_allclose(float(norm), math.sqrt(4 * 9 + 16), rtol=1e-6)
  assert float(common.tree_norm({})) == 0.0
  assert common.count_params(tree) == 5
  assert common.count_params({"x": jax.ShapeDtypeStruct((3, 7), jnp.float32)}) == 21


def test_check_finite_raises_with_step_and_names():
  common.check_finite({"loss": 0.5, "ssim": jnp.float32(0.9), "count": np.int32(3)}, step=1)
  with pytest.raises(common.NonFiniteLossError, match=r"step 12.*loss.*grad_norm") as info:
    common.check_finite(
      {"loss": float("nan"), "ssim": 0.5, "grad_norm": jnp.asarray(jnp.inf)}, step=12
    )
  assert info.value.step == 12
  assert info.value.names == ("loss", "grad_norm")
  assert isinstance(info.value, RuntimeError)


def test_periodic():
  assert [s for s in range(1, 11) if common.periodic(s, 3)] == [3, 6, 9]
  assert not common.periodic(0, 3)
  assert not any(common.periodic(s, 0) for s in range(1, 5))
  assert not common.periodic(4, -1) and not common.periodic(4, None)


def test_step_timer_excludes_first_step_and_pauses():
  now = [0.0]
  timer = common.StepTimer(clock=lambda: now[0])
  assert timer.seconds_per_step() is None
  for duration in (100.0, 1.0, 2.0):  # the first step compiles
    now[0] += duration
    timer.tick()
  assert timer.steps == 2
  assert timer.seconds_per_step() == pytest.approx(1.5)
  now[0] += 50.0  # an evaluation
  timer.skip()
  now[0] += 3.0
  timer.tick()
  assert timer.seconds_per_step() == pytest.approx(2.0)


def test_progress_draws_only_when_enabled():
  stream = io.StringIO()
  with common.Progress(10, desc="aqvae", enabled=True, stream=stream) as bar:
    bar.update(4, loss=jnp.float32(0.123456))
    bar.update(10)
  out = stream.getvalue()
  assert "aqvae" in out and "loss=0.1235" in out and "10/10" in out

  quiet = io.StringIO()
  # A StringIO is not a terminal, so the default is off.
  with common.Progress(10, stream=quiet) as bar:
    assert not bar.enabled
    bar.update(5, loss=1.0)
  assert quiet.getvalue() == ""
