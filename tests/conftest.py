"""Test set-up: eight simulated CPU devices, set before JAX is imported anywhere."""

import importlib.metadata
import os
import tempfile

_FLAGS = " --xla_force_host_platform_device_count=8"
# Most of the suite's time is XLA compiling tiny programs; the CPU backend's older fusion path
# compiles them about a quarter faster. The flag is known to the jaxlib line checked here (an
# unknown XLA flag aborts the process), so a newer jaxlib simply runs without it.
if importlib.metadata.version("jaxlib").startswith("0.10."):
  _FLAGS += " --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + _FLAGS).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", False)

# Stage tests compile the same train step several times (straight run, resumed run, ...); a
# persistent cache turns the repeats into cache hits. It lives for one test run, shared by the
# run's pytest-xdist workers (they share the run's id) and the processes the tests start.
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID")
if _RUN:
  _CACHE_DIR = os.path.join(tempfile.gettempdir(), f"nextaccel_jax_cache_{_RUN}")
  os.makedirs(_CACHE_DIR, exist_ok=True)
else:
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


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
  # Tests that read the session's smoke pipeline run share one pytest-xdist worker, so the
  # pipeline trains once (`--dist loadgroup`); first, before xdist turns the marks into groups.
  for item in items:
    if "smoke_pipeline" in getattr(item, "fixturenames", ()):
      item.add_marker(pytest.mark.xdist_group("smoke_pipeline"))


@pytest.fixture(scope="session")
def smoke_pipeline(tmp_path_factory):
  """`(root, config, metrics)` of one run of every stage on the smoke presets (configs/demo.py)."""
  from configs import demo
  from nextaccel_jax.stages import pipeline

  # Tiny models spend far longer in XLA's optimisation passes than running (see fast_compile).
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  root = tmp_path_factory.mktemp("smoke_pipeline")
  config = demo.get_config("smoke")
  with pytest.MonkeyPatch.context() as mp:
    mp.delenv("TFDS_DATA_DIR", raising=False)
    try:
      metrics = pipeline.run(config, root)
    finally:
      jax.config.update("jax_disable_most_optimizations", previous)
  return root, config, metrics


@pytest.fixture(scope="session")
def stage_config(smoke_pipeline):
  """`make(name, **overrides)`: the smoke pipeline's config of one stage, with dotted overrides."""
  from nextaccel_jax.stages import pipeline

  root, config, _ = smoke_pipeline

  def make(name: str, **overrides):
    out = pipeline.stage_configs(config, root)[name]
    out.update_from_flattened_dict(overrides)
    return out

  return make
