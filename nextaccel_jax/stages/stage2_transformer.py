"""Stage 2: the next-acceleration-scale transformer, student or privileged teacher.

Design: decisions.md §4.

  python -m nextaccel_jax.main --config=configs/student.py:demo --workdir=runs/student \
      --config.tokenizer_from=runs/aqvae
  python -m nextaccel_jax.main --config=configs/teacher.py:demo --workdir=runs/teacher \
      --config.tokenizer_from=runs/aqvae

Teacher-forced cross-entropy over the 990 positions of scales Q16…QFS. The frozen stage-1
tokenizer turns the six levels of each slice into targets and inputs inside the jitted step; its
variables are a replicated argument, not part of the state, so checkpoints hold only the
transformer. The model's `role` picks the context image (R = 32 for the student, the fully sampled
image for the teacher) and the teacher's randomised prefix (`models.next_scale`). `build_step` jits
the step once; `train_and_evaluate` and `testing.stage_step` share it. Validation reports
per-scale CE and token accuracy, and decodes a few batches autoregressively (argmax, KV cache) for
PSNR/SSIM/LPIPS.

The paper's component ablations (Table 4, `configs/ablations.py`) are fields of `config.model`
and this config: `model.cross_attention=False` (no context encoder or cross-attention; nothing is
copied from stage 1), `model.flat_tokens=True` (every scale at the full 16² grid, tokenised by the
same stage-1 tokenizer, `next_scale.tokenizer_at`) and `trainable_context_encoder=False`.
"""

from __future__ import annotations

import functools
import os
import pathlib

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging

from nextaccel_jax import checkpointing, inference, losses, optim, sharding
from nextaccel_jax.data import pipeline
from nextaccel_jax.evaluation import evaluators
from nextaccel_jax.models import aqvae, layers, next_scale
from nextaccel_jax.models import transformer as transformer_lib
from nextaccel_jax.stages import common
from nextaccel_jax.stages import data as data_stage

NUM_SCALES = len(transformer_lib.PATCH_NUMS) - 1


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  opt_state: optax.OptState


# ------------------------------------------------------------------------------------------------
# Models and frozen tokenizer


def make_tokenizer(config: ml_collections.ConfigDict) -> aqvae.AQVAE:
  """The stage-1 AQ-VAE with `config.tokenizer`'s sizes and compute dtype (the one stage 1 trained
  with; codebook distances stay float32), without remat since it only runs forward."""
  return aqvae.from_fields(config.tokenizer, "config.tokenizer", remat=False)


def make_model(config: ml_collections.ConfigDict) -> transformer_lib.NextAccelTransformer:
  """The transformer of `config.model`, its context encoder sized like `config.tokenizer`."""
  return transformer_lib.from_fields(config.model, config.tokenizer, "config.model")


def load_tokenizer(config: ml_collections.ConfigDict, tokenizer: aqvae.AQVAE, mesh) -> dict:
  """`{"params", "vq_ema"}` of the trained tokenizer, laid out by the `config.sharding` rules.

  Reads the best checkpoint of the stage-1 workdir `config.tokenizer_from` (or its latest one
  when no best was kept).
  """
  path = checkpointing.existing_dir(
    config.tokenizer_from,
    "config.tokenizer_from",
    "point it at a stage-1 workdir, e.g. --config.tokenizer_from=runs/aqvae after "
    "`python -m nextaccel_jax.main --config=configs/aqvae.py:demo --workdir=runs/aqvae`",
  )
  abstract = jax.eval_shape(
    lambda: aqvae.init_variables(tokenizer, jax.random.key(0), config.data.image_size)
  )
  tree = common.load_frozen_params(
    path,
    {"params": abstract["params"], "vq_ema": abstract["vq_ema"]},
    mesh,
    config,
    field="config.tokenizer_from",
    what="the checkpoint does not match config.tokenizer (sizes must equal the stage-1 run's "
    "config.model)",
  )
  return {"params": tree["params"], "vq_ema": tree["vq_ema"]}


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int):
  """AdamW with VAR's no-decay groups; the context encoder is masked out when frozen."""
  return optim.transformer_optimizer(config.optim, total_steps, config.trainable_context_encoder)


def create_train_state(config, model, tx, mesh, rng, tokenizer_variables):
  """The state laid out by `config.sharding`; the context encoder starts as a copy of the stage-1
  encoder (a model without cross-attention has none)."""
  size = config.data.image_size

  def init(rng, tok_params):
    params = transformer_lib.init_params(model, rng, size)["params"]
    if model.cross_attention:
      encoder = next_scale.context_encoder_params_from_aqvae(tok_params)
      params = next_scale.insert_context_encoder(params, encoder)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  abstract = jax.eval_shape(init, rng, tokenizer_variables["params"])
  state_sharding = sharding.state_shardings(abstract, mesh, config)
  state = jax.jit(init, out_shardings=state_sharding)(rng, tokenizer_variables["params"])
  return state, state_sharding


# ------------------------------------------------------------------------------------------------
# Steps


def token_metrics(logits_BLV: jax.Array, targets_BL: jax.Array, patch_nums) -> dict:
  """Mean CE over all positions (the loss) plus CE and argmax accuracy per predicted scale."""
  logits = logits_BLV.astype(jnp.float32)
  ce_BL = optax.softmax_cross_entropy_with_integer_labels(logits, targets_BL)
  hit_BL = (jnp.argmax(logits, axis=-1) == targets_BL).astype(jnp.float32)
  out = {"ce": jnp.mean(ce_BL), "acc": jnp.mean(hit_BL)}
  for k, (b, e) in enumerate(transformer_lib.sequence_layout(patch_nums), start=1):
    out[f"ce/scale_{k}"] = jnp.mean(ce_BL[:, b:e])
    out[f"acc/scale_{k}"] = jnp.mean(hit_BL[:, b:e])
  return out


def train_step(state: TrainState, batch: dict, tok_vars: dict, *, model, tokenizer, tx, seed=0):
  """One teacher-forced step on a global batch `{levels [B,6,H,W,2], family [B]}`."""
  levels, family = batch["levels"], batch["family"]
  rng = jax.random.fold_in(jax.random.key(seed), state.step)
  rng_noise, rng_drop = jax.random.split(rng)
  tf = next_scale.teacher_forcing_batch(model, tokenizer, tok_vars, levels, family, rng=rng_noise)

  def loss_fn(params):
    logits, _ = model.apply(
      {"params": params},
      tf["inputs_BLZ"],
      tf["context_BHW2"],
      family,
      train=True,
      rngs={"dropout": rng_drop},
    )
    m = token_metrics(logits, tf["targets_BL"], model.patch_nums)
    return m["ce"], m

  (loss, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  params, opt_state, norms = common.apply_gradients(tx, state.params, state.opt_state, grads)
  out = {
    "loss": loss,
    **m,
    "prefix_prob": jnp.mean(tf["prefix_prob_B"]),
    **norms,
  }
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), out


def eval_step(state: TrainState, batch: dict, tok_vars: dict, *, model, tokenizer):
  """Teacher-forced metrics with a clean prefix (the teacher's noise is a training device)."""
  clean = model.clone(prefix_noise_max=0.0)
  tf = next_scale.teacher_forcing_batch(
    clean, tokenizer, tok_vars, batch["levels"], batch["family"]
  )
  logits, _ = model.apply(
    {"params": state.params}, tf["inputs_BLZ"], tf["context_BHW2"], batch["family"], train=False
  )
  ce_BL = optax.softmax_cross_entropy_with_integer_labels(
    logits.astype(jnp.float32), tf["targets_BL"]
  )
  hit_BL = (jnp.argmax(logits, axis=-1) == tf["targets_BL"]).astype(jnp.float32)
  return {"ce_BL": ce_BL, "hit_BL": hit_BL}


def recon_step(state: TrainState, batch: dict, tok_vars: dict, *, model, tokenizer):
  """Argmax autoregressive reconstruction (cached), as magnitudes with their references."""
  levels, family = batch["levels"], batch["family"]
  context = next_scale.context_image(levels, model.role)
  x_hat = inference.reconstruct(
    tokenizer,
    model,
    tok_vars,
    {"params": state.params},
    levels[:, 0],
    family,
    context_BHW2=context,
  )
  return {
    "recon": losses.magnitude(x_hat),
    "zero_filled": losses.magnitude(levels[:, 0]),
    "target": losses.magnitude(levels[:, -1]),
  }


def jit_eval_steps(config, model, tokenizer, mesh, state_sharding, tok_sharding) -> dict:
  """`{"eval", "recon"}`: the teacher-forced and the autoregressive validation steps, both
  `(state, batch, tok_vars) -> per-example outputs` (stage 3 validates with them too)."""
  del config
  kw = dict(
    in_shardings=(state_sharding, sharding.data_sharding(mesh), tok_sharding),
    out_shardings=sharding.data_sharding(mesh),
  )
  return {
    "eval": jax.jit(functools.partial(eval_step, model=model, tokenizer=tokenizer), **kw),
    "recon": jax.jit(functools.partial(recon_step, model=model, tokenizer=tokenizer), **kw),
  }


def build_step(
  config: ml_collections.ConfigDict, mesh, tok_vars: dict, total_steps: int
) -> common.StageStep:
  """The student's or teacher's step on `mesh`: `train(state, batch, tok_vars)` (the state
  donated), and `evals` (`jit_eval_steps`).

  Args:
    config: The stage config.
    mesh: The device mesh.
    tok_vars: The frozen tokenizer's variables (`load_tokenizer`), already placed.
    total_steps: Length of the learning-rate schedule.
  """
  tokenizer, model = make_tokenizer(config), make_model(config)
  tx, schedule = make_optimizer(config, total_steps)
  state, state_sharding = create_train_state(
    config, model, tx, mesh, jax.random.key(config.seed), tok_vars
  )
  tok_sharding = sharding.shardings_of(tok_vars)
  train = jax.jit(
    functools.partial(train_step, model=model, tokenizer=tokenizer, tx=tx, seed=config.seed),
    in_shardings=(state_sharding, sharding.data_sharding(mesh), tok_sharding),
    out_shardings=(state_sharding, sharding.replicated(mesh)),
    donate_argnums=0,
  )
  evals = jit_eval_steps(config, model, tokenizer, mesh, state_sharding, tok_sharding)
  models = {"model": model, "tokenizer": tokenizer}
  return common.StageStep(state, state_sharding, train, (tok_vars,), schedule, tx, models, evals)


# ------------------------------------------------------------------------------------------------
# Evaluation


def evaluate(
  eval_fn,
  recon_fn,
  state,
  tok_vars,
  loader: pipeline.EvalLoader,
  *,
  patch_nums=transformer_lib.PATCH_NUMS,
  recon_batches: int = 1,
  protocol: str = "paper",
) -> dict:
  """Per-scale CE/accuracy over the split; image metrics (overall and per mask family) of the
  first `recon_batches` batches (0 = all)."""
  tokens = evaluators.ScaleMeans(transformer_lib.sequence_layout(patch_nums))
  images = evaluators.ImageScores((protocol,), ("alex",))
  for i, batch in enumerate(loader):
    valid = sharding.to_host(batch["valid"])
    out = sharding.to_host(eval_fn(state, batch, tok_vars))
    tokens.add("ce", out["ce_BL"], valid)
    tokens.add("acc", out["hit_BL"], valid)
    if not recon_batches or i < recon_batches:
      r = sharding.to_host(recon_fn(state, batch, tok_vars))
      family = sharding.to_host(batch["family"])[valid]
      for row in ("recon", "zero_filled"):
        images.add(row, r[row][valid], r["target"][valid], family)
  out = {**tokens.result("ce"), **tokens.result("acc"), **images.means(("psnr", "ssim"))}
  # Higher is better for checkpoint selection.
  out["neg_ce"] = -out["ce"]
  return out


# ------------------------------------------------------------------------------------------------
# Loop


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains and evaluates the student or teacher; returns the final validation metrics."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = sharding.mesh_from_config(config)
  tok_vars = load_tokenizer(config, make_tokenizer(config), mesh)
  splits = data_stage.training_splits(config, workdir)
  _, total_steps = common.schedule_length(config, len(splits[0]))
  step = build_step(config, mesh, tok_vars, total_steps)
  step.compile(config, mesh, config.model.role)

  ckpt = common.checkpointer(config, workdir, "neg_ce")
  state, resumed = common.resume(ckpt, step.state, workdir)
  if not resumed and config.init_from:
    wanted = sharding.with_shardings(
      {"params": state.params}, {"params": step.state_sharding.params}
    )
    params = checkpointing.load_params(
      config.init_from,
      wanted,
      field="config.init_from",
      what=f"config.init_from={config.init_from}: its params do not match config.model",
    )["params"]
    state = jax.device_put(
      state.replace(params=params, opt_state=step.tx.init(params)), step.state_sharding
    )
    logging.info("initialised the transformer from %s", config.init_from)
  model = step.models["model"]
  return common.run_stage(
    config,
    workdir,
    step=step,
    state=state,
    ckpt=ckpt,
    splits=splits,
    mesh=mesh,
    evaluate=lambda s, loader: evaluate(
      step.evals["eval"],
      step.evals["recon"],
      s,
      tok_vars,
      loader,
      patch_nums=model.patch_nums,
      recon_batches=config.eval.recon_batches,
      protocol=config.eval.protocol,
    ),
    meta={
      "stage": "transformer",
      "role": config.model.role,
      "model": dict(config.model),
      "tokenizer": dict(config.tokenizer),
      "tokenizer_from": os.path.abspath(config.tokenizer_from),
      "image_size": config.data.image_size,
    },
    best_metric="neg_ce",
    desc=config.model.role,
    postfix=("loss", "acc"),
    summary=f"{config.model.role}: {layers.count_params(state.params)} params",
  )
