"""Cheap random variables for tests and benchmarks.

Initialising a module runs (and on first use compiles) every initializer, which on CPU can take
far longer than the computation a test or benchmark is about. The helpers here take only the
shapes, from `jax.eval_shape` (tracing, no compile), and fill them from numpy:

  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
  variables = testing.random_like(abstract, seed=0)

The values follow fixed rules (below) rather than each module's initializers, so use these where
the initial values themselves are not under test.
"""

from __future__ import annotations

import math
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nextaccel_jax import sharding
from nextaccel_jax.data import fastmri_brain_multiscale
from nextaccel_jax.models import aqvae, transformer
from nextaccel_jax.stages import baseline, common, stage1_aqvae, stage2_transformer, stage3_distill

# Tiny sizes the model tests share: a 64² image → 16² latent tokenizer with 64 codes and a
# two-block transformer whose blocks both read the 16² context (the 64² level costs most of a
# CPU step).
TINY_TOKENIZER = dict(
  ch=16, ch_mult=(1, 1, 2), num_res_blocks=1, z_channels=8, vocab_size=64, norm_groups=8
)
TINY_TRANSFORMER = dict(depth=2, width=64, num_heads=4, context_map=(0, 1))
TINY_IMAGE = aqvae.min_image_size(TINY_TOKENIZER["ch_mult"])


def rbg_key(seed: int) -> jax.Array:
  """A PRNG key whose initializers compile far faster on CPU than threefry's."""
  return jax.random.key(seed, impl="unsafe_rbg")


def random_like(abstract_tree: Any, seed: int) -> Any:
  """A tree of float32 `jnp` arrays with the shapes of `abstract_tree`, filled from numpy.

  By the last key of each leaf's path:

  - leaves under a `film` module, `bias` and `cluster_size`: zeros (`cluster_size`: ones, so that
    EMA code books do not divide by zero);
  - `scale`: ones;
  - everything else (kernels, embeddings, code books): standard normal, kernels divided by the
    square root of their fan-in (the product of all dimensions but the last), so activations stay
    unit-scale and tokens vary.

  Args:
    abstract_tree: nested dicts of leaves with a `.shape` (e.g. `jax.ShapeDtypeStruct` from
      `jax.eval_shape` of a Flax `init`).
    seed: the numpy generator's seed; leaves draw in `jax.tree` order, so the same tree and seed
      give the same values.

  Returns:
    A tree of the same structure holding `jnp.ndarray`s.
  """
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name, last = jax.tree_util.keystr(path), path[-1].key
    if "film" in name or last in ("bias", "cluster_size"):
      return np.zeros(s.shape, np.float32) + (last == "cluster_size")
    if last == "scale":
      return np.ones(s.shape, np.float32)
    fan_in = math.prod(s.shape[:-1]) if last == "kernel" else 1
    return (rng.standard_normal(s.shape) / math.sqrt(fan_in)).astype(np.float32)

  return jax.tree.map(jnp.asarray, jax.tree.map_with_path(fill, abstract_tree))


def random_tokenizer_variables(model: aqvae.AQVAE, image_size: int, seed: int = 0) -> dict:
  """`{"params", "vq_ema"}` for `model` on images of side `image_size`, from `random_like`.

  The EMA code book's running sum `embed_avg` equals its `embed`, as after a real initialisation
  (a separate array, so that either may be donated).
  """
  abstract = jax.eval_shape(lambda: aqvae.init_variables(model, jax.random.key(0), image_size))
  variables = random_like(dict(abstract), seed)
  quantize = variables["vq_ema"]["quantize"]
  quantize["embed_avg"] = jnp.array(quantize["embed"], copy=True)
  return variables


# ------------------------------------------------------------------------------------------------
# A stage's train step with random weights

STAGES = ("aqvae", "transformer", "distill", "baseline")


def stage_step(
  stage: str, config, mesh, total_steps: int = 1000, seed: int = 0
) -> common.StageStep:
  """The train step of `stage` ("aqvae", "transformer", "distill" or "baseline") for `config`
  on `mesh`.

  The stage's own `build_step`; weights that a real run loads from earlier stages (the
  tokenizer, the teacher, the student's start) are random here, so no workdir or dataset is
  needed; `seed` draws them (the state itself starts from `config.seed`, as in training).
  `step.train` is the jitted `(state, batch, *step.frozen) -> (state, metrics)`. A multicoil
  E2E-VarNet's batches carry the builder's virtual coils' maps (`TrainLoader(keep_maps=True)`).
  """
  size = config.data.image_size
  if stage == "baseline":
    uses_maps = baseline.uses_maps(config, baseline.make_model(config))
    coils = fastmri_brain_multiscale.MultiscaleConfig.num_virtual_coils if uses_maps else 0
    return baseline.build_step(config, mesh, total_steps, coils)
  if stage == "aqvae":
    frozen = stage1_aqvae.load_frozen(config, stage1_aqvae.make_discriminator(config), mesh)
    return stage1_aqvae.build_step(config, mesh, frozen, total_steps)
  if stage not in STAGES:
    raise ValueError(f"unknown stage {stage!r}; choose one of {STAGES}")

  tokenizer = stage2_transformer.make_tokenizer(config)
  tok_vars = random_tokenizer_variables(tokenizer, size, seed)
  tok_vars = sharding.place(tok_vars, mesh, config, prefix="frozen/")
  if stage == "transformer":
    return stage2_transformer.build_step(config, mesh, tok_vars, total_steps)

  student, teacher = stage3_distill.make_models(config)
  # Unrelated random weights for the two, so the KL and its gradient are far from zero.
  p_student = transformer.init_params(student, rbg_key(seed + 1), size)["params"]
  p_teacher = transformer.init_params(teacher, rbg_key(seed + 2), size)["params"]
  p_teacher = sharding.place(p_teacher, mesh, config, prefix="frozen/")
  return stage3_distill.build_step(config, mesh, (tok_vars, p_teacher), total_steps, p_student)


def damage_checkpoint(step_dir: str | os.PathLike) -> None:
  """Overwrites every array data file of a saved Orbax checkpoint step with zeros of the same
  size, as a disk fault or a cut-off copy leaves it; its metadata still reads."""
  data = [p for p in pathlib.Path(step_dir).rglob("*") if p.is_file() and p.parent.name == "d"]
  if not data:
    raise FileNotFoundError(f"no array data files under {step_dir}")
  for p in data:
    p.write_bytes(b"\0" * p.stat().st_size)
