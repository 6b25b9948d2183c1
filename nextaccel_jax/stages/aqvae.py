"""Stage 1: training the AQ-VAE tokenizer (decisions.md §3, §8).

  python -m nextaccel_jax.main --config=configs/aqvae.py:demo --workdir=runs/aqvae

Objective (paper Eq. 3, the terms this stage owns): `w_ssim·(1 − SSIM(|x̂|, |x_FS|)) + β·commitment`.
Further terms (perceptual, adversarial) plug in through `LOSS_TERMS`: each is a pure function of the
reconstruction, target and model aux returning `(loss, metrics)`, enabled by a non-zero weight in
`config.loss`.

The state is one pytree (`TrainState`) replicated over a `("data",)` mesh; batches are sharded
along it. `train_step` is a single `jax.jit` with explicit shardings and the state donated. The
EMA codebook (`vq_ema`) is updated inside the step from global batch statistics. Resume order,
written in `train_and_evaluate`: (1) the workdir's latest checkpoint, (2) `config.init_from`
(params and codebook of a converted VAR VQ-VAE or another stage-1 run), (3) scratch.
"""

from __future__ import annotations

import functools
import json
import pathlib
from collections.abc import Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from nextaccel_jax import checkpointing, losses, sharding
from nextaccel_jax.data import pipeline, prepare
from nextaccel_jax.evaluation import metrics as np_metrics
from nextaccel_jax.models import aqvae
from nextaccel_jax.stages import common

NUM_LEVELS = aqvae.NUM_LEVELS


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  opt_state: optax.OptState
  vq_ema: dict


# ------------------------------------------------------------------------------------------------
# Loss terms


def _ssim_term(x_hat_BHW2, target_BHW2, aux, params):
  del aux, params
  loss = losses.ssim_loss(losses.magnitude(x_hat_BHW2), losses.magnitude(target_BHW2))
  return loss, {"ssim_loss": loss}


def _l1_term(x_hat_BHW2, target_BHW2, aux, params):
  del aux, params
  loss = losses.l1_magnitude(x_hat_BHW2, target_BHW2)
  return loss, {"l1_loss": loss}


def _commitment_term(x_hat_BHW2, target_BHW2, aux, params):
  del x_hat_BHW2, target_BHW2, params
  # The quantizer already multiplies by β; the config weight scales on top of that (1.0 by default).
  return aux["commitment"], {"commitment": aux["commitment"]}


# name -> fn(x_hat, target, aux, params) -> (scalar loss, metrics). Weights come from config.loss.
LOSS_TERMS: dict[str, Callable] = {
  "ssim": _ssim_term,
  "l1": _l1_term,
  "commitment": _commitment_term,
}


def total_loss(x_hat, target, aux, params, weights: dict):
  """Weighted sum of the enabled loss terms and their metrics."""
  loss = jnp.zeros((), jnp.float32)
  out = {}
  for name, weight in weights.items():
    if not weight:
      continue
    if name not in LOSS_TERMS:
      raise ValueError(f"config.loss.{name}: no such loss term; known: {sorted(LOSS_TERMS)}")
    term, m = LOSS_TERMS[name](x_hat, target, aux, params)
    loss = loss + weight * term.astype(jnp.float32)
    out.update(m)
  return loss, out


# ------------------------------------------------------------------------------------------------
# Model, optimizer, state


def make_model(config: ml_collections.ConfigDict) -> aqvae.AQVAE:
  fields = dict(config.model)
  fields["dtype"] = jnp.dtype(fields.get("dtype", "float32"))
  fields["param_dtype"] = jnp.float32
  return aqvae.AQVAE(**fields)


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int):
  o = config.optim
  schedule = common.make_schedule(
    base_lr=o.lr,
    total_steps=total_steps,
    warmup_steps=o.warmup_steps,
    schedule=o.schedule,
    end_lr=o.end_lr,
  )
  tx = common.make_optimizer(
    learning_rate=schedule,
    b1=o.b1,
    b2=o.b2,
    weight_decay=o.weight_decay,
    grad_clip=o.grad_clip,
    no_decay_mask_fn=common.no_decay_mask,
  )
  return tx, schedule


def create_train_state(config, model, tx, mesh, rng):
  """Creates the state already in its (replicated) sharding: `(state, state_sharding)`."""
  size = config.data.image_size

  def init(rng):
    variables = aqvae.init_variables(model, rng, size)
    params = variables["params"]
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      vq_ema=variables["vq_ema"],
    )

  abstract = jax.eval_shape(init, rng)
  state_sharding = jax.tree.map(lambda _: sharding.replicated(mesh), abstract)
  state = jax.jit(init, out_shardings=state_sharding)(rng)
  return state, state_sharding


def _usage_metrics(aux) -> dict:
  out = {}
  for k in range(NUM_LEVELS):
    out[f"usage/scale_{k}"] = aux["usage_per_scale"][k]
    out[f"perplexity/scale_{k}"] = aux["perplexity_per_scale"][k]
  return out


def train_step(state: TrainState, batch: dict, *, model, tx, weights: dict, seed: int = 0):
  """One optimisation step on a global batch `{levels [B,6,H,W,2], family [B]}`."""
  levels, family = batch["levels"], batch["family"]
  target = levels[:, -1]
  # Per-step randomness (dead-code re-seeding) is a pure function of (seed, step): resumable.
  rng = jax.random.fold_in(jax.random.key(seed), state.step)

  def loss_fn(params):
    (x_hat, aux), new_vars = model.apply(
      {"params": params, "vq_ema": state.vq_ema},
      levels,
      family,
      None,
      train=True,
      mutable=["vq_ema"],
      rngs={"vq": rng},
    )
    loss, terms = total_loss(x_hat, target, aux, params, weights)
    return loss, (terms, aux, new_vars["vq_ema"], x_hat)

  (loss, (terms, aux, vq_ema, x_hat)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
    state.params
  )
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  mag_hat, mag = losses.magnitude(x_hat), losses.magnitude(target)
  out = {
    "loss": loss,
    **terms,
    "ssim": jnp.mean(losses.ssim(mag_hat, mag, jnp.max(mag, axis=(1, 2)))),
    "grad_norm": common.tree_norm(grads),
    "param_norm": common.tree_norm(params),
    "update_norm": common.tree_norm(updates),
    "restarted_codes": aux["restarted_codes"],
    **_usage_metrics(aux),
  }
  new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, vq_ema=vq_ema)
  return new_state, out


def eval_step(state: TrainState, batch: dict, *, model):
  """Magnitudes for evaluation: all six levels, Q32 alone, zero-filled R = 32, and the target."""
  levels, family = batch["levels"], batch["family"]
  b = levels.shape[0]
  variables = {"params": state.params, "vq_ema": state.vq_ema}
  all_active = jnp.ones((b, NUM_LEVELS), jnp.float32)
  r32_only = jnp.zeros((b, NUM_LEVELS), jnp.float32).at[:, 0].set(1.0)
  x_all = model.apply(variables, levels, family, all_active, method=aqvae.AQVAE.reconstruct)
  x_r32 = model.apply(variables, levels, family, r32_only, method=aqvae.AQVAE.reconstruct)
  return {
    "recon_all": losses.magnitude(x_all),
    "recon_r32": losses.magnitude(x_r32),
    "zero_filled": losses.magnitude(levels[:, 0]),
    "target": losses.magnitude(levels[:, -1]),
  }


def jit_steps(config, model, tx, mesh, state_sharding):
  """The jitted train and eval steps with explicit shardings (the state is donated)."""
  data = sharding.data_sharding(mesh)
  repl = sharding.replicated(mesh)
  weights = {k: float(v) for k, v in config.loss.items()}
  train = jax.jit(
    functools.partial(train_step, model=model, tx=tx, weights=weights, seed=config.seed),
    in_shardings=(state_sharding, data),
    out_shardings=(state_sharding, repl),
    donate_argnums=0,
  )
  evaluate = jax.jit(
    functools.partial(eval_step, model=model),
    in_shardings=(state_sharding, data),
    out_shardings=data,
  )
  return train, evaluate


# ------------------------------------------------------------------------------------------------
# Evaluation


def evaluate(eval_fn, state, loader: pipeline.EvalLoader, protocol: str = "paper") -> dict:
  """Mean SSIM/PSNR (numpy, canonical metrics) over a fixed pass of the eval split."""
  scores = {k: {"ssim": [], "psnr": []} for k in ("recon_all", "recon_r32", "zero_filled")}
  for batch in loader:
    out = jax.tree.map(np.asarray, eval_fn(state, batch))
    valid = np.asarray(batch["valid"])
    gt = out["target"][valid]
    for key, s in scores.items():
      pred = out[key][valid]
      s["ssim"].extend(np.atleast_1d(np_metrics.ssim(gt, pred, protocol=protocol)))
      s["psnr"].extend(np.atleast_1d(np_metrics.psnr(gt, pred, protocol=protocol)))
  return {f"{key}/{m}": float(np.mean(v)) for key, s in scores.items() for m, v in s.items()}


# ------------------------------------------------------------------------------------------------
# Loop


def _load_init_from(path: str, state: TrainState, state_sharding) -> TrainState:
  """Params and codebook from another checkpoint (a converted VAR VQ-VAE or stage-1 run)."""
  tree = checkpointing.load_params(path)
  params = tree["params"]
  vq_ema = tree["vq_ema"]
  expect = jax.tree.map(lambda x: x.shape, (state.params, state.vq_ema))
  got = jax.tree.map(lambda x: np.shape(x), (params, vq_ema))
  if expect != got:
    raise ValueError(
      f"config.init_from={path}: parameter shapes differ from config.model; "
      "convert with the same model sizes"
    )
  state = state.replace(params=params, vq_ema=vq_ema)
  return jax.device_put(state, state_sharding)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains and evaluates stage 1; returns the final validation metrics."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = sharding.make_mesh(config.get("mesh") or None)
  data_dir = prepare.data_dir_for(config, workdir)
  if config.data.build:
    prepare.build_from_config(config, data_dir)
  name = prepare.dataset_name(config)
  train_src = pipeline.load_split(name, "train", data_dir)
  val_src = pipeline.load_split(name, "validation", data_dir)

  steps_per_epoch = max(1, len(train_src) // config.data.batch_size)
  total_steps = config.num_train_steps or config.num_epochs * steps_per_epoch
  model = make_model(config)
  tx, schedule = make_optimizer(config, total_steps)
  rng = jax.random.key(config.seed)
  state, state_sharding = create_train_state(config, model, tx, mesh, rng)
  train_fn, eval_fn = jit_steps(config, model, tx, mesh, state_sharding)

  ckpt = checkpointing.Checkpointer(
    workdir,
    max_to_keep=config.ckpt.max_to_keep,
    keep_best=True,
    best_metric="recon_all/ssim",
    best_mode="max",
  )
  meta = {"stage": "aqvae", "model": dict(config.model), "image_size": config.data.image_size}
  # Resume order: (1) own checkpoint, (2) init_from, (3) scratch.
  start = ckpt.latest_step()
  if start is not None:
    state, _ = ckpt.restore(checkpointing.abstract_like(state), start)
    logging.info("resumed from %s at step %d", workdir, start)
  elif config.init_from:
    state = _load_init_from(config.init_from, state, state_sharding)
    logging.info("initialised params and codebook from %s", config.init_from)
  start = int(state.step)

  writer = common.MetricWriter(workdir)
  writer.write_config(config)
  logging.info(
    "AQ-VAE: %d params, %d steps (%d per epoch), batch %d on %d devices",
    common.count_params(state.params),
    total_steps,
    steps_per_epoch,
    config.data.batch_size,
    jax.device_count(),
  )
  loader = pipeline.TrainLoader(
    train_src,
    global_batch_size=config.data.batch_size,
    mesh=mesh,
    seed=config.seed,
    start_step=start,
    single_coil=config.data.single_coil,
  )
  val_loader = pipeline.EvalLoader(
    val_src,
    global_batch_size=config.eval.batch_size,
    mesh=mesh,
    max_records=config.eval.max_records or None,
  )
  timer = common.StepTimer()
  progress = common.Progress(total_steps, initial=start, desc="aqvae")
  last = {}
  try:
    # max_steps_per_run lets a time-limited job stop cleanly and resume in the next allocation.
    stop = total_steps
    if config.max_steps_per_run:
      stop = min(total_steps, start + config.max_steps_per_run)
    for step in range(start + 1, stop + 1):
      batch = next(loader)
      state, m = train_fn(state, batch)
      m = jax.device_get(m)
      common.check_finite(m, step)
      timer.tick()
      if common.periodic(step, config.log_every) or step == total_steps:
        m = {k: float(v) for k, v in m.items()}
        m["lr"] = float(schedule(step - 1))
        m["step_time_s"] = timer.seconds_per_step()
        m["epoch"] = loader.sampler.epoch(step)
        writer.write(step, m, split="train")
        progress.update(step, loss=m["loss"], ssim=m["ssim"])
      if common.periodic(step, config.ckpt.every) or step in (stop, total_steps):
        ckpt.save(step, state, meta=meta)
      if common.periodic(step, config.eval.every) or step == total_steps:
        last = evaluate(eval_fn, state, val_loader, config.eval.protocol)
        writer.write(step, last, split="validation")
        ckpt.save_best(step, state, last["recon_all/ssim"], meta=meta)
        logging.info("step %d validation %s", step, json.dumps(last))
  except common.NonFiniteLossError:
    # The last good checkpoint stays on disk; say where it is before stopping.
    logging.error("stopping: non-finite loss; last good checkpoint at step %s", ckpt.latest_step())
    raise
  finally:
    loader.close()
    progress.close()
    ckpt.close()
    writer.close()
  if last:
    (workdir / "final_metrics.json").write_text(json.dumps(last, indent=2))
  return last
