"""Tests for nextaccel_jax.stages.common: metric files, checks, timing and stage plumbing."""

import io
import json
import math
import struct

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

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


def test_progress_bar_on_a_terminal_lines_elsewhere():
  stream = io.StringIO()
  with common.Progress(10, desc="aqvae", mode="bar", stream=stream) as bar:
    bar.update(4, loss=jnp.float32(0.123456))
    bar.update(10)
  out = stream.getvalue()
  assert "aqvae" in out and "loss=0.1235" in out and "10/10" in out

  # A log file (a StringIO is no terminal): a line every `every_s` seconds and at the end.
  now = [0.0]
  log = io.StringIO()
  with common.Progress(
    100, initial=20, desc="student", stream=log, every_s=60, clock=lambda: now[0]
  ) as bar:
    assert bar.mode == "lines"
    for step in range(21, 101):
      now[0] += 2.0
      bar.update(step, loss=1.0 / step)
  lines = log.getvalue().splitlines()
  assert len(lines) == 1 + 160 // 60
  assert lines[0].startswith("student 50/100 (50%) loss 0.02 | 2 s/step, ETA 1m40s")
  assert lines[-1].startswith("student 100/100 (100%) loss 0.01 | 2 s/step, ETA 0s")

  quiet = io.StringIO()
  with common.Progress(10, stream=quiet, enabled=False) as bar:
    bar.update(10, loss=1.0)
  assert quiet.getvalue() == ""


def test_headline_keeps_the_overall_metrics():
  last = {"recon/ssim": 0.5, "recon/cartesian_y/ssim": 0.4, "acc/scale_1": 0.1, "neg_kl": -1.0}
  assert common.headline({**last, "kl": 1.0}) == "recon/ssim 0.5, kl 1"


def read_events(folder) -> list:
  """Every `Event` of the TensorBoard event files in `folder`, oldest file first (TFRecord
  framing: length, its CRC, the record, its CRC)."""
  files = []
  for path in folder.glob("events.out.tfevents.*"):
    data, at, events = path.read_bytes(), 0, []
    while at < len(data):
      (length,) = struct.unpack("<Q", data[at : at + 8])
      events.append(event_pb2.Event.FromString(data[at + 12 : at + 12 + length]))
      at += 12 + length + 4
    files.append(events)
  # Two files written within a second can sort either way by name; their first events cannot.
  return [e for events in sorted(files, key=lambda f: f[0].wall_time) for e in events]


def test_metric_writer_tensorboard_events_and_resume(tmp_path):
  with common.MetricWriter(tmp_path) as writer:
    for step in (1, 2, 3):
      writer.write(step, {"loss": 1.0 / step, "step_time_s": None})
    writer.write(3, {"recon/ssim": 0.5}, split="validation")
  # The killed run had got as far as step 3 (and half a line); it resumes from step 2.
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 4, "spl')
  with common.MetricWriter(tmp_path) as writer:
    assert writer.drop_after(2) == 3
    writer.write(3, {"loss": 0.3})
  lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [(r["step"], r["split"]) for r in lines] == [(1, "train"), (2, "train"), (3, "train")]

  events = read_events(tmp_path)
  scalars = [(e.step, v.tag, v.simple_value) for e in events for v in e.summary.value]
  assert scalars[:4] == [
    (1, "train/loss", 1.0),
    (2, "train/loss", 0.5),
    (3, "train/loss", pytest.approx(1 / 3)),
    (3, "validation/recon/ssim", 0.5),
  ]
  assert scalars[4:] == [(3, "train/loss", pytest.approx(0.3))]
  # The second file tells TensorBoard to drop the first file's events from step 3 on.
  assert any(e.session_log.status == e.session_log.START and e.step == 3 for e in events)
