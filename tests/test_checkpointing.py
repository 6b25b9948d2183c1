"""Tests for nextaccel_jax.checkpointing on the 8 simulated CPU devices of conftest.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nextaccel_jax import ConfigError, checkpointing, sharding, testing


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh()


def _state(mesh, offset=0.0):
  """A small train state: replicated params, a data-sharded table, a step and a typed key."""
  repl = sharding.replicated(mesh)
  data = sharding.data_sharding(mesh)
  return {
    "params": {
      "dense": {
        "kernel": jax.device_put(jnp.arange(12.0).reshape(3, 4) + offset, repl),
        "bias": jax.device_put(jnp.full((4,), offset, jnp.bfloat16), repl),
      }
    },
    "vq_ema": {"embed": jax.device_put(jnp.arange(32.0).reshape(16, 2) + offset, data)},
    "step": jax.device_put(jnp.int32(7), repl),
    "rng": jax.device_put(jax.random.key(3), repl),
  }


def _assert_same(restored, expected):
  leaves_r, tree_r = jax.tree.flatten(restored)
  leaves_e, tree_e = jax.tree.flatten(expected)
  assert tree_r == tree_e
  for r, e in zip(leaves_r, leaves_e, strict=True):
    assert r.dtype == e.dtype and r.sharding == e.sharding
    if jnp.issubdtype(e.dtype, jax.dtypes.prng_key):
      r, e = jax.random.key_data(r), jax.random.key_data(e)
    np.testing.assert_array_equal(np.asarray(r), np.asarray(e))


def test_save_restore_round_trip_keeps_values_and_shardings(mesh, tmp_path):
  state = _state(mesh, offset=1.0)
  with checkpointing.Checkpointer(tmp_path) as ckpt:
    assert ckpt.latest_step() is None
    assert ckpt.save(5, state, meta={"stage": "aqvae"}, metrics={"loss": np.float32(0.5)})
    assert ckpt.latest_step() == 5
  # A fresh Checkpointer, as in a resumed job.
  with checkpointing.Checkpointer(tmp_path) as ckpt:
    restored, meta = ckpt.restore(checkpointing.abstract_like(state))
  _assert_same(restored, state)
  assert restored["vq_ema"]["embed"].sharding == sharding.data_sharding(mesh)
  assert meta == {"stage": "aqvae", "metrics": {"loss": 0.5}}


def test_restore_onto_other_shardings(mesh, tmp_path):
  state = _state(mesh)
  with checkpointing.Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, state)
    abstract = checkpointing.abstract_like(state)
    # The table was saved sharded over `data`; ask for it replicated.
    abstract["vq_ema"]["embed"] = jax.ShapeDtypeStruct(
      (16, 2), jnp.float32, sharding=sharding.replicated(mesh)
    )
    restored, _ = ckpt.restore(abstract)
  assert restored["vq_ema"]["embed"].sharding.spec == jax.sharding.PartitionSpec()
  np.testing.assert_array_equal(restored["vq_ema"]["embed"], state["vq_ema"]["embed"])


def test_max_to_keep_and_interval(mesh, tmp_path):
  state = _state(mesh)
  with checkpointing.Checkpointer(tmp_path, max_to_keep=2, save_interval_steps=2) as ckpt:
    written = [ckpt.save(step, state) for step in range(1, 7)]
    assert written == [False, True, False, True, False, True]
    assert ckpt.save(7, state, force=True)
    assert not ckpt.save(7, state, force=True)
    assert ckpt.all_steps() == [6, 7]


def test_best_keeps_only_the_best(mesh, tmp_path):
  with checkpointing.Checkpointer(tmp_path, best_metric="ssim", best_mode="max") as ckpt:
    assert ckpt.best_value() is None
    assert ckpt.save_best(1, _state(mesh, 1.0), 0.80)
    assert not ckpt.save_best(2, _state(mesh, 2.0), 0.70)
    assert not ckpt.save_best(3, _state(mesh, 3.0), float("nan"))
    assert ckpt.save_best(4, _state(mesh, 4.0), 0.90, meta={"split": "val"})
    assert ckpt.all_steps(best=True) == [4]
  with checkpointing.Checkpointer(tmp_path) as ckpt:
    assert ckpt.best_value() == pytest.approx(0.90)
    assert not ckpt.save_best(5, _state(mesh, 5.0), 0.85)
    restored, meta = ckpt.restore(checkpointing.abstract_like(_state(mesh)), best=True)
  _assert_same(restored, _state(mesh, 4.0))
  assert meta["best_value"] == pytest.approx(0.90) and meta["best_metric"] == "ssim"
  assert meta["split"] == "val"


def test_best_min_mode_and_resumed_earlier_step(mesh, tmp_path):
  with checkpointing.Checkpointer(tmp_path, best_metric="loss", best_mode="min") as ckpt:
    assert ckpt.save_best(10, _state(mesh, 1.0), 0.5)
    assert not ckpt.save_best(11, _state(mesh, 2.0), 0.6)
    # After a resume from step 8, step 9 improves on the best stored at step 10.
    assert ckpt.save_best(9, _state(mesh, 3.0), 0.4)
    assert ckpt.all_steps(best=True) == [9]
    assert ckpt.best_value() == pytest.approx(0.4)


def test_restore_missing_step_names_workdir(mesh, tmp_path):
  workdir = tmp_path / "stage1"
  with checkpointing.Checkpointer(workdir) as ckpt:
    abstract = checkpointing.abstract_like(_state(mesh))
    with pytest.raises(FileNotFoundError, match="stage1"):
      ckpt.restore(abstract)
    ckpt.save(3, _state(mesh))
    with pytest.raises(FileNotFoundError, match=r"step 4 .*stage1.*\[3\]"):
      ckpt.restore(abstract, step=4)


def test_load_params_from_workdir(mesh, tmp_path):
  state = _state(mesh, offset=2.0)
  with checkpointing.Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, _state(mesh))
    ckpt.save(2, state)
    ckpt.save_best(1, _state(mesh, 9.0), 0.9)

  tree = checkpointing.load_params(tmp_path)
  assert isinstance(tree["params"]["dense"]["kernel"], np.ndarray)
  np.testing.assert_array_equal(
    tree["params"]["dense"]["kernel"], state["params"]["dense"]["kernel"]
  )
  assert tree["params"]["dense"]["bias"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(tree["vq_ema"]["embed"], state["vq_ema"]["embed"])

  best = checkpointing.load_params(tmp_path, best=True)
  np.testing.assert_array_equal(best["vq_ema"]["embed"], _state(mesh, 9.0)["vq_ema"]["embed"])

  # A later stage picks only what it needs, laid out on its own mesh.
  wanted = checkpointing.abstract_like({"params": state["params"]})
  part = checkpointing.load_params(tmp_path / "checkpoints", wanted, step=2)
  assert set(part) == {"params"}
  _assert_same(part["params"], state["params"])

  with pytest.raises(FileNotFoundError, match="step 5"):
    checkpointing.load_params(tmp_path, step=5)
  with pytest.raises(FileNotFoundError):
    checkpointing.load_params(tmp_path / "nowhere")


def test_async_save_is_visible_to_reads(mesh, tmp_path):
  state = _state(mesh)
  with checkpointing.Checkpointer(tmp_path, async_save=True) as ckpt:
    assert ckpt.save(1, state)
    restored, _ = ckpt.restore(checkpointing.abstract_like(state))
  _assert_same(restored, state)


def test_a_damaged_newest_checkpoint_falls_back_and_is_kept_aside(mesh, tmp_path, caplog):
  with checkpointing.Checkpointer(tmp_path, max_to_keep=3) as ckpt:
    for step in (1, 2, 3):
      ckpt.save(step, _state(mesh, offset=float(step)), meta={"at": step})
  testing.damage_checkpoint(tmp_path / "checkpoints" / "3")
  with checkpointing.Checkpointer(tmp_path, max_to_keep=3) as ckpt:
    state, meta, step = ckpt.restore_newest_intact(checkpointing.abstract_like(_state(mesh)))
    assert (step, meta["at"]) == (2, 2)
    assert ckpt.all_steps() == [1, 2]
    # The run goes on and saves its step 3 again where the damaged one was.
    assert ckpt.save(3, _state(mesh, offset=9.0))
  _assert_same(state, _state(mesh, offset=2.0))
  assert (tmp_path / "damaged_checkpoints" / "3" / "state").is_dir()
  assert any(
    "checkpoint step 3" in r.getMessage() and "step 2" in r.getMessage() for r in caplog.records
  )


def test_no_restorable_checkpoint_moves_nothing(mesh, tmp_path):
  with checkpointing.Checkpointer(tmp_path) as ckpt:
    assert ckpt.restore_newest_intact(checkpointing.abstract_like(_state(mesh))) is None
    ckpt.save(1, _state(mesh))
  # A state of another layout (a changed config) fails on every step: nothing is set aside.
  other = {"params": {"w": jax.ShapeDtypeStruct((5,), jnp.float32)}}
  with checkpointing.Checkpointer(tmp_path) as ckpt:
    with pytest.raises(ConfigError, match="no checkpoint in .* restores .* step 1"):
      ckpt.restore_newest_intact(other)
    assert ckpt.all_steps() == [1]
  assert not (tmp_path / "damaged_checkpoints").exists()
