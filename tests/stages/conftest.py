"""Stage tests run a few steps of whole train loops, where XLA's optimisation passes cost more
compile time than they save; both sides of every comparison run with the same setting."""

import jax
import pytest


@pytest.fixture(autouse=True, scope="package")
def _fast_compile():
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)
