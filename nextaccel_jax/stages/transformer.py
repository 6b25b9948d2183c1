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
image for the teacher) and the teacher's randomised prefix. Validation reports per-scale CE and
token accuracy, and decodes a few batches autoregressively (argmax, KV cache) for PSNR/SSIM/LPIPS.
"""

from __future__ import annotations

import functools
import os
import pathlib

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from nextaccel_jax import checkpointing, inference, losses, sharding
from nextaccel_jax.data import masks, pipeline, prepare
from nextaccel_jax.evaluation import lpips_metric
from nextaccel_jax.evaluation import metrics as np_metrics
from nextaccel_jax.models import aqvae
from nextaccel_jax.models import transformer as transformer_lib
from nextaccel_jax.stages import common

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
  fields = dict(config.tokenizer)
  fields["dtype"] = jnp.dtype(fields.get("dtype", "float32"))
  fields["param_dtype"] = jnp.float32
  fields["remat"] = False
  return aqvae.AQVAE(**fields)


def model_from_fields(model_fields, tokenizer_fields) -> transformer_lib.NextAccelTransformer:
  """The transformer of a `config.model` section, its context encoder sized like the tokenizer."""
  fields = dict(model_fields)
  fields["dtype"] = jnp.dtype(fields.get("dtype", "float32"))
  fields["param_dtype"] = jnp.float32
  fields.update(transformer_lib.context_encoder_fields(dict(tokenizer_fields)))
  return transformer_lib.NextAccelTransformer(**fields)


def make_model(config: ml_collections.ConfigDict) -> transformer_lib.NextAccelTransformer:
  return model_from_fields(config.model, config.tokenizer)


def load_tokenizer(config: ml_collections.ConfigDict, tokenizer: aqvae.AQVAE, mesh) -> dict:
  """`{"params", "vq_ema"}` of the trained tokenizer, laid out by the `config.sharding` rules.

  Reads the best checkpoint of the stage-1 workdir `config.tokenizer_from` (or its latest one
  when no best was kept).
  """
  path = config.tokenizer_from
  if not path:
    raise ValueError(
      "config.tokenizer_from is empty: point it at a stage-1 workdir, e.g. "
      "--config.tokenizer_from=runs/aqvae after "
      "`python -m nextaccel_jax.main --config=configs/aqvae.py:demo --workdir=runs/aqvae`"
    )
  path = os.path.expanduser(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"config.tokenizer_from={path}: no such directory (stage-1 workdir)")
  abstract = jax.eval_shape(
    lambda: aqvae.init_variables(tokenizer, jax.random.key(0), config.data.image_size)
  )
  abstract = sharding.with_shardings(
    abstract, sharding.state_shardings(abstract, mesh, config, prefix="frozen/")
  )
  try:
    tree = checkpointing.load_best_or_latest(path, dict(abstract))
  except (ValueError, KeyError) as e:
    raise ValueError(
      f"config.tokenizer_from={path}: the checkpoint does not match config.tokenizer "
      f"(sizes must equal the stage-1 run's config.model): {e}"
    ) from e
  return {"params": tree["params"], "vq_ema": tree["vq_ema"]}


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int):
  """AdamW with VAR's no-decay groups; the context encoder is masked out when frozen."""
  tx, schedule = common.optimizer_from_config(config.optim, total_steps)
  return transformer_lib.mask_frozen(tx, config.trainable_context_encoder), schedule


def create_train_state(config, model, tx, mesh, rng, tokenizer_variables):
  """The state laid out by `config.sharding`; the context encoder starts as a copy of the stage-1
  encoder."""
  size = config.data.image_size

  def init(rng, tok_params):
    params = transformer_lib.init_params(model, rng, size)["params"]
    encoder = transformer_lib.context_encoder_params_from_aqvae(tok_params)
    params = transformer_lib.insert_context_encoder(params, encoder)
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
  tf = transformer_lib.teacher_forcing_batch(
    model, tokenizer, tok_vars, levels, family, rng=rng_noise
  )

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
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  out = {
    "loss": loss,
    **m,
    "prefix_prob": jnp.mean(tf["prefix_prob_B"]),
    "grad_norm": common.tree_norm(grads),
    "param_norm": common.tree_norm(params),
    "update_norm": common.tree_norm(updates),
  }
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), out


def eval_step(state: TrainState, batch: dict, tok_vars: dict, *, model, tokenizer):
  """Teacher-forced metrics with a clean prefix (the teacher's noise is a training device)."""
  clean = model.clone(prefix_noise_max=0.0)
  tf = transformer_lib.teacher_forcing_batch(
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
  context = levels[:, 0] if model.role == "student" else levels[:, -1]
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


def jit_steps(config, model, tokenizer, tx, mesh, state_sharding, tok_sharding=None):
  """`(train, eval, recon)`; train is `(state, batch, tok_vars) -> (state, metrics)`.

  `tok_sharding` is the layout `load_tokenizer` gave the tokenizer (None: replicated).
  """
  data = sharding.data_sharding(mesh)
  repl = sharding.replicated(mesh)
  tok_sharding = repl if tok_sharding is None else tok_sharding
  train = jax.jit(
    functools.partial(train_step, model=model, tokenizer=tokenizer, tx=tx, seed=config.seed),
    in_shardings=(state_sharding, data, tok_sharding),
    out_shardings=(state_sharding, repl),
    donate_argnums=0,
  )
  kw = dict(in_shardings=(state_sharding, data, tok_sharding), out_shardings=data)
  evaluate_fn = jax.jit(functools.partial(eval_step, model=model, tokenizer=tokenizer), **kw)
  recon_fn = jax.jit(functools.partial(recon_step, model=model, tokenizer=tokenizer), **kw)
  return train, evaluate_fn, recon_fn


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
  layout = transformer_lib.sequence_layout(patch_nums)
  ce = [[] for _ in layout]
  acc = [[] for _ in layout]
  images = {"recon": {}, "zero_filled": {}}
  for i, batch in enumerate(loader):
    valid = sharding.to_host(batch["valid"])
    out = sharding.to_host(eval_fn(state, batch, tok_vars))
    for j, (b, e) in enumerate(layout):
      ce[j].extend(out["ce_BL"][valid, b:e].mean(axis=1))
      acc[j].extend(out["hit_BL"][valid, b:e].mean(axis=1))
    if not recon_batches or i < recon_batches:
      r = sharding.to_host(recon_fn(state, batch, tok_vars))
      gt = r["target"][valid]
      family = sharding.to_host(batch["family"])[valid]
      for key, scores in images.items():
        pred = r[key][valid]
        values = {
          "psnr": np.atleast_1d(np_metrics.psnr(gt, pred, protocol=protocol)),
          "ssim": np.atleast_1d(np_metrics.ssim(gt, pred, protocol=protocol)),
          "lpips_alex": lpips_metric.lpips(gt, pred, protocol=protocol),
        }
        for name, v in values.items():
          scores.setdefault(name, []).extend(v)
          for f in np.unique(family):
            fam_key = f"{masks.FAMILIES[int(f)]}/{name}"
            scores.setdefault(fam_key, []).extend(v[family == f])
  sizes = np.array([(e - b) for b, e in layout], np.float64)
  ce_k = np.array([np.mean(v) for v in ce])
  acc_k = np.array([np.mean(v) for v in acc])
  out = {
    "ce": float((ce_k * sizes).sum() / sizes.sum()),
    "acc": float((acc_k * sizes).sum() / sizes.sum()),
  }
  for k in range(len(layout)):
    out[f"ce/scale_{k + 1}"] = float(ce_k[k])
    out[f"acc/scale_{k + 1}"] = float(acc_k[k])
  for key, scores in images.items():
    for name, v in scores.items():
      out[f"{key}/{name}"] = float(np.mean(v))
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
  tokenizer = make_tokenizer(config)
  tok_vars = load_tokenizer(config, tokenizer, mesh)
  train_src, val_src = prepare.training_splits(config, workdir)

  steps_per_epoch = max(1, len(train_src) // config.data.batch_size)
  total_steps = config.num_train_steps or config.num_epochs * steps_per_epoch
  model = make_model(config)
  tx, schedule = make_optimizer(config, total_steps)
  state, state_sharding = create_train_state(
    config, model, tx, mesh, jax.random.key(config.seed), tok_vars
  )
  train_fn, eval_fn, recon_fn = jit_steps(
    config, model, tokenizer, tx, mesh, state_sharding, sharding.shardings_of(tok_vars)
  )
  batch_spec = pipeline.train_batch_spec(config.data.batch_size, config.data.image_size, mesh)
  train_fn = common.compile_train_step(
    train_fn, (state, batch_spec, tok_vars), name=config.model.role, memory=config.get("memory")
  )

  ckpt = checkpointing.Checkpointer(
    workdir,
    max_to_keep=config.ckpt.max_to_keep,
    keep_best=True,
    best_metric="neg_ce",
    best_mode="max",
  )
  meta = {
    "stage": "transformer",
    "role": config.model.role,
    "model": dict(config.model),
    "tokenizer": dict(config.tokenizer),
    "tokenizer_from": os.path.abspath(config.tokenizer_from),
    "image_size": config.data.image_size,
  }
  start = ckpt.latest_step()
  if start is not None:
    state, _ = ckpt.restore(checkpointing.abstract_like(state), start)
    logging.info("resumed from %s at step %d", workdir, start)
  elif config.init_from:
    params = checkpointing.load_params(config.init_from)["params"]
    state = jax.device_put(state.replace(params=params, opt_state=tx.init(params)), state_sharding)
    logging.info("initialised the transformer from %s", config.init_from)

  writer = common.MetricWriter(workdir)
  writer.write_config(config)
  logging.info(
    "%s: %d params, %d steps (%d per epoch), batch %d on %d devices",
    config.model.role,
    common.count_params(state.params),
    total_steps,
    steps_per_epoch,
    config.data.batch_size,
    jax.device_count(),
  )
  loader, val_loader = prepare.loaders(config, train_src, val_src, mesh, int(state.step))
  return common.run_stage_loop(
    config,
    workdir,
    loader=loader,
    ckpt=ckpt,
    writer=writer,
    state=state,
    train_fn=lambda s, b: train_fn(s, b, tok_vars),
    evaluate_fn=lambda s: evaluate(
      eval_fn,
      recon_fn,
      s,
      tok_vars,
      val_loader,
      patch_nums=model.patch_nums,
      recon_batches=config.eval.recon_batches,
      protocol=config.eval.protocol,
    ),
    total_steps=total_steps,
    schedule=schedule,
    meta=meta,
    best_metric="neg_ce",
    desc=config.model.role,
    postfix=("loss", "acc"),
  )
