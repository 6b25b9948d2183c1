"""Stage tests run a few steps of whole train loops, where XLA's optimisation passes cost more
compile time than they save; both sides of every comparison run with the same setting. The smoke
dataset they train on is built once per session."""

import jax
import pytest

from nextaccel_jax.data import build


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
