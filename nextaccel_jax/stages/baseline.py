"""The baselines of the paper's Tables 1–3, fastMRI's U-Net and E2E-VarNet, in the same harness.

  python -m nextaccel_jax.main --config=configs/baseline.py:unet --workdir=runs/unet
  python -m nextaccel_jax.main --config=configs/baseline.py:varnet,paper --workdir=runs/varnet \
      --config.data.data_dir=$TFDS_DATA_DIR

Same loaders, mesh, sharding rules, checkpoints (periodic + best by validation SSIM), resume and
metric files as the other stages. What each model reads (`inference.baseline_forward`):

- U-Net: the R = 32 image, level 0 of `batch["levels"]`, as `[real, imag]` channels.
- E2E-VarNet: the measured R = 32 k-space `k_c = M_32 ⊙ fft2c(S_c · x)`, formed inside the jitted
  step from the fully sampled level, the coil maps the loader keeps for this stage, and the
  R = 32 mask (`data.pipeline.r32_kspace`, whose adjoint is exactly the loader's R = 32 level);
  single-coil `M_32 ⊙ fft2c(x)` with `config.data.single_coil`.

Both are trained against the fully sampled level's magnitude (`config.loss`: L1 and/or 1 − SSIM)
with fastMRI's optimizer recipes (`optim.baseline_optimizer`). Validation scores the
reconstruction and the zero-filled input per mask family (`evaluators.ImageScores`); the best
checkpoint has the highest SSIM. Resume order: the workdir's latest checkpoint, else scratch.
"""

from __future__ import annotations

import functools
import pathlib

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from nextaccel_jax import ConfigError, inference, losses, optim, sharding
from nextaccel_jax.data import pipeline
from nextaccel_jax.evaluation import evaluators
from nextaccel_jax.models import layers
from nextaccel_jax.stages import common
from nextaccel_jax.stages import data as data_stage

LOSS_TERMS = ("l1", "ssim")
BEST_METRIC = "recon/ssim"


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  opt_state: optax.OptState


# ------------------------------------------------------------------------------------------------
# Model, loss, optimizer, state


def make_model(config: ml_collections.ConfigDict):
  """The baseline `config.model_name` with the fields of `config.model` (E2E-VarNet's
  single-coil variant with `config.data.single_coil`)."""
  return inference.make_baseline(
    config.model_name, config.model, "config.model", single_coil=config.data.single_coil
  )


def uses_maps(config: ml_collections.ConfigDict, model) -> bool:
  """Whether the step needs the coil maps: a k-space model on multicoil data."""
  return inference.reads_kspace(model) and not config.data.single_coil


def loss_weights(config: ml_collections.ConfigDict) -> dict[str, float]:
  """`config.loss` as floats, checked: known terms, at least one positive weight."""
  weights = {k: float(v) for k, v in config.loss.items()}
  unknown = sorted(set(weights) - set(LOSS_TERMS))
  if unknown:
    raise ConfigError(
      f"config.loss.{unknown[0]}: no such loss term; known: {', '.join(LOSS_TERMS)}"
    )
  if not any(w > 0 for w in weights.values()):
    raise ConfigError("config.loss: every weight is 0; set config.loss.l1 or config.loss.ssim > 0")
  return weights


def total_loss(y_BHWO: jax.Array, target_BHW2: jax.Array, weights: dict) -> tuple:
  """Weighted sum of the enabled terms against the fully sampled image, and the terms.

  The magnitude of the output is `|y|` (`inference.baseline_image`), so the SSIM term sees what
  validation and the report score. L1 compares `[real, imag]` when the model outputs the complex
  image (its phase is then trained too), else the magnitude channel with the target's magnitude,
  as fastMRI's U-Net does.
  """
  target_mag = losses.magnitude(target_BHW2)
  if y_BHWO.shape[-1] == 2:
    mag = losses.magnitude(y_BHWO)
  else:
    mag = jnp.abs(y_BHWO[..., 0])
  loss, out = jnp.zeros((), jnp.float32), {}
  if weights.get("l1"):
    if y_BHWO.shape[-1] == 2:
      l1 = jnp.mean(jnp.abs(y_BHWO - target_BHW2.astype(jnp.float32)))
    else:
      l1 = jnp.mean(jnp.abs(y_BHWO[..., 0] - target_mag))
    loss += weights["l1"] * l1
    out["l1_loss"] = l1
  if weights.get("ssim"):
    s = losses.ssim_loss(mag, target_mag)
    loss += weights["ssim"] * s
    out["ssim_loss"] = s
  return loss, out


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int):
  """fastMRI's recipe of `config.optim` (RMSprop or Adam, step decay)."""
  return optim.baseline_optimizer(config.optim, total_steps)


def create_train_state(config, model, tx, mesh, rng, num_coils: int = 1):
  """The state, created already laid out by the `config.sharding` rules."""

  def init(rng):
    params = inference.init_baseline(model, rng, config.data.image_size, num_coils)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  abstract = jax.eval_shape(init, rng)
  state_sharding = sharding.state_shardings(abstract, mesh, config)
  return jax.jit(init, out_shardings=state_sharding)(rng), state_sharding


# ------------------------------------------------------------------------------------------------
# Steps


def forward(model, params, batch: dict, *, single_coil: bool, train: bool = False, rng=None):
  """The model's output `y_BHWO` on a batch with levels (and maps for multicoil k-space)."""
  x_r32 = batch["levels"][:, 0]
  kspace = mask = None
  if inference.reads_kspace(model):
    kspace, mask = pipeline.r32_kspace(batch, single_coil)
  rngs = {"dropout": rng} if rng is not None else None
  return inference.baseline_forward(
    model, {"params": params}, x_r32, kspace, mask, train=train, rngs=rngs
  )


def train_step(state: TrainState, batch: dict, *, model, tx, weights, single_coil, seed=0):
  """One step on a global batch `{levels [B,6,H,W,2], mask_levels [B,H,W] (, maps)}`."""
  rng = jax.random.fold_in(jax.random.key(seed), state.step)
  target = batch["levels"][:, -1]

  def loss_fn(params):
    y = forward(model, params, batch, single_coil=single_coil, train=True, rng=rng)
    return total_loss(y, target, weights)

  (loss, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  params, opt_state, norms = common.apply_gradients(tx, state.params, state.opt_state, grads)
  out = {
    "loss": loss,
    **m,
    **norms,
  }
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), out


def eval_step(state: TrainState, batch: dict, *, model, single_coil):
  """Magnitudes of the reconstruction, the zero-filled input and the target."""
  y = forward(model, state.params, batch, single_coil=single_coil)
  x_r32 = batch["levels"][:, 0]
  return {
    "recon": losses.magnitude(inference.baseline_image(y, x_r32)),
    "zero_filled": losses.magnitude(x_r32),
    "target": losses.magnitude(batch["levels"][:, -1]),
  }


def build_step(
  config: ml_collections.ConfigDict, mesh, total_steps: int, num_coils: int = 0
) -> common.StageStep:
  """The baseline's step on `mesh`: `train(state, batch)` (the state donated) and
  `evals["eval"]`.

  Args:
    config: The stage config.
    mesh: The device mesh.
    total_steps: Length of the learning-rate schedule.
    num_coils: Coils of the batches' maps (0 when the step reads none).
  """
  model = make_model(config)
  weights = loss_weights(config)
  tx, schedule = make_optimizer(config, total_steps)
  state, state_sharding = create_train_state(
    config, model, tx, mesh, jax.random.key(config.seed), max(num_coils, 1)
  )
  single = bool(config.data.single_coil)
  train = jax.jit(
    functools.partial(
      train_step, model=model, tx=tx, weights=weights, single_coil=single, seed=config.seed
    ),
    in_shardings=(state_sharding, sharding.data_sharding(mesh)),
    out_shardings=(state_sharding, sharding.replicated(mesh)),
    donate_argnums=0,
  )
  evals = {
    "eval": jax.jit(
      functools.partial(eval_step, model=model, single_coil=single),
      in_shardings=(state_sharding, sharding.data_sharding(mesh)),
      out_shardings=sharding.data_sharding(mesh),
    )
  }
  return common.StageStep(state, state_sharding, train, (), schedule, tx, {"model": model}, evals)


# ------------------------------------------------------------------------------------------------
# Evaluation


def evaluate(eval_fn, state, loader: pipeline.EvalLoader, *, protocol="paper", lpips=("alex",)):
  """PSNR/SSIM (and LPIPS) of the reconstruction and the zero-filled input, overall and per
  mask family: `recon/ssim`, `recon/<family>/psnr`, `zero_filled/...`."""
  images = evaluators.ImageScores((protocol,), lpips)
  for batch in loader:
    valid = sharding.to_host(batch["valid"])
    out = sharding.to_host(eval_fn(state, batch))
    family = sharding.to_host(batch["family"])[valid]
    for row in ("recon", "zero_filled"):
      images.add(row, out[row][valid], out["target"][valid], family)
  return images.means(("psnr", "ssim"))


# ------------------------------------------------------------------------------------------------
# Loop


def num_coils_of(source) -> int:
  """Coils of the maps a split stores."""
  return int(source[0]["maps"].shape[0])


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains and validates the baseline; returns the final validation metrics."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  mesh = sharding.mesh_from_config(config)
  splits = data_stage.training_splits(config, workdir)
  _, total_steps = common.schedule_length(config, len(splits[0]))
  with_maps = uses_maps(config, make_model(config))
  num_coils = num_coils_of(splits[0]) if with_maps else 0
  step = build_step(config, mesh, total_steps, num_coils)
  step.compile(config, mesh, config.model_name, num_coils)

  ckpt = common.checkpointer(config, workdir, BEST_METRIC)
  state, _ = common.resume(ckpt, step.state, workdir)
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
      s,
      loader,
      protocol=config.eval.protocol,
      lpips=tuple(config.eval.lpips_nets),
    ),
    meta={
      "stage": "baseline",
      "model_name": config.model_name,
      "model": dict(config.model),
      "image_size": config.data.image_size,
      "single_coil": bool(config.data.single_coil),
    },
    best_metric=BEST_METRIC,
    desc=config.model_name,
    postfix=("loss",),
    summary=f"{config.model_name}: {layers.count_params(state.params)} params",
    with_maps=with_maps,
  )
