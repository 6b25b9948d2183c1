"""Test set-up: eight simulated CPU devices, set before JAX is imported anywhere."""

import os
import tempfile

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", False)

# Stage tests compile the same train step several times (straight run, resumed run, ...); a
# persistent cache in a per-session temp dir turns the repeats into cache hits.
_CACHE_DIR = tempfile.mkdtemp(prefix="nextaccel_jax_cache_")
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


# Shared by the model and inference tests (tiny sizes in `nextaccel_jax.testing`).


@pytest.fixture(scope="module")
def fast_compile():
  """XLA without its expensive optimisation passes: tiny models spend far longer in the compiler
  than running, so compile time is what such a test file's run time is made of."""
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)


@pytest.fixture(scope="module")
def tok():
  """`(tokenizer, variables)`: the tiny AQ-VAE with random variables."""
  from nextaccel_jax import testing
  from nextaccel_jax.models import aqvae

  model = aqvae.AQVAE(label_features=16, **testing.TINY_TOKENIZER)
  return model, testing.random_tokenizer_variables(model, testing.TINY_IMAGE)


@pytest.fixture(scope="module")
def tiny(tok):
  """`(transformer, params)`: the tiny transformer sized for `tok`, initialised."""
  from nextaccel_jax import testing
  from nextaccel_jax.models import transformer

  model = transformer.NextAccelTransformer(
    **testing.TINY_TRANSFORMER, **transformer.context_encoder_fields(tok[0])
  )
  return model, transformer.init_params(model, testing.rbg_key(1), testing.TINY_IMAGE)
