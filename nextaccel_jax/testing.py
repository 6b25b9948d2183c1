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

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nextaccel_jax.models import aqvae

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


@dataclasses.dataclass
class StageStep:
  """One stage's jitted train step laid out on a mesh, its frozen inputs drawn at random.

  Attributes:
    state: The initial train state.
    state_sharding: Its shardings (the `config.sharding` rules).
    jitted: `(state, batch, *frozen) -> (state, metrics)`, the stage's own `jit_steps` train step.
    frozen: The frozen arguments after the batch (LPIPS and tower; tokenizer; tokenizer and
      teacher), placed by the same rules.
  """

  state: Any
  state_sharding: Any
  jitted: Any
  frozen: tuple

  def __call__(self, state, batch):
    return self.jitted(state, batch, *self.frozen)


STAGES = ("aqvae", "transformer", "distill")


def stage_step(stage: str, config, mesh, total_steps: int = 1000, seed: int = 0) -> StageStep:
  """The train step of `stage` ("aqvae", "transformer" or "distill") for `config` on `mesh`.

  Weights that a real run loads from earlier stages (the tokenizer, the teacher, the student's
  start) are random here, so no workdir or dataset is needed; the step itself is the stage's.
  """
  # Imported here: the stages import the models this module's helpers build on.
  from nextaccel_jax import sharding
  from nextaccel_jax.models import transformer as transformer_lib
  from nextaccel_jax.stages import aqvae as aqvae_stage
  from nextaccel_jax.stages import distill as distill_stage
  from nextaccel_jax.stages import transformer as transformer_stage

  rng = jax.random.key(seed)
  size = config.data.image_size
  if stage == "aqvae":
    model = aqvae_stage.make_model(config)
    tx, _ = aqvae_stage.make_optimizer(config, total_steps)
    disc = aqvae_stage.make_discriminator(config)
    disc_tx = aqvae_stage.make_disc_optimizer(config) if disc is not None else None
    frozen = aqvae_stage.load_frozen(config, disc, mesh)
    state, state_sharding = aqvae_stage.create_train_state(
      config, model, tx, mesh, rng, disc, disc_tx, frozen
    )
    jitted, _ = aqvae_stage.jit_steps(
      config, model, tx, mesh, state_sharding, disc, disc_tx, sharding.shardings_of(frozen)
    )
    return StageStep(state, state_sharding, jitted, (frozen,))
  if stage not in STAGES:
    raise ValueError(f"unknown stage {stage!r}; choose one of {STAGES}")

  tokenizer = transformer_stage.make_tokenizer(config)
  tok_vars = random_tokenizer_variables(tokenizer, size, seed)
  tok_vars = sharding.place(tok_vars, mesh, config, prefix="frozen/")
  tok_sharding = sharding.shardings_of(tok_vars)
  tx, _ = transformer_stage.make_optimizer(config, total_steps)
  if stage == "transformer":
    model = transformer_stage.make_model(config)
    state, state_sharding = transformer_stage.create_train_state(
      config, model, tx, mesh, rng, tok_vars
    )
    jitted, _, _ = transformer_stage.jit_steps(
      config, model, tokenizer, tx, mesh, state_sharding, tok_sharding
    )
    return StageStep(state, state_sharding, jitted, (tok_vars,))

  student, teacher = distill_stage.make_models(config)
  # Unrelated random weights for the two, so the KL and its gradient are far from zero.
  p_student = transformer_lib.init_params(student, rbg_key(seed + 1), size)["params"]
  p_teacher = transformer_lib.init_params(teacher, rbg_key(seed + 2), size)["params"]
  p_teacher = sharding.place(p_teacher, mesh, config, prefix="frozen/")
  state, state_sharding = distill_stage.create_train_state(config, student, tx, mesh, p_student)
  jitted, _ = distill_stage.jit_steps(
    config,
    student,
    teacher,
    tokenizer,
    tx,
    mesh,
    state_sharding,
    tok_sharding,
    sharding.shardings_of(p_teacher),
  )
  return StageStep(state, state_sharding, jitted, (tok_vars, p_teacher))
