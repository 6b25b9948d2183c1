"""Optimizer policy of every stage: learning-rate schedules, AdamW with no-decay groups, freezing.

- `make_schedule`: linear warm-up (its first step already trains), then cosine, linear or
  constant, then the end rate, built from optax's schedules.
- `make_optimizer`: global-norm clipping, then AdamW; `no_decay_mask` says which parameters get
  weight decay (by regex on their path).
- `optimizer_from_config`: both from a config's `optim` section.
- `trainable_mask` / `mask_frozen`: which transformer parameters the optimizer may update (the
  context encoder copied from stage 1 can be frozen; its unused output head always is).
- `step_schedule` / `baseline_optimizer`: the U-Net and E2E-VarNet recipes of fastMRI (RMSprop
  or Adam as PyTorch defines them, step decay).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import jax
import optax

from nextaccel_jax import ConfigError

SCHEDULES = ("cosine", "linear", "constant")

# Parameters that are not weight matrices: biases, norm scales, embedding tables, positional
# embeddings (`pos_start`, `pos_1LC`) and VAR's per-head attention temperature (`scale_mul_1H11`).
# Decaying them towards zero only fights their initialisation (VAR excludes the same set).
NO_DECAY_PATTERNS = (
  r".*bias$",
  r".*scale$",
  r".*embedding$",
  r"(.*/)?pos_[^/]*$",
  r"(.*/)?scale_mul[^/]*$",
)

# The transformer's context is read from intermediate encoder features; the encoder's output head
# never runs, so it is never trained (weight decay would otherwise drift it).
_UNUSED_ENCODER_PARTS = ("norm_out", "conv_out")
CONTEXT_ENCODER = "context_encoder"


def make_schedule(
  *,
  base_lr: float,
  total_steps: int,
  warmup_steps: int,
  schedule: str = "cosine",
  end_lr: float = 0.0,
  decay_steps: int = 0,
) -> optax.Schedule:
  """Learning rate per optimiser step: linear warm-up, then decay to `end_lr`, then `end_lr`.

  The warm-up's first step already trains: step s < warmup_steps gets
  `base_lr · (s + 1) / warmup_steps`, so the peak is reached on the last warm-up step (a ramp
  from 0 would spend the first update at lr = 0).

  Args:
    base_lr: Peak learning rate.
    total_steps: Length of the run.
    warmup_steps: Length of the linear warm-up (0 for none).
    schedule: `"cosine"` or `"linear"` decay from `base_lr` to `end_lr`, or `"constant"` at
      `base_lr` after the warm-up.
    end_lr: Final learning rate of the decaying schedules.
    decay_steps: Length of the decay after the warm-up; the rate then stays at `end_lr` (the
      AQ-VAE's 10 warm-up + 10 cosine epochs of a 100-epoch run). 0: the decay ends at
      `total_steps`.

  Returns:
    An optax schedule of the step count (the number of updates already applied).

  Raises:
    ValueError: For an unknown schedule or inconsistent step counts.
  """
  if schedule not in SCHEDULES:
    raise ConfigError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
  if total_steps <= 0 or not 0 <= warmup_steps <= total_steps or decay_steps < 0:
    raise ConfigError(
      f"need 0 <= warmup_steps <= total_steps, total_steps > 0 and decay_steps >= 0, got "
      f"warmup_steps={warmup_steps}, total_steps={total_steps}, decay_steps={decay_steps}"
    )
  # A decay of zero length would be a division by zero in optax; one step keeps it defined.
  decay_steps = max(decay_steps or total_steps - warmup_steps, 1)
  if schedule == "cosine":
    after = optax.cosine_decay_schedule(base_lr, decay_steps, alpha=end_lr / base_lr)
  elif schedule == "linear":
    after = optax.linear_schedule(base_lr, end_lr, decay_steps)
  else:
    after = optax.constant_schedule(base_lr)
  if not warmup_steps:
    return after
  warmup = optax.linear_schedule(base_lr / warmup_steps, base_lr, max(warmup_steps - 1, 1))
  return optax.join_schedules([warmup, after], [warmup_steps])


def epochs_to_steps(epochs: float, steps_per_epoch: int, total_steps: int) -> int:
  """Whole steps of `epochs` epochs (at least 1 for a positive count), at most `total_steps`."""
  if epochs < 0:
    raise ConfigError(f"an epoch count must be >= 0, got {epochs}")
  steps = round(epochs * steps_per_epoch)
  return min(max(steps, 1 if epochs > 0 else 0), total_steps)


def param_path(path) -> str:
  """A pytree key path as `"block_0/attn/kernel"`."""
  return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def no_decay_mask(params, no_decay_patterns: Sequence[str] = NO_DECAY_PATTERNS):
  """Which parameters receive weight decay.

  Args:
    params: Parameter pytree.
    no_decay_patterns: Regexes matched in full against each `/`-joined parameter path; a match
      exempts the parameter from decay.

  Returns:
    A tree like `params` of Python bools, True where weight decay applies.
  """
  compiled = [re.compile(p) for p in no_decay_patterns]

  def decays(path, _):
    name = param_path(path)
    return not any(p.fullmatch(name) for p in compiled)

  return jax.tree.map_with_path(decays, params)


def make_optimizer(
  *,
  learning_rate,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-8,
  weight_decay: float = 0.0,
  grad_clip: float | None = None,
  no_decay_mask_fn: Callable | None = None,
) -> optax.GradientTransformation:
  """Global-norm gradient clipping followed by AdamW.

  Args:
    learning_rate: A float or a schedule such as `make_schedule` returns.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's denominator offset.
    weight_decay: Decoupled weight decay coefficient.
    grad_clip: Maximum global gradient norm; None or <= 0 disables clipping.
    no_decay_mask_fn: Maps the params to a tree of bools, True where weight decay applies
      (e.g. `no_decay_mask`); None decays every parameter.

  Returns:
    The optax transformation; its state is `(clip_state, adamw_state)` with clipping, else
    `(adamw_state,)`.
  """
  parts = []
  if grad_clip is not None and grad_clip > 0:
    parts.append(optax.clip_by_global_norm(grad_clip))
  parts.append(
    optax.adamw(
      learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=no_decay_mask_fn
    )
  )
  return optax.chain(*parts)


def optimizer_from_config(optim, total_steps: int, steps_per_epoch: int = 0):
  """`(tx, schedule)` from a config's `optim` section (lr, end_lr, schedule, b1, b2,
  weight_decay, grad_clip and the warm-up), with weight decay only where `no_decay_mask` allows.

  The warm-up is `optim.warmup_steps`, or `optim.warmup_epochs` (with `optim.decay_epochs`, 0 =
  to the end) where the section counts in epochs, as the AQ-VAE's does; those need
  `steps_per_epoch`.
  """
  warmup, decay = optim.get("warmup_steps", 0), 0
  if "warmup_epochs" in optim:
    if steps_per_epoch < 1:
      raise ConfigError("optim.warmup_epochs needs the number of steps per epoch")
    warmup = epochs_to_steps(optim.warmup_epochs, steps_per_epoch, total_steps)
    decay = epochs_to_steps(optim.get("decay_epochs", 0), steps_per_epoch, total_steps - warmup)
  schedule = make_schedule(
    base_lr=optim.lr,
    total_steps=total_steps,
    warmup_steps=warmup,
    schedule=optim.schedule,
    end_lr=optim.end_lr,
    decay_steps=decay,
  )
  tx = make_optimizer(
    learning_rate=schedule,
    b1=optim.b1,
    b2=optim.b2,
    weight_decay=optim.weight_decay,
    grad_clip=optim.grad_clip,
    no_decay_mask_fn=no_decay_mask,
  )
  return tx, schedule


def trainable_mask(params, trainable_context_encoder: bool = True):
  """Tree of bools like the transformer's (unwrapped) params, True where the optimizer may
  update.

  The context encoder is trainable unless `trainable_context_encoder` is False; its unused
  output head (`norm_out`, `conv_out`) is always frozen.
  """

  def trainable(path, _):
    names = [getattr(p, "key", getattr(p, "name", str(p))) for p in path]
    if CONTEXT_ENCODER not in names:
      return True
    if not trainable_context_encoder:
      return False
    rest = names[names.index(CONTEXT_ENCODER) + 1 :]
    return not (rest and rest[0] in _UNUSED_ENCODER_PARTS)

  return jax.tree.map_with_path(trainable, params)


def mask_frozen(
  tx: optax.GradientTransformation, trainable_context_encoder: bool = True
) -> optax.GradientTransformation:
  """Wraps `tx` so frozen parameters (see `trainable_mask`) get zero updates and no state.

  Clipping inside `tx` then measures only the trainable gradients.
  """

  def labels(params):
    return jax.tree.map(
      lambda t: "train" if t else "freeze", trainable_mask(params, trainable_context_encoder)
    )

  return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)


def transformer_optimizer(optim, total_steps: int, trainable_context_encoder: bool = True):
  """`optimizer_from_config` with the frozen parts of the transformer masked out."""
  tx, schedule = optimizer_from_config(optim, total_steps)
  return mask_frozen(tx, trainable_context_encoder), schedule


# ------------------------------------------------------------------------------------------------
# The baselines' recipes (fastMRI's U-Net and E2E-VarNet modules)

BASELINE_OPTIMIZERS = ("rmsprop", "adam")


def step_schedule(
  *, base_lr: float, total_steps: int, decay_at: Sequence[float] = (0.8,), factor: float = 0.1
) -> optax.Schedule:
  """PyTorch's `StepLR`/`MultiStepLR` counted in optimizer steps: `base_lr`, multiplied by
  `factor` once `round(f · total_steps)` updates have been applied, for each `f` in `decay_at`.

  fastMRI decays ×0.1 after 40 of its 50 epochs, i.e. `decay_at=(0.8,)`.

  Raises:
    ValueError: For a non-positive length or a decay point outside (0, 1].
  """
  if total_steps <= 0:
    raise ConfigError(f"total_steps must be positive, got {total_steps}")
  bad = [f for f in decay_at if not 0.0 < f <= 1.0]
  if bad:
    raise ConfigError(f"decay_at must lie in (0, 1] (fractions of the run), got {bad}")
  boundaries: dict[int, float] = {}
  for f in decay_at:
    b = max(int(round(f * total_steps)), 1)
    boundaries[b] = boundaries.get(b, 1.0) * factor
  return optax.piecewise_constant_schedule(base_lr, boundaries)


def baseline_optimizer(optim, total_steps: int):
  """`(tx, schedule)` of a baseline's `optim` section (name, lr, decay_at, decay_factor,
  weight_decay, grad_clip): RMSprop or Adam with PyTorch's definitions and defaults, and the
  step schedule.

  PyTorch's RMSprop keeps `alpha = 0.99` and adds `eps` outside the square root; its
  `weight_decay` is an L2 term added to the gradient before the update (not AdamW's decoupled
  decay), which `add_decayed_weights` ahead of the optimizer reproduces.
  """
  if optim.name not in BASELINE_OPTIMIZERS:
    raise ConfigError(
      f"config.optim.name must be one of {', '.join(BASELINE_OPTIMIZERS)}, got {optim.name!r}"
    )
  try:
    schedule = step_schedule(
      base_lr=optim.lr,
      total_steps=total_steps,
      decay_at=tuple(optim.decay_at),
      factor=optim.decay_factor,
    )
  except ValueError as e:
    raise ConfigError(f"config.optim (decay_at={tuple(optim.decay_at)}): {e}") from e
  parts = []
  if optim.grad_clip and optim.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(optim.grad_clip))
  if optim.weight_decay:
    parts.append(optax.add_decayed_weights(optim.weight_decay))
  if optim.name == "rmsprop":
    parts.append(optax.rmsprop(schedule, decay=0.99, eps=1e-8, eps_in_sqrt=False))
  else:
    parts.append(optax.adam(schedule, b1=0.9, b2=0.999, eps=1e-8))
  return optax.chain(*parts), schedule
