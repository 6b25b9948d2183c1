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

The state and checkpoints have the stage-2 layout (`stage2_transformer.TrainState`), so an
exported or evaluated distilled student loads exactly like a stage-2 student. Validation reports
the KL and the teacher agreement on argmax rollouts, the stage-2 teacher-forced metrics and the
reconstruction metrics per mask family; the best checkpoint has the lowest validation KL.
"""

from __future__ import annotations

import functools
import os
import pathlib

import jax
import jax.numpy as jnp
import ml_collections

from nextaccel_jax import ConfigError, MissingInputError, checkpointing, inference, losses, sharding
from nextaccel_jax.data import pipeline
from nextaccel_jax.evaluation import evaluators
from nextaccel_jax.models import layers, next_scale
from nextaccel_jax.models import transformer as transformer_lib
from nextaccel_jax.stages import common
from nextaccel_jax.stages import data as data_stage
from nextaccel_jax.stages import stage2_transformer as stage2

TrainState = stage2.TrainState


# ------------------------------------------------------------------------------------------------
# Models and the frozen parts


def make_models(config: ml_collections.ConfigDict):
  """`(student, teacher)`; the teacher reads clean rollouts, so its prefix noise is off."""
  student = transformer_lib.from_fields(config.model, config.tokenizer, "config.model")
  teacher = transformer_lib.from_fields(config.teacher, config.tokenizer, "config.teacher")
  teacher = teacher.clone(prefix_noise_max=0.0)
  if student.role != "student" or teacher.role != "teacher":
    raise ConfigError(
      f"config.model.role must be 'student' and config.teacher.role 'teacher', got "
      f"{student.role!r} and {teacher.role!r}"
    )
  # Both read the same inputs built from the rollout.
  for name in ("patch_nums", "input_mode", "vocab_size", "z_channels"):
    if getattr(student, name) != getattr(teacher, name):
      raise ConfigError(
        f"student and teacher disagree on {name}: {getattr(student, name)} vs "
        f"{getattr(teacher, name)} (config.model vs config.teacher)"
      )
  return student, teacher


def tokenizer_source(config: ml_collections.ConfigDict) -> str:
  """`config.tokenizer_from`, else the stage-1 workdir the stage-2 student was trained with."""
  if config.tokenizer_from:
    return config.tokenizer_from
  student_dir = checkpointing.existing_dir(
    config.init_from, "config.init_from", "the stage-2 student workdir"
  )
  return checkpointing.resolve_tokenizer_from(
    None,
    checkpointing.read_run_config(student_dir, required=False),
    where=f"config.tokenizer_from is empty and {student_dir}/config.json",
    flag="config.tokenizer_from",
    how="--config.tokenizer_from",
  )


def _with(config: ml_collections.ConfigDict, **fields) -> ml_collections.ConfigDict:
  """A copy of the (possibly locked) config with some top-level values replaced."""
  out = ml_collections.ConfigDict(config.to_dict())
  for k, v in fields.items():
    out[k] = v
  return out


def load_transformer_params(path: str, field: str, model, image_size: int, mesh, config=None):
  """Params of a stage-2/3 workdir (best checkpoint, else latest), laid out on the mesh by the
  `config.sharding` rules for frozen trees (defaults when None)."""
  abstract = jax.eval_shape(
    lambda: transformer_lib.init_params(model, jax.random.key(0), image_size)["params"]
  )
  try:
    tree = common.load_frozen_params(
      path,
      {"params": abstract},
      mesh,
      config,
      field=f"config.{field}",
      what="its checkpoint does not match the configured model (config.model / config.teacher "
      "must equal the stage-2 run's config.model)",
    )
  except FileNotFoundError as e:
    raise MissingInputError(f"config.{field}={path}: no stage-2 checkpoint there ({e})") from e
  return tree["params"]


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
  tokenizer = next_scale.tokenizer_at(tokenizer, model.patch_nums)
  idx0 = next_scale.r32_tokens(tokenizer, tok_vars, x_r32, family)
  idx_list, h_list, _ = inference.rollout(
    model, student_params, tokenizer, tok_vars, idx0, x_r32, family, sampling=sampling, rng=rng
  )
  inputs_BLZ = next_scale.build_inputs(h_list[:-1], model.patch_nums, model.input_mode)
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
  rng_roll = jax.random.fold_in(jax.random.key(seed), state.step)
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
    # Scored without drop path, like the rollout it scores: the KL is then taken under the very
    # policy that sampled the tokens (with drop path on, it would be a randomly thinned one).
    logits, _ = model.apply(
      {"params": params}, rollout["inputs_BLZ"], rollout["context_BHW2"], family, train=False
    )
    loss, aux = losses.distillation_kl(logits, rollout["teacher_logits_BLV"], layout, direction)
    return loss, (logits, aux["kl_scales"])

  (loss, (logits, kl_scales)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  params, opt_state, norms = common.apply_gradients(tx, state.params, state.opt_state, grads)
  out = {
    "loss": loss,
    **{f"kl/scale_{k}": v for k, v in enumerate(kl_scales, start=1)},
    **_agreement(rollout["tokens_BL"], logits, rollout["teacher_logits_BLV"], layout),
    **norms,
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


def build_step(
  config: ml_collections.ConfigDict,
  mesh,
  frozen: tuple,
  total_steps: int,
  student_params,
) -> common.StageStep:
  """The distillation step on `mesh`: `train(state, batch, tok_vars, teacher_params)` (the state
  donated); `evals` has `kl` (this stage's validation) and stage 2's `eval` and `recon`.

  Args:
    config: The stage config.
    mesh: The device mesh.
    frozen: `(tok_vars, teacher_params)`, already placed.
    total_steps: Length of the learning-rate schedule.
    student_params: Where the student starts (the stage-2 student's params).
  """
  tok_vars, teacher_params = frozen
  tokenizer = stage2.make_tokenizer(config)
  model, teacher = make_models(config)
  tx, schedule = stage2.make_optimizer(config, total_steps)
  state, state_sharding = create_train_state(config, model, tx, mesh, student_params)
  data = sharding.data_sharding(mesh)
  frozen_sharding = tuple(sharding.shardings_of(f) for f in frozen)
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
    in_shardings=(state_sharding, data, *frozen_sharding),
    out_shardings=(state_sharding, sharding.replicated(mesh)),
    donate_argnums=0,
  )
  eval_kl = jax.jit(
    functools.partial(
      eval_step, model=model, teacher=teacher, tokenizer=tokenizer, direction=direction
    ),
    in_shardings=(state_sharding, data, *frozen_sharding),
    out_shardings=data,
  )
  evals = {
    "kl": eval_kl,
    **stage2.jit_eval_steps(config, model, tokenizer, mesh, state_sharding, frozen_sharding[0]),
  }
  models = {"model": model, "teacher": teacher, "tokenizer": tokenizer}
  return common.StageStep(state, state_sharding, train, tuple(frozen), schedule, tx, models, evals)


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
  scales = evaluators.ScaleMeans(transformer_lib.sequence_layout(patch_nums))
  for batch in loader:
    valid = sharding.to_host(batch["valid"])
    out = sharding.to_host(eval_kl(state, batch, tok_vars, teacher_params))
    scales.add("kl", out["kl_BL"], valid)
    scales.add("agree", out["agree_BL"], valid)
  out = {**scales.result("kl", weighted=False), **scales.result("agree")}
  out["neg_kl"] = -out["kl"]
  return out


# ------------------------------------------------------------------------------------------------
# Loop


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Distils the stage-2 student with the stage-2 teacher; returns the final validation metrics."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  student_dir = checkpointing.existing_dir(
    config.init_from,
    "config.init_from",
    "point it at the stage-2 student workdir (configs/student.py)",
  )
  teacher_dir = checkpointing.existing_dir(
    config.teacher_from,
    "config.teacher_from",
    "point it at the stage-2 teacher workdir (configs/teacher.py)",
  )
  mesh = sharding.mesh_from_config(config)
  tok_config = _with(config, tokenizer_from=tokenizer_source(config))
  tok_vars = stage2.load_tokenizer(tok_config, stage2.make_tokenizer(tok_config), mesh)
  model, teacher = make_models(config)
  size = config.data.image_size
  teacher_params = load_transformer_params(teacher_dir, "teacher_from", teacher, size, mesh, config)
  splits = data_stage.training_splits(config, workdir)
  _, total_steps = common.schedule_length(config, len(splits[0]))
  ckpt = common.checkpointer(config, workdir, "neg_kl")
  if ckpt.latest_step() is None:
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
  step = build_step(config, mesh, (tok_vars, teacher_params), total_steps, params)
  state, _ = common.resume(ckpt, step.state, workdir)
  step.compile(config, mesh, "distill")

  def evaluate(s, loader):
    out = evaluate_kl(
      step.evals["kl"], s, tok_vars, teacher_params, loader, patch_nums=model.patch_nums
    )
    tf = stage2.evaluate(
      step.evals["eval"],
      step.evals["recon"],
      s,
      tok_vars,
      loader,
      patch_nums=model.patch_nums,
      recon_batches=config.eval.recon_batches,
      protocol=config.eval.protocol,
    )
    # Teacher-forced (ground-truth prefix) numbers keep the stage-2 names under "tf/".
    out.update({f"tf/{k}": v for k, v in tf.items() if k.startswith(("ce", "acc"))})
    out.update({k: v for k, v in tf.items() if k.startswith(("recon/", "zero_filled/"))})
    return out

  return common.run_stage(
    config,
    workdir,
    step=step,
    state=state,
    ckpt=ckpt,
    splits=splits,
    mesh=mesh,
    evaluate=evaluate,
    meta={
      "stage": "distill",
      "role": "student",
      "model": dict(config.model),
      "tokenizer": dict(config.tokenizer),
      "tokenizer_from": os.path.abspath(tok_config.tokenizer_from),
      "init_from": os.path.abspath(student_dir),
      "teacher_from": os.path.abspath(teacher_dir),
      "image_size": size,
    },
    best_metric="neg_kl",
    desc="distill",
    postfix=("loss", "agree"),
    summary=f"distill ({config.distill.direction} KL): {layers.count_params(state.params)} "
    "student params",
    written_config=tok_config,
  )


__all__ = [
  "TrainState",
  "build_step",
  "create_train_state",
  "eval_step",
  "evaluate_kl",
  "make_models",
  "on_policy_batch",
  "train_and_evaluate",
  "train_step",
]
