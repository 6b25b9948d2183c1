"""Stage 1: training the AQ-VAE tokenizer (decisions.md §3, §8).

  python -m nextaccel_jax.main --config=configs/aqvae.py:demo --workdir=runs/aqvae

Objective (paper Eq. 3): `w_ssim·(1 − SSIM) + w_lpips·LPIPS-alex + w_adv·LSGAN_G + β·commitment`
on magnitude images, with the projected discriminator (frozen BiomedCLIP tower + heads) trained
by its own AdamW in the same jitted step. Terms live in `LOSS_TERMS`: each is a pure function of
a `LossInputs` returning `(loss, metrics)`, enabled by a non-zero weight in `config.loss`.

The state is one pytree (`TrainState`: generator, codebook and discriminator heads) laid out on the
mesh by the `config.sharding` rules; batches are sharded along the batch axes. Frozen networks
(LPIPS, the BiomedCLIP tower) are a separate argument, so checkpoints hold only what training
changes. `build_step` jits `train_step` once with explicit shardings and the state donated; the
tests and benchmarks run the same step through `testing.stage_step`. The EMA codebook (`vq_ema`) is
updated inside the step from global batch statistics. Resume order, written in
`train_and_evaluate`: (1) the workdir's latest checkpoint, (2) `config.init_from` (params and
codebook of a converted VAR VQ-VAE or another stage-1 run), (3) scratch. A run that does not
resume starts its codebook from the encoder's own latents (`init_codebook`, `config.codebook_init`).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import pathlib
from collections.abc import Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from nextaccel_jax import ConfigError, checkpointing, losses, optim, sharding
from nextaccel_jax.convert import checkpoints
from nextaccel_jax.data import pipeline
from nextaccel_jax.evaluation import evaluators
from nextaccel_jax.models import aqvae, biomedclip, discriminator, layers, lpips, quantizer
from nextaccel_jax.stages import common
from nextaccel_jax.stages import data as data_stage

NUM_LEVELS = aqvae.NUM_LEVELS


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  opt_state: optax.OptState
  vq_ema: dict
  # Discriminator heads, their optimizer and spectral-norm vectors ({} when adversarial is off).
  disc_params: dict
  disc_opt_state: optax.OptState
  disc_spectral: dict


# ------------------------------------------------------------------------------------------------
# Loss terms


@dataclasses.dataclass(frozen=True)
class LossInputs:
  """What a loss term may look at: the reconstruction, its target and the frozen networks."""

  x_hat_BHW2: jax.Array
  target_BHW2: jax.Array
  mag_hat_BHW: jax.Array
  mag_BHW: jax.Array
  aux: dict
  frozen: dict
  # mag_hat -> discriminator logits with the current heads (None without a discriminator).
  disc_logits: Callable | None
  lpips_net: str
  gan_reduce: str


def _ssim_term(inp: LossInputs):
  loss = losses.ssim_loss(inp.mag_hat_BHW, inp.mag_BHW)
  return loss, {"ssim_loss": loss}


def _l1_term(inp: LossInputs):
  loss = losses.l1_magnitude(inp.x_hat_BHW2, inp.target_BHW2)
  return loss, {"l1_loss": loss}


def _commitment_term(inp: LossInputs):
  # The quantizer already multiplies by β; the config weight scales on top of that (1.0 by default).
  return inp.aux["commitment"], {"commitment": inp.aux["commitment"]}


def _lpips_term(inp: LossInputs):
  dist_B = lpips.lpips_distance(
    inp.mag_hat_BHW, inp.mag_BHW, inp.frozen["lpips"], inp.lpips_net, scaling="target"
  )
  loss = jnp.mean(dist_B)
  return loss, {"lpips_loss": loss}


def _adversarial_term(inp: LossInputs):
  if inp.disc_logits is None:
    raise ConfigError("config.loss.adversarial > 0 needs a discriminator (config.disc)")
  loss = losses.lsgan_g_loss(inp.disc_logits(inp.mag_hat_BHW), inp.gan_reduce)
  return loss, {"g_adv_loss": loss}


# name -> fn(LossInputs) -> (scalar loss, metrics). Weights come from config.loss.
LOSS_TERMS: dict[str, Callable] = {
  "ssim": _ssim_term,
  "l1": _l1_term,
  "commitment": _commitment_term,
  "lpips": _lpips_term,
  "adversarial": _adversarial_term,
}


def total_loss(inp: LossInputs, weights: dict):
  """Weighted sum of the enabled loss terms and their metrics."""
  loss = jnp.zeros((), jnp.float32)
  out = {}
  for name, weight in weights.items():
    # Weights are Python numbers, or traced when gated by the step (the adversarial warm-up).
    if isinstance(weight, int | float) and not weight:
      continue
    if name not in LOSS_TERMS:
      raise ConfigError(f"config.loss.{name}: no such loss term; known: {sorted(LOSS_TERMS)}")
    term, m = LOSS_TERMS[name](inp)
    loss = loss + weight * term.astype(jnp.float32)
    out.update(m)
  return loss, out


def loss_weights(config: ml_collections.ConfigDict) -> dict[str, float]:
  return {k: float(v) for k, v in config.loss.items()}


# ------------------------------------------------------------------------------------------------
# Model, discriminator, optimizers, state


def make_model(config: ml_collections.ConfigDict) -> aqvae.AQVAE:
  return aqvae.from_fields(config.model, "config.model")


def uses_discriminator(config: ml_collections.ConfigDict) -> bool:
  return bool(config.loss.get("adversarial", 0.0))


def make_discriminator(config: ml_collections.ConfigDict) -> discriminator.Discriminator | None:
  """The projected discriminator named by `config.disc.tower` (None when adversarial is off)."""
  if not uses_discriminator(config):
    return None
  d = config.disc
  return discriminator.Discriminator(
    **dict(d.tower),
    kernel_size=d.kernel_size,
    virtual_batch=d.virtual_batch,
    augment=d.augment,
    remat=d.remat,
    tower_dtype=jnp.dtype(d.tower_dtype),
  )


def make_disc_optimizer(config: ml_collections.ConfigDict):
  """The discriminator's AdamW; decay on every head parameter (biomedclip_lpips_spec.md §3.4)."""
  d = config.disc
  return optim.make_optimizer(
    learning_rate=d.lr,
    b1=d.b1,
    b2=d.b2,
    weight_decay=d.weight_decay,
    grad_clip=d.grad_clip,
    no_decay_mask_fn=None,
  )


def load_frozen(config: ml_collections.ConfigDict, disc, mesh) -> dict:
  """The frozen networks the loss needs, replicated: `{"lpips": ..., "tower": ...}`.

  The BiomedCLIP tower comes from `config.disc.weights` (open_clip's
  `open_clip_pytorch_model.bin`, or an `.npz` of its keys); without it a random tower of the
  configured size is drawn from the seed, so a resumed run sees the same one.
  """
  frozen = {"lpips": {}, "tower": {}}
  if config.loss.get("lpips", 0.0):
    frozen["lpips"] = lpips.load_pretrained(config.lpips.net)
  if disc is not None:
    if config.disc.weights:
      tower, report = biomedclip.from_torch_state_dict(
        checkpoints.load_state_dict(config.disc.weights), **dict(config.disc.tower)
      )
      if report["unfilled_leaves"]:
        raise ConfigError(
          f"config.disc.weights={config.disc.weights}: tower leaves missing from the file: "
          f"{report['unfilled_leaves'][:5]}"
        )
    else:
      logging.warning(
        "config.disc.weights is empty: the discriminator uses a randomly initialised tower, "
        "not BiomedCLIP (see nextaccel_jax/models/biomedclip.py for the weights)"
      )
      rng = jax.random.fold_in(jax.random.key(config.seed), 1)
      x = jnp.zeros((1, disc.image_size, disc.image_size, 3), jnp.float32)
      # Jitted: eager init runs every initializer op by op, which is slow at ViT-B size.
      tower = jax.jit(disc.make_tower().init)(rng, x)["params"]
    frozen["tower"] = tower
  return sharding.place(frozen, mesh, config, prefix="frozen/")


def create_train_state(config, model, tx, mesh, rng, disc=None, disc_tx=None, frozen=None):
  """Creates the state already in its sharding (`config.sharding` rules): `(state, sharding)`."""
  size = config.data.image_size
  tower = (frozen or {}).get("tower") or None

  def init(rng):
    rng_g, rng_d = jax.random.split(rng)
    variables = aqvae.init_variables(model, rng_g, size)
    params = variables["params"]
    d_params, d_opt, d_sn = {}, {}, {}
    if disc is not None:
      d_vars = discriminator.init_variables(disc, rng_d, tower_params=tower)
      d_params, d_sn = d_vars["params"], d_vars[discriminator.SPECTRAL]
      d_opt = disc_tx.init(d_params)
    return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      vq_ema=variables["vq_ema"],
      disc_params=d_params,
      disc_opt_state=d_opt,
      disc_spectral=d_sn,
    )

  abstract = jax.eval_shape(init, rng)
  state_sharding = sharding.state_shardings(abstract, mesh, config)
  state = jax.jit(init, out_shardings=state_sharding)(rng)
  return state, state_sharding


def _usage_metrics(aux) -> dict:
  out = {}
  for k in range(NUM_LEVELS):
    out[f"usage/scale_{k}"] = aux["usage_per_scale"][k]
    out[f"perplexity/scale_{k}"] = aux["perplexity_per_scale"][k]
  return out


def _disc_variables(state: TrainState, frozen: dict, spectral=None) -> dict:
  return {
    "params": state.disc_params,
    discriminator.TOWER: frozen["tower"],
    discriminator.SPECTRAL: state.disc_spectral if spectral is None else spectral,
  }


def train_step(
  state: TrainState,
  batch: dict,
  frozen: dict,
  *,
  model,
  tx,
  weights: dict,
  disc=None,
  disc_tx=None,
  lpips_net: str = "alex",
  gan_reduce: str = "tokens",
  adv_start_step: int = 0,
  seed: int = 0,
):
  """One optimisation step of the generator (and the discriminator, when there is one).

  Args:
    state: The train state (donated by the jitted caller).
    batch: A global batch `{levels [B,6,H,W,2], family [B]}`.
    frozen: `load_frozen`'s frozen networks.
    model, tx: The AQ-VAE and its optimizer.
    weights: Loss weights by term name (`config.loss`).
    disc, disc_tx: The discriminator and its optimizer (None: no adversarial term).
    lpips_net, gan_reduce: LPIPS backbone and LSGAN reduction (`config.lpips`, `config.disc`).
    adv_start_step: The generator's adversarial term is off before this step (D still learns).
    seed: Base of the per-step randomness, a pure function of (seed, step) so resuming is exact.
  """
  levels, family = batch["levels"], batch["family"]
  target = levels[:, -1]
  mag = losses.magnitude(target)
  # One normaliser per image, from the target, for real and fake alike (spec §3.5).
  scale_B = jax.lax.stop_gradient(jnp.max(mag, axis=(1, 2)))
  rng = jax.random.fold_in(jax.random.key(seed), state.step)
  rng_vq, rng_aug_g, rng_aug_d = jax.random.split(rng, 3)
  weights = dict(weights)
  adv_on = (state.step >= adv_start_step).astype(jnp.float32)

  disc_logits = None
  if disc is not None:

    def disc_logits(mag_hat_BHW):
      logits, _ = disc.apply(
        _disc_variables(state, frozen),
        mag_hat_BHW,
        scale_B,
        train=False,
        rngs={"augment": rng_aug_g},
      )
      return logits

  def loss_fn(params):
    (x_hat, aux), new_vars = model.apply(
      {"params": params, "vq_ema": state.vq_ema},
      levels,
      family,
      None,
      train=True,
      mutable=["vq_ema"],
      rngs={"vq": rng_vq},
    )
    inp = LossInputs(
      x_hat_BHW2=x_hat,
      target_BHW2=target,
      mag_hat_BHW=losses.magnitude(x_hat),
      mag_BHW=mag,
      aux=aux,
      frozen=frozen,
      disc_logits=disc_logits,
      lpips_net=lpips_net,
      gan_reduce=gan_reduce,
    )
    w = dict(weights)
    if w.get("adversarial"):
      w["adversarial"] = w["adversarial"] * adv_on
    loss, terms = total_loss(inp, w)
    return loss, (terms, aux, new_vars["vq_ema"], inp.mag_hat_BHW)

  (loss, (terms, aux, vq_ema, mag_hat)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
    state.params
  )
  params, opt_state, norms = common.apply_gradients(tx, state.params, state.opt_state, grads)
  out = {
    "loss": loss,
    **terms,
    "ssim": jnp.mean(losses.ssim(mag_hat, mag, scale_B)),
    **norms,
    "restarted_codes": aux["restarted_codes"],
    **_usage_metrics(aux),
  }

  d_params, d_opt, d_sn = state.disc_params, state.disc_opt_state, state.disc_spectral
  if disc is not None:
    fake = jax.lax.stop_gradient(mag_hat)

    def d_loss_fn(d_params):
      # Real and fake are separate calls (per-call batch statistics), threading u, v through.
      variables = _disc_variables(state, frozen)
      variables["params"] = d_params
      (real_BT, _), upd = disc.apply(
        variables,
        mag,
        scale_B,
        train=True,
        mutable=[discriminator.SPECTRAL],
        rngs={"augment": rng_aug_d},
      )
      variables[discriminator.SPECTRAL] = upd[discriminator.SPECTRAL]
      (fake_BT, _), upd = disc.apply(
        variables,
        fake,
        scale_B,
        train=True,
        mutable=[discriminator.SPECTRAL],
        rngs={"augment": jax.random.fold_in(rng_aug_d, 1)},
      )
      d_loss = losses.lsgan_d_loss(real_BT, fake_BT, gan_reduce)
      return d_loss, (upd[discriminator.SPECTRAL], jnp.mean(real_BT), jnp.mean(fake_BT))

    (d_loss, (d_sn, real_score, fake_score)), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(
      d_params
    )
    d_updates, d_opt = disc_tx.update(d_grads, d_opt, d_params)
    d_params = optax.apply_updates(d_params, d_updates)
    out.update(
      d_loss=d_loss,
      d_real=real_score,
      d_fake=fake_score,
      d_grad_norm=common.tree_norm(d_grads),
      adv_on=adv_on,
    )

  new_state = TrainState(
    step=state.step + 1,
    params=params,
    opt_state=opt_state,
    vq_ema=vq_ema,
    disc_params=d_params,
    disc_opt_state=d_opt,
    disc_spectral=d_sn,
  )
  return new_state, out


def eval_step(state: TrainState, batch: dict, *, model):
  """Magnitudes for evaluation: all six levels, Q32 alone, zero-filled R = 32, and the target;
  and the token ids of all six scales (`tokens` `[B, Σ pn_k²]`) for the codebook's usage."""
  levels, family = batch["levels"], batch["family"]
  b = levels.shape[0]
  variables = {"params": state.params, "vq_ema": state.vq_ema}
  all_active = jnp.ones((b, NUM_LEVELS), jnp.float32)
  r32_only = jnp.zeros((b, NUM_LEVELS), jnp.float32).at[:, 0].set(1.0)
  x_all, aux = model.apply(variables, levels, family, all_active)
  x_r32 = model.apply(variables, levels, family, r32_only, method=aqvae.AQVAE.reconstruct)
  return {
    "tokens": jnp.concatenate(aux["idx"], axis=1),
    "recon_all": losses.magnitude(x_all),
    "recon_r32": losses.magnitude(x_r32),
    "zero_filled": losses.magnitude(levels[:, 0]),
    "target": losses.magnitude(levels[:, -1]),
  }


def build_step(
  config: ml_collections.ConfigDict, mesh, frozen: dict, total_steps: int, steps_per_epoch: int = 1
) -> common.StageStep:
  """The AQ-VAE step on `mesh`: `train(state, batch, frozen) -> (state, metrics)` (the state
  donated) and `evals["eval"](state, batch)` (the magnitudes `evaluate` scores).

  Args:
    config: The stage config.
    mesh: The device mesh.
    frozen: `load_frozen`'s networks (LPIPS, the discriminator's tower), already placed.
    total_steps: Length of the learning-rate schedule.
    steps_per_epoch: Steps of one epoch: the schedule's warm-up and decay count in epochs.
  """
  model = make_model(config)
  tx, schedule = optim.optimizer_from_config(config.optim, total_steps, steps_per_epoch)
  disc = make_discriminator(config)
  disc_tx = make_disc_optimizer(config) if disc is not None else None
  state, state_sharding = create_train_state(
    config, model, tx, mesh, jax.random.key(config.seed), disc, disc_tx, frozen
  )
  data = sharding.data_sharding(mesh)
  repl = sharding.replicated(mesh)
  train = jax.jit(
    functools.partial(
      train_step,
      model=model,
      tx=tx,
      weights=loss_weights(config),
      disc=disc,
      disc_tx=disc_tx,
      lpips_net=config.lpips.net,
      gan_reduce=config.disc.reduce,
      adv_start_step=config.disc.start_step,
      seed=config.seed,
    ),
    in_shardings=(state_sharding, data, sharding.shardings_of(frozen)),
    out_shardings=(state_sharding, repl),
    donate_argnums=0,
  )
  evaluate_fn = jax.jit(
    functools.partial(eval_step, model=model),
    in_shardings=(state_sharding, data),
    out_shardings=data,
  )
  models = {"model": model, "discriminator": disc}
  evals = {"eval": evaluate_fn}
  return common.StageStep(state, state_sharding, train, (frozen,), schedule, tx, models, evals)


# ------------------------------------------------------------------------------------------------
# Evaluation


EVAL_ROWS = ("recon_all", "recon_r32", "zero_filled")


def evaluate(
  eval_fn, state, loader: pipeline.EvalLoader, protocol: str = "paper", lpips_nets=("alex",)
) -> dict:
  """Mean SSIM/PSNR (and LPIPS per net) over a fixed pass of the eval split, overall and per mask
  family, of the all-levels and Q32-only reconstructions and the zero-filled input; and how much
  of the codebook the split's tokens use (`codebook/used`: the fraction of codes any token takes,
  `codebook/perplexity`: of their histogram)."""
  scores = evaluators.ImageScores((protocol,), lpips_nets)
  vocab = state.vq_ema["quantize"]["embed"].shape[0]
  counts_V = np.zeros(vocab, np.int64)
  for batch in loader:
    out = sharding.to_host(eval_fn(state, batch))
    valid = sharding.to_host(batch["valid"])
    family = sharding.to_host(batch["family"])[valid]
    for row in EVAL_ROWS:
      scores.add(row, out[row][valid], out["target"][valid], family)
    counts_V += np.bincount(out["tokens"][valid].ravel(), minlength=vocab)
  probs_V = counts_V[counts_V > 0] / max(counts_V.sum(), 1)
  return {
    **scores.means(("ssim", "psnr")),
    "codebook/used": float(np.count_nonzero(counts_V)) / vocab,
    "codebook/perplexity": float(np.exp(-np.sum(probs_V * np.log(probs_V)))),
  }


# ------------------------------------------------------------------------------------------------
# Loop


def _load_init_from(config, state: TrainState, state_sharding) -> TrainState:
  """Params and codebook from another checkpoint (a converted VAR VQ-VAE or stage-1 run)."""
  wanted = {"params": state_sharding.params, "vq_ema": state_sharding.vq_ema}
  abstract = sharding.with_shardings({"params": state.params, "vq_ema": state.vq_ema}, wanted)
  tree = checkpointing.load_params(
    config.init_from,
    abstract,
    field="config.init_from",
    what=f"config.init_from={config.init_from}: parameter shapes differ from config.model; "
    "convert with the same model sizes",
  )
  return state.replace(params=tree["params"], vq_ema=tree["vq_ema"])


CODEBOOK_INITS = ("kmeans++", "uniform")


def init_codebook(config, state: TrainState, step: common.StageStep, train_src, mesh) -> TrainState:
  """The codebook re-seeded by k-means++ over the encoder's latents of the first
  `config.codebook_init.batches` training batches, with `embed_avg = embed` and unit cluster
  sizes, as a fresh EMA codebook has.

  The paper re-initialises the codebook when training starts and keeps dead-code restarts off.
  From VAR's uniform(±1/V) codes that fails: the few codes nearest the first latents are pulled
  onto the data by the EMA, and the rest never win an assignment again, so a from-scratch run ends
  with a few dozen live codes. Codes picked among real latents are each the nearest code of some
  latent. The latents are gathered onto every device and the picks use a key derived from
  `config.seed`, so every process computes the same codebook.
  """
  n = int(config.codebook_init.batches)
  if n < 1:
    raise ConfigError(f"config.codebook_init.batches must be >= 1, got {n}")
  model = step.models["model"]
  loader = pipeline.TrainLoader(
    train_src,
    global_batch_size=config.data.batch_size,
    mesh=mesh,
    seed=config.seed,
    single_coil=config.data.single_coil,
  )
  latents_fn = jax.jit(
    lambda params, vq, levels, family: model.apply(
      {"params": params, "vq_ema": vq}, levels, family, method=aqvae.AQVAE.codebook_latents
    ),
    out_shardings=sharding.replicated(mesh),
  )
  try:
    parts = [
      sharding.to_host(latents_fn(state.params, state.vq_ema, b["levels"], b["family"]))
      for b in itertools.islice(loader, n)
    ]
  finally:
    loader.close()
  latents = np.concatenate(parts)
  vocab = model.vocab_size
  # One device runs the sequential picks: on the replicated layout every device would repeat
  # them, and simulated CPU devices then wait on each other's threads.
  rng = jax.random.fold_in(jax.random.key(config.seed), 1)
  embed = np.asarray(jax.jit(quantizer.kmeans_plus_plus, static_argnums=1)(latents, vocab, rng))
  vq = jax.device_put(
    # Three separate buffers: the donated train state may not alias two leaves.
    {
      "quantize": {
        "embed": embed,
        "embed_avg": embed.copy(),
        "cluster_size": np.ones(vocab, np.float32),
      }
    },
    step.state_sharding.vq_ema,
  )
  logging.info(
    "codebook: k-means++ over %d latents of %d batches, %d of %d codes distinct",
    latents.shape[0],
    n,
    len(np.unique(embed, axis=0)),
    vocab,
  )
  return state.replace(vq_ema=vq)


def _wants_codebook_init(config: ml_collections.ConfigDict) -> bool:
  c = config.get("codebook_init")
  if c is None:
    return False
  if c.method not in CODEBOOK_INITS:
    raise ConfigError(
      f"config.codebook_init.method={c.method!r}; choose one of {', '.join(CODEBOOK_INITS)}"
    )
  return c.method == "kmeans++" and (not config.init_from or bool(c.after_init_from))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains and evaluates stage 1; returns the final validation metrics."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  seed_codebook = _wants_codebook_init(config)
  mesh = sharding.mesh_from_config(config)
  splits = data_stage.training_splits(config, workdir)
  steps_per_epoch, total_steps = common.schedule_length(config, len(splits[0]))
  frozen = load_frozen(config, make_discriminator(config), mesh)
  step = build_step(config, mesh, frozen, total_steps, steps_per_epoch)
  step.compile(config, mesh, "aqvae")

  ckpt = common.checkpointer(config, workdir, "recon_all/ssim")
  # Resume order: (1) own checkpoint, (2) init_from, (3) scratch.
  state, resumed = common.resume(ckpt, step.state, workdir)
  if not resumed and config.init_from:
    state = _load_init_from(config, state, step.state_sharding)
    logging.info("initialised params and codebook from %s", config.init_from)
  if not resumed and seed_codebook:
    state = init_codebook(config, state, step, splits[0], mesh)
  return common.run_stage(
    config,
    workdir,
    step=step,
    state=state,
    ckpt=ckpt,
    splits=splits,
    mesh=mesh,
    evaluate=lambda s, loader: evaluate(
      step.evals["eval"], s, loader, config.eval.protocol, tuple(config.eval.lpips_nets)
    ),
    meta={"stage": "aqvae", "model": dict(config.model), "image_size": config.data.image_size},
    best_metric="recon_all/ssim",
    desc="aqvae",
    postfix=("loss", "ssim"),
    summary=f"AQ-VAE: {layers.count_params(state.params)} params (discriminator heads "
    f"{layers.count_params(state.disc_params)})",
  )
