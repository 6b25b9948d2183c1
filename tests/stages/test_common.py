"""Tests for nextaccel_jax.stages.common: metric files, checks, timing and stage plumbing."""

import io
import json
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from nextaccel_jax.models import layers
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


def test_tree_norm_and_count_params():
  tree = {"a": jnp.full((2, 2), 3.0, jnp.bfloat16), "b": [jnp.asarray([4.0])]}
  norm = common.tree_norm(tree)
  assert norm.dtype == jnp.float32
  np.testing.assert_allclose(float(norm), math.sqrt(4 * 9 + 16), rtol=1e-6)
  assert float(common.tree_norm({})) == 0.0
  assert layers.count_params(tree) == 5
  assert layers.count_params({"x": jax.ShapeDtypeStruct((3, 7), jnp.float32)}) == 21


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
