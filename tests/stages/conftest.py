"""Stage tests run a few steps of whole train loops, where XLA's optimisation passes cost more
compile time than they save; both sides of every comparison run with the same setting. The smoke
dataset they train on is built once per session; `smoke_pipeline` (tests/conftest.py) is one run of
every stage, whose workdirs the stage tests inspect and resume against instead of training again."""

import jax
import pytest

from configs import aqvae as aqvae_config
from nextaccel_jax import checkpointing, optim, sharding
from nextaccel_jax.data import build
from nextaccel_jax.stages import stage1_aqvae as aqvae


@pytest.fixture(autouse=True, scope="package")
def _fast_compile():
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


@pytest.fixture(scope="session")
def smoke_data_dir(tmp_path_factory) -> str:
  """The smoke TFDS dataset, built once for every stage test that reads it (none writes to it)."""
  d = tmp_path_factory.mktemp("tfds")
  build.build("smoke", data_dir=d)
  return str(d)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> str:
  """A stage-1 workdir holding a (randomly initialised) smoke tokenizer checkpoint."""
  config = aqvae_config.get_config("smoke")
  config.loss.adversarial = 0.0
  mesh = sharding.make_mesh()
  model = aqvae.make_model(config)
  tx, _ = optim.optimizer_from_config(config.optim, 4, steps_per_epoch=1)
  state, _ = aqvae.create_train_state(config, model, tx, mesh, jax.random.key(3))
  d = tmp_path_factory.mktemp("aqvae")
  with checkpointing.Checkpointer(d) as ckpt:
    ckpt.save(1, state)
  return str(d)
