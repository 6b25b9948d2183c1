"""Test set-up: eight simulated CPU devices, set before JAX is imported anywhere."""

import os
import tempfile

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", False)

# Stage tests compile the same train step several times (straight run, resumed run, ...); a
# persistent cache in a per-session temp dir turns the repeats into cache hits.
_CACHE_DIR = tempfile.mkdtemp(prefix="nextaccel_jax_cache_")
jax.config.update("jax_compilation_cache_dir", _CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
