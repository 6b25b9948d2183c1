"""Stage 3: on-policy privileged distillation of the student by the frozen teacher.

Design: decisions.md §5.

  python -m nextaccel_jax.main --config=configs/distill.py:demo --workdir=runs/distill \
      --config.init_from=runs/student --config.teacher_from=runs/teacher

Each step rolls the student out from the R = 32 tokens by multinomial sampling with its current
weights (the cached sampler, no gradient), then runs one teacher-forced pass of the student (R = 32
context, with gradient) and of the teacher (fully sampled context, frozen) over that rollout. The
loss is the mean over the five predicted scales of the token-mean reverse KL
`KL(p_student ‖ p_teacher)`, exact over the vocabulary; `config.distill.direction = "forward"` is
the ablation. Because the student is scored on its own samples, it learns to recover from the
prefixes it actually produces at test time, which teacher forcing on clean prefixes never shows it.

The state and checkpoints have the stage-2 layout (`stages.transformer.TrainState`), so an
exported or evaluated distilled student loads exactly like a stage-2 student. Validation reports
the KL and the teacher agreement on argmax rollouts, the stage-2 teacher-forced metrics and the
reconstruction metrics per mask family; the best checkpoint has the lowest validation KL.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from nextaccel_jax import checkpointing, inference, losses, sharding
from nextaccel_jax.data import pipeline, prepare
from nextaccel_jax.models import aqvae
from nextaccel_jax.models import transformer as transformer_lib
from nextaccel_jax.stages import common
from nextaccel_jax.stages import transformer as transformer_stage

TrainState = transformer_stage.TrainState


# ------------------------------------------------------------------------------------------------
# Models and the frozen parts


def make_models(config: ml_collections.ConfigDict):
  """`(student, teacher)`; the teacher reads clean rollouts, so its prefix noise is off."""
  student = transformer_stage.model_from_fields(config.model, config.tokenizer)
  teacher = transformer_stage.model_from_fields(config.teacher, config.tokenizer)
  teacher = teacher.clone(prefix_noise_max=0.0)
  if student.role != "student" or teacher.role != "teacher":
    raise ValueError(
      f"config.model.role must be 'student' and config.teacher.role 'teacher', got "
      f"{student.role!r} and {teacher.role!r}"
    )
  # Both read the same inputs built from the rollout.
  for name in ("patch_nums", "input_mode", "vocab_size", "z_channels"):
    if getattr(student, name) != getattr(teacher, name):
      raise ValueError(
        f"student and teacher disagree on {name}: {getattr(student, name)} vs "
        f"{getattr(teacher, name)} (config.model vs config.teacher)"
      )
  return student, teacher


def _read_json(path: pathlib.Path) -> dict:
  try:
    return json.loads(path.read_text())
  except FileNotFoundError:
    return {}
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from e


def _workdir(value: str, field: str, hint: str) -> str:
  if not value:
    raise ValueError(f"config.{field} is empty: {hint}")
  path = os.path.expanduser(value)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"config.{field}={value}: no such directory ({hint})")
  return path


def tokenizer_source(config: ml_collections.ConfigDict) -> str:
  """`config.tokenizer_from`, else the stage-1 workdir the stage-2 student was trained with."""
  if config.tokenizer_from:
    return config.tokenizer_from
  student_dir = _workdir(config.init_from, "init_from", "the stage-2 student workdir")
  recorded = _read_json(pathlib.Path(student_dir) / "config.json").get("tokenizer_from", "")
  if not recorded:
    raise ValueError(
      f"config.tokenizer_from is empty and {student_dir}/config.json names no tokenizer_from; "
      "set --config.tokenizer_from to the stage-1 workdir"
    )
  return recorded


def _with(config: ml_collections.ConfigDict, **fields) -> ml_collections.ConfigDict:
  """A copy of the (possibly locked) config with some top-level values replaced."""
  out = ml_collections.ConfigDict(config.to_dict())
  for k, v in fields.items():
    out[k] = v
  return out


def load_transformer_params(
  path: str, field: str, model, image_size: int, mesh, config=None
) -> dict:
  """Params of a stage-2/3 workdir (best checkpoint, else latest), laid out on the mesh by the
  `config.sharding` rules for frozen trees (defaults when None)."""
  abstract = jax.eval_shape(
    lambda: transformer_lib.init_params(model, jax.random.key(0), image_size)["params"]
  )
  abstract = sharding.with_shardings(
    abstract, sharding.state_shardings(abstract, mesh, config, prefix="frozen/")
  )
  try:
    return checkpointing.load_best_or_latest(path, {"params": abstract})["params"]
  except FileNotFoundError as e:
    raise FileNotFoundError(f"config.{field}={path}: no stage-2 checkpoint there ({e})") from e
  except (ValueError, KeyError) as e:
    raise ValueError(
      f"config.{field}={path}: its checkpoint does not match the configured model (config.model / "
      f"config.teacher must equal the stage-2 run's config.model): {e}"
    ) from e


def create_train_state(config, model, tx, mesh, student_params):
  """The state (laid out by `config.sharding`) starting from the stage-2 student's params, with a
  fresh optimiser."""

  def init(params):
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  abstract = jax.eval_shape(init, student_params)
  state_sharding = sharding.state_shardings(abstract, mesh, config)
  return jax.jit(init, out_shardings=state_sharding)(student_params), state_sharding


def rollout_sampling(config: ml_collections.ConfigDict) -> inference.SamplingConfig:
  r = config.distill.rollout
  return inference.SamplingConfig(
    greedy=r.greedy, temperature=r.temperature, top_k=r.top_k, top_p=r.top_p
  )


# ------------------------------------------------------------------------------------------------
# Steps


def r32_tokens(tokenizer, tokenizer_variables, x_r32_BHW2, family_B) -> jax.Array:
  """Q32, the given first scale: the tokenizer's tokens of the R = 32 image (label k = 0)."""
  f_B1hwZ, _ = tokenizer.apply(
    tokenizer_variables, x_r32_BHW2[:, None], family_B, method=aqvae.AQVAE.encode_levels
  )
  idx = tokenizer.apply(tokenizer_variables, f_B1hwZ[:, 0], 0, method=aqvae.AQVAE.tokenize_scale)
  return jax.lax.stop_gradient(idx)


def on_policy_batch(
  model, teacher, tokenizer, tok_vars, student_params, teacher_params, batch, *, sampling, rng=None
):
  """Rolls the student out and scores the rollout with the frozen teacher.

  Returns:
    dict with `inputs_BLZ` (teacher-forcing inputs built from the rollout), `tokens_BL` (the
    sampled ids of scales 1..5), `context_BHW2` (the student's R = 32 image) and
    `teacher_logits_BLV` (no gradient).
  """
  levels, family = batch["levels"], batch["family"].astype(jnp.int32)
  x_r32, x_fs = levels[:, 0], levels[:, -1]
  idx0 = r32_tokens(tokenizer, tok_vars, x_r32, family)
  idx_list, h_list, _ = inference.rollout(
    model, student_params, tokenizer, tok_vars, idx0, x_r32, family, sampling=sampling, rng=rng
  )
  inputs_BLZ = transformer_lib.build_inputs(h_list[:-1], model.patch_nums, model.input_mode)
  teacher_logits, _ = teacher.apply(
    {"params": teacher_params}, inputs_BLZ, x_fs, family, train=False
  )
  return {
    "inputs_BLZ": inputs_BLZ,
    "tokens_BL": jnp.concatenate(idx_list[1:], axis=1),
    "context_BHW2": x_r32,
    "teacher_logits_BLV": jax.lax.stop_gradient(teacher_logits),
  }


def _agreement(tokens_BL, student_logits_BLV, teacher_logits_BLV, layout) -> dict:
  teacher_top = jnp.argmax(teacher_logits_BLV, axis=-1)
  rollout_BL = (tokens_BL == teacher_top).astype(jnp.float32)
  argmax_BL = (jnp.argmax(student_logits_BLV, axis=-1) == teacher_top).astype(jnp.float32)
  out = {"agree": jnp.mean(rollout_BL), "argmax_agree": jnp.mean(argmax_BL)}
  for k, (b, e) in enumerate(layout, start=1):
    out[f"agree/scale_{k}"] = jnp.mean(rollout_BL[:, b:e])
  return out


def train_step(
  state,
  batch,
  tok_vars,
  teacher_params,
  *,
  model,
  teacher,
  tokenizer,
  tx,
  sampling,
  direction="reverse",
  seed=0,
):
  """One distillation step on a global batch `{levels [B,6,H,W,2], family [B]}`."""
  rng = jax.random.fold_in(jax.random.key(seed), state.step)
  rng_roll, rng_drop = jax.random.split(rng)
  rollout = on_policy_batch(
    model,
    teacher,
    tokenizer,
    tok_vars,
    state.params,
    teacher_params,
    batch,
    sampling=sampling,
    rng=rng_roll,
  )
  family = batch["family"].astype(jnp.int32)
  layout = transformer_lib.sequence_layout(model.patch_nums)

  def loss_fn(params):
    logits, _ = model.apply(
      {"params": params},
      rollout["inputs_BLZ"],
      rollout["context_BHW2"],
      family,
      train=True,
      rngs={"dropout": rng_drop},
    )
    loss, aux = losses.distillation_kl(logits, rollout["teacher_logits_BLV"], layout, direction)
    return loss, (logits, aux["kl_scales"])

  (loss, (logits, kl_scales)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  out = {
    "loss": loss,
    **{f"kl/scale_{k}": v for k, v in enumerate(kl_scales, start=1)},
    **_agreement(rollout["tokens_BL"], logits, rollout["teacher_logits_BLV"], layout),
    "grad_norm": common.tree_norm(grads),
    "param_norm": common.tree_norm(params),
    "update_norm": common.tree_norm(updates),
  }
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), out


def eval_step(state, batch, tok_vars, teacher_params, *, model, teacher, tokenizer, direction):
  """KL and teacher agreement on the student's argmax rollout (deterministic)."""
  rollout = on_policy_batch(
    model,
    teacher,
    tokenizer,
    tok_vars,
    state.params,
    teacher_params,
    batch,
    sampling=inference.ARGMAX,
  )
  logits, _ = model.apply(
    {"params": state.params},
    rollout["inputs_BLZ"],
    rollout["context_BHW2"],
    batch["family"].astype(jnp.int32),
    train=False,
  )
  layout = transformer_lib.sequence_layout(model.patch_nums)
  _, aux = losses.distillation_kl(logits, rollout["teacher_logits_BLV"], layout, direction)
  agree_BL = (rollout["tokens_BL"] == jnp.argmax(rollout["teacher_logits_BLV"], axis=-1)).astype(
    jnp.float32
  )
  return {"kl_BL": aux["kl_BL"], "agree_BL": agree_BL}


def jit_steps(
  config,
  model,
  teacher,
  tokenizer,
  tx,
  mesh,
  state_sharding,
  tok_sharding=None,
  teacher_sharding=None,
):
  """`(train, eval_kl)`: `(state, batch, tok_vars, teacher_params) -> ...`.

  `tok_sharding` and `teacher_sharding` are the layouts the frozen tokenizer and teacher were
  loaded with (None: replicated).
  """
  data = sharding.data_sharding(mesh)
  repl = sharding.replicated(mesh)
  tok_sharding = repl if tok_sharding is None else tok_sharding
  teacher_sharding = repl if teacher_sharding is None else teacher_sharding
  frozen = (tok_sharding, teacher_sharding)
  direction = config.distill.direction
  train = jax.jit(
    functools.partial(
      train_step,
      model=model,
      teacher=teacher,
      tokenizer=tokenizer,
      tx=tx,
      sampling=rollout_sampling(config),
      direction=direction,
      seed=config.seed,
    ),
    in_shardings=(state_sharding, data, *frozen),
    out_shardings=(state_sharding, repl),
    donate_argnums=0,
  )
  eval_kl = jax.jit(
    functools.partial(
      eval_step, model=model, teacher=teacher, tokenizer=tokenizer, direction=direction
    ),
    in_shardings=(state_sharding, data, *frozen),
    out_shardings=data,
  )
  return train, eval_kl


# ------------------------------------------------------------------------------------------------
# Evaluation


def evaluate_kl(
  eval_kl,
  state,
  tok_vars,
  teacher_params,
  loader: pipeline.EvalLoader,
  *,
  patch_nums=transformer_lib.PATCH_NUMS,
) -> dict:
  """Validation KL (mean over scales, as the loss) and rollout–teacher agreement per scale."""
  layout = transformer_lib.sequence_layout(patch_nums)
  kl = [[] for _ in layout]
  agree = [[] for _ in layout]
  for batch in loader:
    valid = sharding.to_host(batch["valid"])
    out = sharding.to_host(eval_kl(state, batch, tok_vars, teacher_params))
    for j, (b, e) in enumerate(layout):
      kl[j].extend(out["kl_BL"][valid, b:e].mean(axis=1))
      agree[j].extend(out["agree_BL"][valid, b:e].mean(axis=1))
  kl_k = np.array([np.mean(v) for v in kl])
  agree_k = np.array([np.mean(v) for v in agree])
  sizes = np.array([e - b for b, e in layout], np.float64)
  out = {"kl": float(kl_k.mean()), "agree": float((agree_k * sizes).sum() / sizes.sum())}
  for k in range(len(layout)):
    out[f"kl/scale_{k + 1}"] = float(kl_k[k])
    out[f"agree/scale_{k + 1}"] = float(agree_k[k])
  out["neg_kl"] = -out["kl"]
  return out


# ------------------------------------------------------------------------------------------------
# Loop


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Distils the stage-2 student with the stage-2 teacher; returns the final validation metrics."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  student_dir = _workdir(
    config.init_from, "init_from", "point it at the stage-2 student workdir (configs/student.py)"
  )
  teacher_dir = _workdir(
    config.teacher_from,
    "teacher_from",
    "point it at the stage-2 teacher workdir (configs/teacher.py)",
  )
  mesh = sharding.mesh_from_config(config)
  tok_config = _with(config, tokenizer_from=tokenizer_source(config))
  tokenizer = transformer_stage.make_tokenizer(tok_config)
  tok_vars = transformer_stage.load_tokenizer(tok_config, tokenizer, mesh)
  model, teacher = make_models(config)
  size = config.data.image_size
  teacher_params = load_transformer_params(teacher_dir, "teacher_from", teacher, size, mesh, config)
  train_src, val_src = prepare.training_splits(config, workdir)

  steps_per_epoch = max(1, len(train_src) // config.data.batch_size)
  total_steps = config.num_train_steps or config.num_epochs * steps_per_epoch
  tx, schedule = transformer_stage.make_optimizer(config, total_steps)
  ckpt = checkpointing.Checkpointer(
    workdir,
    max_to_keep=config.ckpt.max_to_keep,
    keep_best=True,
    best_metric="neg_kl",
    best_mode="max",
  )
  start = ckpt.latest_step()
  if start is None:
    try:
      params = load_transformer_params(student_dir, "init_from", model, size, mesh, config)
    except (FileNotFoundError, ValueError):
      ckpt.close()
      raise
  else:
    # Only the shapes matter: the workdir's own checkpoint replaces them below.
    params = jax.eval_shape(
      lambda: transformer_lib.init_params(model, jax.random.key(0), size)["params"]
    )
    params = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), params)
  state, state_sharding = create_train_state(config, model, tx, mesh, params)
  if start is not None:
    state, _ = ckpt.restore(checkpointing.abstract_like(state), start)
    logging.info("resumed from %s at step %d", workdir, start)
  tok_sharding = sharding.shardings_of(tok_vars)
  train_fn, eval_kl = jit_steps(
    config,
    model,
    teacher,
    tokenizer,
    tx,
    mesh,
    state_sharding,
    tok_sharding,
    sharding.shardings_of(teacher_params),
  )
  _, tf_eval_fn, recon_fn = transformer_stage.jit_steps(
    config, model, tokenizer, tx, mesh, state_sharding, tok_sharding
  )
  batch_spec = pipeline.train_batch_spec(config.data.batch_size, size, mesh)
  train_fn = common.compile_train_step(
    train_fn,
    (state, batch_spec, tok_vars, teacher_params),
    name="distill",
    memory=config.get("memory"),
  )
  meta = {
    "stage": "distill",
    "role": "student",
    "model": dict(config.model),
    "tokenizer": dict(config.tokenizer),
    "tokenizer_from": os.path.abspath(tok_config.tokenizer_from),
    "init_from": os.path.abspath(student_dir),
    "teacher_from": os.path.abspath(teacher_dir),
    "image_size": size,
  }

  writer = common.MetricWriter(workdir)
  writer.write_config(tok_config)
  logging.info(
    "distill: %d student params, %d steps (%d per epoch), batch %d on %d devices, %s KL",
    common.count_params(state.params),
    total_steps,
    steps_per_epoch,
    config.data.batch_size,
    jax.device_count(),
    config.distill.direction,
  )
  loader, val_loader = prepare.loaders(config, train_src, val_src, mesh, int(state.step))

  def evaluate(s):
    out = evaluate_kl(eval_kl, s, tok_vars, teacher_params, val_loader, patch_nums=model.patch_nums)
    tf = transformer_stage.evaluate(
      tf_eval_fn,
      recon_fn,
      s,
      tok_vars,
      val_loader,
      patch_nums=model.patch_nums,
      recon_batches=config.eval.recon_batches,
      protocol=config.eval.protocol,
    )
    # Teacher-forced (ground-truth prefix) numbers keep the stage-2 names under "tf/".
    out.update({f"tf/{k}": v for k, v in tf.items() if k.startswith(("ce", "acc"))})
    out.update({k: v for k, v in tf.items() if k.startswith(("recon/", "zero_filled/"))})
    return out

  return common.run_stage_loop(
    config,
    workdir,
    loader=loader,
    ckpt=ckpt,
    writer=writer,
    state=state,
    train_fn=lambda s, b: train_fn(s, b, tok_vars, teacher_params),
    evaluate_fn=evaluate,
    total_steps=total_steps,
    schedule=schedule,
    meta=meta,
    best_metric="neg_kl",
    desc="distill",
    postfix=("loss", "agree"),
  )


__all__ = [
  "TrainState",
  "create_train_state",
  "eval_step",
  "evaluate_kl",
  "jit_steps",
  "make_models",
  "on_policy_batch",
  "r32_tokens",
  "train_and_evaluate",
  "train_step",
]
