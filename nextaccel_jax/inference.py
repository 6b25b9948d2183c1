"""Autoregressive reconstruction from an R = 32 image: a cached five-step sampler (decisions.md
§4, var_spec.md §6.7).

Shape legend: B batch, H×W image grid, K = 6 tokenizer scales (k = 0 is Q32), l = pn_k² tokens of
scale k, V vocabulary, Z codebook channels, h×w = 16² latent grid, Hd heads, L = 990 sequence
positions (1280 with flat tokens), d head width.

Pipeline (one jitted function):
  1. encode the R = 32 image with the tokenizer (label: acceleration 0, its mask family) and
     tokenise it at the transformer's first grid, 11² (16² with `flat_tokens`) → Q32 (given,
     never predicted); the tokenizer works at the transformer's grids throughout
     (`next_scale.tokenizer_at`);
  2. `transformer.prepare`: the context encoder's features and every block's cross-attention
     keys/values, computed once per sample (nothing without cross-attention);
  3. for k = 1..5: the input of scale k from the running mean of the contributions so far,
     `transformer.step` (all pn_k² tokens of the scale in parallel; the new self-attention
     keys/values are written into a static-shape cache with `dynamic_update_slice`), then
     argmax or sampling (`SamplingConfig`);
  4. mean of all six scales' contributions → tokenizer decoder → complex image.

Pure functions: `sample_tokens`, `init_cache`, `rollout` (steps 2–3, reused by the distillation
stage for on-policy rollouts) and `reconstruct`. `Reconstructor` holds the models and their
variables and jits `reconstruct` once per sampling configuration:

  rec = Reconstructor(tokenizer, tokenizer_variables, transformer, transformer_params)
  x_hat_BHW2 = rec.reconstruct(x_r32_BHW2, family_B)
  x_hat_BHW2, aux = rec.reconstruct(x_r32_BHW2, family_B, return_intermediates=True)
  # Data consistency (decisions.md §6): keep the measured R = 32 samples of the input.
  x_dc_BHW2 = rec.reconstruct(x_r32_BHW2, family_B, mask_BHW=m32_BHW, maps_BCHW2=maps_BCHW2)

`data_consistency` is the step on its own. `BaselineReconstructor` does the same job for the
U-Net and E2E-VarNet baselines (`baseline_forward`: which input each reads, one forward pass).
This module only computes: reading trained models (an export, or training workdirs) is
`export.load_reconstructor`'s job.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from nextaccel_jax.data import transforms
from nextaccel_jax.models import aqvae as aqvae_lib
from nextaccel_jax.models import next_scale
from nextaccel_jax.models import transformer as transformer_lib
from nextaccel_jax.models import unet as unet_lib
from nextaccel_jax.models import varnet as varnet_lib


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How tokens are chosen from the logits of a scale.

  Attributes:
    greedy: argmax (the paper's default); the other fields are then ignored.
    temperature: logits are divided by it before sampling.
    top_k: keep only the k most likely tokens (0 = all).
    top_p: keep the smallest set of most likely tokens whose probability reaches top_p
      (0 or ≥ 1 = all); the most likely token is always kept.

  `top_k` and `top_p` may be set together (the paper's top-p 0.96 + top-k 900 decoding): the
  top-k cut comes first and top-p is measured on the renormalised distribution of the k kept
  tokens, the order of Hugging Face's logits warpers.
  """

  greedy: bool = True
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 0.0


ARGMAX = SamplingConfig()
MULTINOMIAL = SamplingConfig(greedy=False)
DC_PHASES = ("input", "model")


@dataclasses.dataclass(frozen=True)
class ConsistencyConfig:
  """How `data_consistency` enforces the measured R = 32 samples.

  Attributes:
    iterations: steps of `x ← x + x_32 − A^H M A x`; one is exact for a single coil.
    phase: "input" starts from the reconstruction's magnitude with the R = 32 image's phase (the
      stage-1 losses see magnitudes only, so the decoded phase is not trained); "model" keeps the
      decoded phase (for a tokenizer trained with a complex-valued loss).
  """

  iterations: int = 10
  phase: str = "input"


def data_consistency(
  x_hat_BHW2: jax.Array,
  x_r32_BHW2: jax.Array,
  mask_BHW: jax.Array,
  maps_BCHW2: jax.Array | None = None,
  consistency: ConsistencyConfig = ConsistencyConfig(),
) -> jax.Array:
  """The reconstruction moved onto the images whose R = 32 samples are the measured ones.

  The R = 32 input is `x_32 = A^H M A x` with the coil operator `A x = F(S_c x)` and the R = 32
  mask M (single coil: `S = 1`), so `x_32` carries every measured sample. Gradient steps of
  `‖M A x − M A x_true‖²` with step 1 only need `x_32`: `x ← x + x_32 − A^H M A x`. From the
  reconstruction they converge to the nearest consistent image (`‖A^H M A‖ ≤ 1`); with a single
  coil one step is the exact projection, the classic k-space replacement. The masks are nested,
  so the measured samples of R = 32 are valid at every level.

  Args:
    x_hat_BHW2: reconstructions `[real, imag]` (same normalisation as the input).
    x_r32_BHW2: the R = 32 input images.
    mask_BHW: the R = 32 sampling mask (bool or 0/1).
    maps_BCHW2: coil sensitivities `[B, C, H, W, 2]` of the multicoil adjoint that made `x_32`;
      None for single-coil levels.
    consistency: iterations and phase handling.

  Returns:
    `[B, H, W, 2]` float32.
  """
  if consistency.phase not in DC_PHASES:
    raise ValueError(f"phase must be one of {DC_PHASES}, got {consistency.phase!r}")
  if consistency.iterations < 1:
    raise ValueError(f"iterations must be >= 1, got {consistency.iterations}")
  x32 = transforms.channels_to_complex(jnp.asarray(x_r32_BHW2, jnp.float32))
  x = transforms.channels_to_complex(jnp.asarray(x_hat_BHW2, jnp.float32))
  if consistency.phase == "input":
    x = jnp.abs(x) * jnp.exp(1j * jnp.angle(x32))
  if maps_BCHW2 is None:
    maps = jnp.ones(x.shape[:-2] + (1,) + x.shape[-2:], jnp.complex64)
  else:
    maps = transforms.channels_to_complex(jnp.asarray(maps_BCHW2, jnp.float32))
  mask = jnp.asarray(mask_BHW).astype(jnp.complex64)

  def step(_, x):
    return x + x32 - transforms.mc_adjoint(transforms.mc_forward(x, maps, mask), maps)

  x = jax.lax.fori_loop(0, consistency.iterations, step, x.astype(jnp.complex64))
  return transforms.complex_to_channels(x)


def filter_logits(logits_BlV: jax.Array, top_k: int = 0, top_p: float = 0.0) -> jax.Array:
  """Sets the logits of tokens outside the top-k / top-p set to −inf (float32); with both, top-p
  applies to what top-k keeps."""
  logits = logits_BlV.astype(jnp.float32)
  v = logits.shape[-1]
  if 0 < top_k < v:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if 0.0 < top_p < 1.0:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep_sorted = mass_before < top_p
    keep = jnp.zeros_like(keep_sorted)
    keep = jnp.put_along_axis(keep, order, keep_sorted, axis=-1, inplace=False)
    logits = jnp.where(keep, logits, -jnp.inf)
  return logits


def sample_tokens(rng: jax.Array | None, logits_BlV: jax.Array, sampling: SamplingConfig):
  """Token ids `idx_Bl` (int32) by argmax or by sampling the filtered, tempered softmax."""
  if sampling.greedy:
    return jnp.argmax(logits_BlV, axis=-1).astype(jnp.int32)
  if rng is None:
    raise ValueError("sampling needs an rng")
  logits = filter_logits(logits_BlV, sampling.top_k, sampling.top_p) / sampling.temperature
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def init_cache(transformer: transformer_lib.NextAccelTransformer, batch: int) -> tuple:
  """Empty self-attention cache: one `(k_BHLd, v_BHLd)` pair of zeros per block, compute dtype."""
  shape = (batch, transformer.num_heads, transformer.seq_len, transformer.head_dim)
  zeros = jnp.zeros(shape, transformer.dtype)
  return tuple((zeros, zeros) for _ in range(transformer.depth))


def _as_variables(tree) -> Mapping[str, Any]:
  """Accepts `{"params": ...}` (optionally with other collections) or the bare params."""
  if isinstance(tree, Mapping) and "params" in tree:
    return tree
  return {"params": tree}


def rollout(
  transformer: transformer_lib.NextAccelTransformer,
  transformer_variables,
  tokenizer: aqvae_lib.AQVAE,
  tokenizer_variables,
  idx0_Bl: jax.Array,
  context_BHW2: jax.Array,
  family_B: jax.Array,
  *,
  sampling: SamplingConfig = ARGMAX,
  rng: jax.Array | None = None,
  forced_idx: Sequence[jax.Array] = (),
  return_logits: bool = False,
):
  """Generates scales 1..K−1 from Q32 with the KV cache (no gradient flows anywhere).

  Args:
    transformer: the model (its patch_nums and input_mode are used).
    transformer_variables: `{"params": ...}` or the bare params.
    tokenizer: the stage-1 `AQVAE` (for `lookup`, at the transformer's grids).
    tokenizer_variables: its `{"params", "vq_ema"}`.
    idx0_Bl: Q32 token ids (pn_0² per sample: 121, or 256 with flat tokens).
    context_BHW2: the context image (the R = 32 image for the student; unused without
      cross-attention).
    family_B: mask-family ids.
    sampling: argmax or sampling settings.
    rng: PRNG key (only for sampling); scale k uses `fold_in(rng, k)`.
    forced_idx: ids of scales 1..m to impose instead of the model's choice (a known prefix, e.g.
      to start from an R = 16 input); the model still runs on them, so the cache stays valid.
    return_logits: also return the logits of every step.

  Returns:
    `(idx_list, h_list, aux)`: the K token grids `idx_Bl` (Q32 first), their contributions
    `h_BhwZ`, and aux with `logits` (list of `logits_BlV`, float32) when asked.
  """
  tv = _as_variables(transformer_variables)
  tokenizer = next_scale.tokenizer_at(tokenizer, transformer.patch_nums)
  idx0_Bl = jax.lax.stop_gradient(idx0_Bl)
  context_BHW2 = jax.lax.stop_gradient(context_BHW2)
  prepared = transformer.apply(
    tv, context_BHW2, family_B, method=transformer_lib.NextAccelTransformer.prepare
  )
  prepared = jax.lax.stop_gradient(prepared)
  cache = init_cache(transformer, idx0_Bl.shape[0])
  idx_list = [idx0_Bl.astype(jnp.int32)]
  h_list = next_scale.lookup_contributions(tokenizer, tokenizer_variables, idx_list)
  logits_list = []
  for k in range(1, len(transformer.patch_nums)):
    x_BlZ = next_scale.scale_input(h_list, k, transformer.patch_nums, transformer.input_mode)
    logits_BlV, cache = transformer.apply(
      tv, x_BlZ, k, prepared, cache, method=transformer_lib.NextAccelTransformer.step
    )
    logits_BlV = jax.lax.stop_gradient(logits_BlV)
    step_rng = None if rng is None else jax.random.fold_in(rng, k)
    idx_Bl = sample_tokens(step_rng, logits_BlV, sampling)
    if k <= len(forced_idx):
      idx_Bl = jnp.asarray(forced_idx[k - 1], jnp.int32)
    idx_list.append(idx_Bl)
    h_list += next_scale.lookup_contributions(tokenizer, tokenizer_variables, [idx_Bl], k)
    if return_logits:
      logits_list.append(logits_BlV)
  aux = {"logits": logits_list} if return_logits else {}
  return idx_list, h_list, aux


def reconstruct(
  tokenizer: aqvae_lib.AQVAE,
  transformer: transformer_lib.NextAccelTransformer,
  tokenizer_variables,
  transformer_variables,
  x_r32_BHW2: jax.Array,
  family_B: jax.Array,
  rng: jax.Array | None = None,
  *,
  sampling: SamplingConfig = ARGMAX,
  return_intermediates: bool = False,
  context_BHW2: jax.Array | None = None,
):
  """R = 32 image → reconstructed complex image `[B, H, W, 2]` (same normalisation as the input).

  Args:
    tokenizer, transformer: the models (static under jit).
    tokenizer_variables: `{"params", "vq_ema"}` of the tokenizer.
    transformer_variables: `{"params": ...}` or the bare params of the transformer.
    x_r32_BHW2: the normalised R = 32 images `[real, imag]`.
    family_B: mask-family ids.
    rng: PRNG key for sampling (unused by argmax).
    sampling: token selection.
    return_intermediates: also decode the cumulative mean of scales 0..k for every k.
    context_BHW2: context image; None uses the R = 32 input (the student's setting).

  Returns:
    `x_hat_BHW2`, or `(x_hat_BHW2, aux)` with `idx` (K token grids `[B, pn, pn]`), `f_hat`
    (`[B, h, w, Z]`) and `levels_BKHW2` (image decoded from the mean of the first k + 1 scales;
    the last equals `x_hat`).
  """
  b = x_r32_BHW2.shape[0]
  family_B = family_B.astype(jnp.int32)
  tokenizer = next_scale.tokenizer_at(tokenizer, transformer.patch_nums)
  idx0_Bl = next_scale.r32_tokens(tokenizer, tokenizer_variables, x_r32_BHW2, family_B)
  context = x_r32_BHW2 if context_BHW2 is None else context_BHW2
  idx_list, h_list, _ = rollout(
    transformer,
    transformer_variables,
    tokenizer,
    tokenizer_variables,
    idx0_Bl,
    context,
    family_B,
    sampling=sampling,
    rng=rng,
  )
  num = len(h_list)
  if not return_intermediates:
    return _decode_mean(tokenizer, tokenizer_variables, h_list, jnp.ones((num,), jnp.float32))

  # Row k activates scales 0..k: the image "the first k + 1 scales" decode to.
  prefix_KK = jnp.tril(jnp.ones((num, num), jnp.float32))
  f_list = [
    tokenizer.apply(
      tokenizer_variables,
      h_list,
      jnp.broadcast_to(prefix_KK[k], (b, num)),
      method=aqvae_lib.AQVAE.combine,
    )
    for k in range(num)
  ]
  f_KBhwZ = jnp.stack(f_list)
  images = tokenizer.apply(
    tokenizer_variables, f_KBhwZ.reshape(num * b, *f_KBhwZ.shape[2:]), method=aqvae_lib.AQVAE.decode
  )
  levels_BKHW2 = images.reshape(num, b, *images.shape[1:]).swapaxes(0, 1)
  pns = transformer.patch_nums
  aux = {
    "idx": [i.reshape(b, pn, pn) for i, pn in zip(idx_list, pns, strict=True)],
    "f_hat": f_list[-1],
    "levels_BKHW2": levels_BKHW2,
  }
  return levels_BKHW2[:, -1], aux


def _decode_mean(tokenizer, tokenizer_variables, h_list, active_K) -> jax.Array:
  """Decodes the mean of the contributions whose `active_K` entry is 1."""
  b = h_list[0].shape[0]
  active_BK = jnp.broadcast_to(jnp.asarray(active_K, jnp.float32), (b, len(h_list)))
  f_hat = tokenizer.apply(tokenizer_variables, h_list, active_BK, method=aqvae_lib.AQVAE.combine)
  return tokenizer.apply(tokenizer_variables, f_hat, method=aqvae_lib.AQVAE.decode)


# What `diagnose` decodes, from the most to the least information about the target.
DIAGNOSTICS = ("tokenizer_all", "tokenizer_fs", "teacher_forced", "rollout")


def diagnose(
  tokenizer: aqvae_lib.AQVAE,
  transformer: transformer_lib.NextAccelTransformer,
  tokenizer_variables,
  transformer_variables,
  levels_BKHW2: jax.Array,
  family_B: jax.Array,
) -> dict[str, jax.Array]:
  """Where a reconstruction loses quality: the same decoder fed ever less true information.

  - `tokenizer_all`: the true tokens of all six levels (the ceiling of any transformer);
  - `tokenizer_fs`: the true tokens of the fully sampled level alone;
  - `teacher_forced`: Q32 and the argmax tokens of one forward pass over the true prefix (what
    stage 2 trains), i.e. every scale predicted from the true earlier scales;
  - `rollout`: Q32 and the argmax tokens of the free rollout (`reconstruct`'s result).

  The gap tokenizer_all → teacher_forced is the transformer's per-scale prediction error,
  teacher_forced → rollout the error that compounds when it reads its own tokens.

  Args:
    tokenizer, transformer: the models (static under jit); the transformer is a student (its
      context is the R = 32 level).
    tokenizer_variables, transformer_variables: their variables.
    levels_BKHW2: the six levels, R = 32 first and FS last.
    family_B: mask-family ids.

  Returns:
    The four complex images `[B, H, W, 2]` under their names, and `teacher_forced_correct_BL` /
    `rollout_correct_BL` (float32, 1 where the predicted token of scales 1..K−1 equals the true
    one, positions as in `transformer.sequence_layout`).
  """
  family_B = family_B.astype(jnp.int32)
  tok = next_scale.tokenizer_at(tokenizer, transformer.patch_nums)
  tv = _as_variables(transformer_variables)
  batch = next_scale.teacher_forcing_batch(
    transformer, tok, tokenizer_variables, levels_BKHW2, family_B
  )
  true_idx = batch["idx"]
  logits_BLV, _ = transformer.apply(tv, batch["inputs_BLZ"], batch["context_BHW2"], family_B)
  forced_BL = jnp.argmax(logits_BLV, axis=-1).astype(jnp.int32)
  layout = transformer_lib.sequence_layout(transformer.patch_nums)
  forced_idx = [true_idx[0]] + [forced_BL[:, b:e] for b, e in layout]
  free_idx, free_h, _ = rollout(
    transformer, tv, tok, tokenizer_variables, true_idx[0], batch["context_BHW2"], family_B
  )
  num = len(true_idx)
  every = jnp.ones((num,), jnp.float32)
  true_h = next_scale.lookup_contributions(tok, tokenizer_variables, true_idx)
  forced_h = next_scale.lookup_contributions(tok, tokenizer_variables, forced_idx)
  targets_BL = batch["targets_BL"]
  return {
    "tokenizer_all": _decode_mean(tok, tokenizer_variables, true_h, every),
    "tokenizer_fs": _decode_mean(tok, tokenizer_variables, true_h, every.at[:-1].set(0.0)),
    "teacher_forced": _decode_mean(tok, tokenizer_variables, forced_h, every),
    "rollout": _decode_mean(tok, tokenizer_variables, free_h, every),
    "teacher_forced_correct_BL": (forced_BL == targets_BL).astype(jnp.float32),
    "rollout_correct_BL": (jnp.concatenate(free_idx[1:], axis=1) == targets_BL).astype(jnp.float32),
  }


class _DataConsistent:
  """`data_consistent`, shared by the reconstructors: each sets `consistency` (its default
  `ConsistencyConfig`) and `_dc` (the jitted `data_consistency`)."""

  consistency: ConsistencyConfig
  _dc: Any

  def data_consistent(
    self,
    x_hat_BHW2: jax.Array,
    x_r32_BHW2: jax.Array,
    mask_BHW: jax.Array,
    maps_BCHW2: jax.Array | None = None,
    consistency: ConsistencyConfig | None = None,
  ) -> jax.Array:
    """`data_consistency` (jitted) with this reconstructor's default settings."""
    return self._dc(
      x_hat_BHW2,
      x_r32_BHW2,
      mask_BHW,
      maps_BCHW2,
      consistency=self.consistency if consistency is None else consistency,
    )


class Reconstructor(_DataConsistent):
  """R = 32 → FS reconstruction with a trained tokenizer and transformer.

  Holds the two models and their variables; `reconstruct` runs the whole pipeline as one jitted
  function, compiled once per (input shape, sampling config, intermediates flag).

  Args:
    tokenizer_model: the stage-1 `AQVAE`.
    tokenizer_variables: its `{"params", "vq_ema"}`.
    transformer_model: the stage-2/3 `NextAccelTransformer` (normally the student).
    transformer_params: its params (bare or as `{"params": ...}`).
    sampling: default token selection (argmax).
    consistency: default data-consistency settings, used when `reconstruct` gets a mask.
  """

  def __init__(
    self,
    tokenizer_model: aqvae_lib.AQVAE,
    tokenizer_variables,
    transformer_model: transformer_lib.NextAccelTransformer,
    transformer_params,
    sampling: SamplingConfig = ARGMAX,
    consistency: ConsistencyConfig = ConsistencyConfig(),
  ):
    self.tokenizer = tokenizer_model
    self.tokenizer_variables = tokenizer_variables
    self.transformer = transformer_model
    self.transformer_variables = _as_variables(transformer_params)
    self.sampling = sampling
    self.consistency = consistency
    self._fn = jax.jit(
      functools.partial(reconstruct, tokenizer_model, transformer_model),
      static_argnames=("sampling", "return_intermediates"),
    )
    self._dc = jax.jit(data_consistency, static_argnames=("consistency",))
    self._diagnose = jax.jit(functools.partial(diagnose, tokenizer_model, transformer_model))

  def diagnose(self, levels_BKHW2: jax.Array, family_B: jax.Array) -> dict[str, jax.Array]:
    """See `diagnose` (the module function), jitted."""
    return self._diagnose(
      self.tokenizer_variables,
      self.transformer_variables,
      jnp.asarray(levels_BKHW2, jnp.float32),
      jnp.asarray(family_B, jnp.int32),
    )

  def reconstruct(
    self,
    x_r32_BHW2: jax.Array,
    family_B: jax.Array,
    *,
    rng: jax.Array | None = None,
    return_intermediates: bool = False,
    sampling: SamplingConfig | None = None,
    mask_BHW: jax.Array | None = None,
    maps_BCHW2: jax.Array | None = None,
    consistency: ConsistencyConfig | None = None,
  ):
    """See `reconstruct` (the module function); `sampling` overrides the default.

    With `mask_BHW` (the R = 32 mask) the result is made consistent with the measured samples
    (`data_consistency`, multicoil when `maps_BCHW2` is given); the intermediates, when asked
    for, then also hold the unconstrained decoding as `decoded_BHW2`.
    """
    sampling = self.sampling if sampling is None else sampling
    if not sampling.greedy and rng is None:
      raise ValueError("sampling needs an rng")
    x_r32_BHW2 = jnp.asarray(x_r32_BHW2, jnp.float32)
    out = self._fn(
      self.tokenizer_variables,
      self.transformer_variables,
      x_r32_BHW2,
      jnp.asarray(family_B, jnp.int32),
      rng,
      sampling=sampling,
      return_intermediates=return_intermediates,
    )
    if mask_BHW is None:
      return out
    x_hat, aux = out if return_intermediates else (out, None)
    x_dc = self.data_consistent(x_hat, x_r32_BHW2, mask_BHW, maps_BCHW2, consistency)
    if not return_intermediates:
      return x_dc
    return x_dc, {**aux, "decoded_BHW2": x_hat}

  __call__ = reconstruct


# ------------------------------------------------------------------------------------------------
# Baselines: one forward pass of fastMRI's U-Net or E2E-VarNet

# name -> the module's `from_fields`; `config.model_name` of a baseline run.
BASELINES = {"unet": unet_lib.from_fields, "varnet": varnet_lib.from_fields}


def make_baseline(
  name: str, fields: Mapping[str, Any], where: str = "", *, single_coil: bool = False
):
  """The baseline `name` (a key of `BASELINES`) built from a config section or stored fields.

  E2E-VarNet estimates coil maps from multicoil k-space, or is the single-coil variant (maps of
  one) with `single_coil`: the data decide it, so it is not one of the stored fields.
  """
  if name not in BASELINES:
    raise ValueError(
      f"{where or 'baseline'}: unknown baseline {name!r}; choose one of {', '.join(BASELINES)}"
    )
  overrides = {"estimate_sens": not single_coil} if name == "varnet" else {}
  return BASELINES[name](fields, where, **overrides)


def reads_kspace(model) -> bool:
  """Whether the baseline reads the measured k-space and mask (E2E-VarNet) rather than the
  R = 32 image (U-Net)."""
  return isinstance(model, varnet_lib.VarNet)


def init_baseline(model, rng: jax.Array, image_size: int, num_coils: int = 1) -> dict:
  """The `params` of a baseline for `image_size`² inputs (`num_coils` k-space coils; the
  parameters do not depend on it)."""
  shape = (image_size, image_size)
  if reads_kspace(model):
    return varnet_lib.init_params(model, rng, num_coils if model.estimate_sens else 1, shape)
  return unet_lib.init_params(model, rng, shape)


def baseline_forward(
  model,
  variables,
  x_r32_BHW2: jax.Array,
  kspace_BVHW2: jax.Array | None = None,
  mask_BHW: jax.Array | None = None,
  *,
  train: bool = False,
  rngs=None,
) -> jax.Array:
  """The baseline's output `y_BHWO` in float32: O = 1 a magnitude, O = 2 `[real, imag]`.

  The U-Net reads the R = 32 image; E2E-VarNet reads `kspace_BVHW2` (the measured R = 32
  k-space, `data.pipeline.r32_kspace`) and `mask_BHW` and returns the RSS magnitude.
  """
  variables = _as_variables(variables)
  if not reads_kspace(model):
    y, _ = model.apply(variables, jnp.asarray(x_r32_BHW2, jnp.float32), train=train, rngs=rngs)
    return y.astype(jnp.float32)
  if kspace_BVHW2 is None or mask_BHW is None:
    raise ValueError(f"{type(model).__name__} reads the R = 32 k-space and its mask; pass both")
  k = jnp.asarray(kspace_BVHW2, jnp.float32)
  # Scans with fewer coils than the dataset's virtual coils carry all-zero padding coils, whose
  # images E2E-VarNet's per-coil normalisation would divide by a zero standard deviation. A
  # padding coil repeats the first coil instead: a second identical receiver, which the
  # network's own map estimate (normalised over coils) and its RSS output treat consistently.
  empty_BV = jnp.sum(jnp.square(k), axis=(2, 3, 4)) == 0
  k = jnp.where(empty_BV[:, :, None, None, None], k[:, :1], k)
  rss_BHW, _ = model.apply(variables, k, mask_BHW, train=train, rngs=rngs)
  return rss_BHW[..., None].astype(jnp.float32)


def baseline_image(y_BHWO: jax.Array, x_r32_BHW2: jax.Array) -> jax.Array:
  """A baseline output as a complex image `[B, H, W, 2]`: as is for O = 2; for a magnitude
  (O = 1) that magnitude with the R = 32 image's phase, so data consistency and the report treat
  both kinds alike (its magnitude is `|y|`)."""
  y = jnp.asarray(y_BHWO, jnp.float32)
  if y.shape[-1] == 2:
    return y
  if y.shape[-1] != 1:
    raise ValueError(f"a baseline output has 1 or 2 channels, got shape {y.shape}")
  ref = transforms.channels_to_complex(jnp.asarray(x_r32_BHW2, jnp.float32))
  r = jnp.abs(ref)
  unit = jnp.where(r > 0, ref / jnp.where(r > 0, r, 1.0), 1.0)
  return transforms.complex_to_channels(y[..., 0] * unit)


def baseline_reconstruct(model, variables, x_r32_BHW2, kspace_BVHW2=None, mask_BHW=None):
  """`baseline_image(baseline_forward(...))`: the reconstruction `[B, H, W, 2]`."""
  y = baseline_forward(model, variables, x_r32_BHW2, kspace_BVHW2, mask_BHW)
  return baseline_image(y, x_r32_BHW2)


class BaselineReconstructor(_DataConsistent):
  """R = 32 → FS with a trained baseline, one jitted forward pass per call.

  The calls of `Reconstructor` where they apply: `reconstruct` (no token sampling, so no
  `sampling`, `rng` or intermediates) and `data_consistent`.

  Args:
    model: a module of `BASELINES` (`unet.Unet`, E2E-VarNet).
    params: its params (bare or as `{"params": ...}`).
    single_coil: the k-space it was trained on is single-coil (E2E-VarNet's single-coil variant).
    consistency: default data-consistency settings.
  """

  def __init__(
    self,
    model,
    params,
    *,
    single_coil: bool = False,
    consistency: ConsistencyConfig = ConsistencyConfig(),
  ):
    self.model = model
    self.variables = _as_variables(params)
    self.single_coil = bool(single_coil)
    self.consistency = consistency
    self._fn = jax.jit(functools.partial(baseline_reconstruct, model))
    self._dc = jax.jit(data_consistency, static_argnames=("consistency",))

  @property
  def reads_kspace(self) -> bool:
    return reads_kspace(self.model)

  def reconstruct(
    self,
    x_r32_BHW2: jax.Array,
    family_B: jax.Array | None = None,
    *,
    kspace_BVHW2: jax.Array | None = None,
    mask_BHW: jax.Array | None = None,
  ) -> jax.Array:
    """The reconstruction `[B, H, W, 2]` (`baseline_reconstruct`); `family_B` is unused (the
    baselines are not told the mask family)."""
    del family_B
    return self._fn(self.variables, x_r32_BHW2, kspace_BVHW2, mask_BHW)

  __call__ = reconstruct


__all__: Sequence[str] = (
  "ARGMAX",
  "BASELINES",
  "MULTINOMIAL",
  "BaselineReconstructor",
  "ConsistencyConfig",
  "Reconstructor",
  "SamplingConfig",
  "baseline_forward",
  "baseline_image",
  "baseline_reconstruct",
  "data_consistency",
  "filter_logits",
  "init_baseline",
  "init_cache",
  "make_baseline",
  "reads_kspace",
  "reconstruct",
  "rollout",
  "sample_tokens",
)
