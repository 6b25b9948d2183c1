"""The next-acceleration-scale protocol between the frozen tokenizer and the transformer
(decisions.md §4, var_spec.md §6.4).

Shape legend: B batch, K = 6 tokenizer scales (k = 0 is Q32), l = pn_k² tokens of scale k,
L = 990 positions of the scales 1..K−1, Z codebook channels, h×w = 16² latent grid, H×W image.

Q32 is the tokenisation of the R = 32 input (`r32_tokens`), given and never predicted. Scale k's
input is the mean of the earlier scales' tokenizer contributions, area-downsampled to its grid:

  in_k = area_{pn_k}( (1/k) Σ_{s<k} h_s ),   h_s = Phi_s(bicubic16(e[idx_s]))

which is what the tokenizer decodes from "the first k scales" (`input_mode="previous"`:
`area_{pn_k}(h_{k−1})`). The student's context image is the R = 32 level, the privileged
teacher's the fully sampled one (`context_image`).

The token grids are the transformer's `patch_nums`; `tokenizer_at` gives the tokenizer that
tokenises at them, which for the "w/o Token Hierarchy" ablation (`flat_tokens`) is the trained
hierarchical tokenizer tokenising every level at the full 16² grid (see there).

All functions are pure and usable inside `jax.jit` (the modules are static, their variables are
arguments):

  tokenizer_at(tokenizer, patch_nums) -> the same tokenizer at the transformer's token grids
  r32_tokens(tokenizer, tokenizer_variables, x_r32_BHW2, family_B) -> idx_Bl (Q32)
  tokenize_levels(tokenizer, tokenizer_variables, levels_BKHW2, family_B) -> [idx_Bl] * K
  lookup_contributions(tokenizer, tokenizer_variables, idx_list, first_scale=0) -> [h_BhwZ]
  scale_input(h_list, k, patch_nums=PATCH_NUMS, mode="mean") -> x_BlZ
  build_inputs(h_list, patch_nums=PATCH_NUMS, mode="mean") -> x_BLZ
  randomize_prefix(rng, idx_list, p_max, vocab_size) -> ([idx_Bl], aux)
  context_image(levels_BKHW2, role) -> context_BHW2
  teacher_forcing_batch(transformer, tokenizer, tokenizer_variables, levels_BKHW2, family_B,
                        rng=None) -> dict(targets_BL, inputs_BLZ, context_BHW2, idx, input_idx,
                                          prefix_prob_B)
  context_encoder_params_from_aqvae(aqvae_params) -> encoder subtree
  insert_context_encoder(transformer_params, encoder_params) -> transformer params

A stage-2 step (student or teacher; the role and the prefix noise are fields of the model):

  batch = teacher_forcing_batch(model, tokenizer, tok_vars, levels_BKHW2, family_B, rng=rng_noise)
  logits_BLV, _ = model.apply({"params": params}, batch["inputs_BLZ"], batch["context_BHW2"],
                              family_B, train=True, rngs={"dropout": rng_drop})
  loss = mean CE(logits_BLV, batch["targets_BL"])
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from nextaccel_jax.models import aqvae as aqvae_lib
from nextaccel_jax.models.quantizer import PATCH_NUMS, area_matrix, resize
from nextaccel_jax.models.transformer import INPUT_MODES


def tokenizer_at(tokenizer: aqvae_lib.AQVAE, patch_nums: Sequence[int]) -> aqvae_lib.AQVAE:
  """The tokenizer tokenising at the token grids `patch_nums`, with the same variables.

  The tokenizer itself when the grids are its own. Otherwise a clone whose quantizer resizes
  each level's latent to `patch_nums[k]`: the grids change no variable (the codebook and the
  `num_phi` Phi convs have no grid in their shapes), so the trained variables apply unchanged.

  The "w/o Token Hierarchy" ablation (`transformer.flat_tokens`, paper Table 4: flat 16 × 16
  tokens at every scale) uses this with `(16,) * 6`: it reuses the trained hierarchical
  tokenizer rather than training a flat one, so that all of Table 4's rows come from one stage-1
  run and differ only in the transformer. That is a fair reading of the ablation, whose question
  is what the transformer gains from a coarse-to-fine token hierarchy: holding the tokenizer
  fixed isolates exactly that, and nothing outside what stage 1 trained is used. Every level is
  still encoded with its own acceleration label; at 16² the area resize is the identity, as the
  quantizer applies it to QFS, so the shared codebook was fitted to full-grid latents; scale k
  keeps its Phi conv (VAR's map depends on the scale index only, `quantizer.phi_index`); and the
  decoder still decodes the mean of six contributions on the 16² grid. The one difference from a
  retrained flat tokenizer: there the coarse scales' Phi convs and the decoder would have seen
  full-grid contributions in training, where these saw bicubic-upsampled, smoother ones, so the
  row measures the flat layout under the hierarchy's tokenizer.

  Raises:
    ValueError: grids that are not one per scale or exceed the latent side (the last grid).
  """
  patch_nums = tuple(int(p) for p in patch_nums)
  own = tuple(int(p) for p in tokenizer.patch_nums)
  if patch_nums == own:
    return tokenizer
  if len(patch_nums) != len(own) or patch_nums[-1] != own[-1] or max(patch_nums) > own[-1]:
    raise ValueError(
      f"token grids {patch_nums} do not fit the tokenizer's {own}: one per scale, none larger "
      f"than the latent side {own[-1]}, the last equal to it"
    )
  return tokenizer.clone(patch_nums=patch_nums)


def r32_tokens(tokenizer, tokenizer_variables, x_r32_BHW2, family_B) -> jax.Array:
  """Q32, the given first scale: the tokenizer's tokens of the R = 32 image (label k = 0)."""
  b = x_r32_BHW2.shape[0]
  f0_BhwZ, _ = tokenizer.apply(
    tokenizer_variables,
    x_r32_BHW2,
    jnp.zeros((b,), jnp.int32),
    family_B.astype(jnp.int32),
    method=aqvae_lib.AQVAE.encode,
  )
  idx = tokenizer.apply(tokenizer_variables, f0_BhwZ, 0, method=aqvae_lib.AQVAE.tokenize_scale)
  return jax.lax.stop_gradient(idx)


def context_image(levels_BKHW2: jax.Array, role: str) -> jax.Array:
  """The image a transformer of `role` is conditioned on: R = 32 (student) or FS (teacher)."""
  return levels_BKHW2[:, 0] if role == "student" else levels_BKHW2[:, -1]


def tokenize_levels(tokenizer, tokenizer_variables, levels_BKHW2, family_B) -> list[jax.Array]:
  """Token ids of the six levels with the frozen tokenizer: `[idx_Bl]`, scale k from level k."""
  f_BKhwZ, _ = tokenizer.apply(
    tokenizer_variables, levels_BKHW2, family_B, method=aqvae_lib.AQVAE.encode_levels
  )
  idx = tokenizer.apply(tokenizer_variables, f_BKhwZ, method=aqvae_lib.AQVAE.tokenize)
  return [jax.lax.stop_gradient(i) for i in idx]


def lookup_contributions(
  tokenizer, tokenizer_variables, idx_list: Sequence[jax.Array], first_scale: int = 0
) -> list[jax.Array]:
  """`h_k = Phi_k(bicubic16(e[idx_k]))` (float32, 16² grid) for scales first_scale, … ."""
  return [
    jax.lax.stop_gradient(
      tokenizer.apply(tokenizer_variables, idx, first_scale + i, method=aqvae_lib.AQVAE.lookup)
    ).astype(jnp.float32)
    for i, idx in enumerate(idx_list)
  ]


@functools.cache
def _area(out_size: int, in_size: int) -> np.ndarray | None:
  return None if out_size == in_size else area_matrix(out_size, in_size).astype(np.float32)


def scale_input(
  h_list: Sequence[jax.Array], k: int, patch_nums: Sequence[int] = PATCH_NUMS, mode: str = "mean"
) -> jax.Array:
  """Input of scale k ≥ 1 from the contributions `h_list[:k]`: `x_BlZ`, l = pn_k², float32.

  "mean": `area_k(Σ_{s<k} h_s / k)`; "previous": `area_k(h_{k−1})`.
  """
  if k < 1 or len(h_list) < k:
    raise ValueError(f"scale {k} needs the contributions of scales 0..{k - 1}")
  if mode == "mean":
    f = h_list[0].astype(jnp.float32)
    for h in h_list[1:k]:
      f = f + h.astype(jnp.float32)
    f = f / k
  elif mode == "previous":
    f = h_list[k - 1].astype(jnp.float32)
  else:
    raise ValueError(f"input mode must be one of {INPUT_MODES}, got {mode!r}")
  pn = patch_nums[k]
  area = _area(pn, f.shape[1])
  if area is not None:
    f = resize(f, area)
  return f.reshape(f.shape[0], pn * pn, f.shape[-1])


def build_inputs(
  h_list: Sequence[jax.Array], patch_nums: Sequence[int] = PATCH_NUMS, mode: str = "mean"
) -> jax.Array:
  """Teacher-forcing inputs `x_BLZ` of scales 1..K−1 from the contributions of scales 0..K−2."""
  return jnp.concatenate(
    [scale_input(h_list, k, patch_nums, mode) for k in range(1, len(patch_nums))], axis=1
  )


def randomize_prefix(
  rng: jax.Array, idx_list: Sequence[jax.Array], p_max: float, vocab_size: int
) -> tuple[list[jax.Array], dict[str, jax.Array]]:
  """Randomised prefix: each id is replaced by a uniform random id with probability p_B.

  p_B ~ U(0, p_max) is drawn once per sample and shared by all the sample's ids (a replacement
  may draw the original id again, with probability 1/V).

  Args:
    rng: PRNG key.
    idx_list: input ids `[idx_Bl]` (the teacher-forced prefix, never the targets).
    p_max: upper end of the per-sample replacement probability.
    vocab_size: V.

  Returns:
    `(idx_list, aux)`: the noisy ids (same shapes and dtypes) and aux with `prob_B` (the drawn
    p) and `replaced_B` (the fraction of the sample's ids that were redrawn).
  """
  b = idx_list[0].shape[0]
  k_prob, k_ids = jax.random.split(rng)
  prob_B = jax.random.uniform(k_prob, (b,), jnp.float32) * p_max
  out, hits, total = [], jnp.zeros((b,), jnp.float32), 0
  for i, idx in enumerate(idx_list):
    k_hit, k_new = jax.random.split(jax.random.fold_in(k_ids, i))
    hit = jax.random.uniform(k_hit, idx.shape) < prob_B[:, None]
    new = jax.random.randint(k_new, idx.shape, 0, vocab_size, dtype=idx.dtype)
    out.append(jnp.where(hit, new, idx))
    hits = hits + hit.sum(axis=1)
    total += idx.shape[1]
  return out, {"prob_B": prob_B, "replaced_B": hits / total}


def teacher_forcing_batch(
  transformer,
  tokenizer,
  tokenizer_variables,
  levels_BKHW2: jax.Array,
  family_B: jax.Array,
  rng: jax.Array | None = None,
) -> dict[str, Any]:
  """Everything one teacher-forced step needs, from the six levels of a batch.

  Tokenises the levels with the frozen tokenizer at the model's token grids (`tokenizer_at`);
  the targets are scales 1..K−1 (clean). The input ids are scales 0..K−2, randomised
  (`randomize_prefix`) when the model's `prefix_noise_max` > 0 — the teacher's setting — and
  turned into inputs through `lookup`, so the noise reaches the inputs. The context image
  follows the role.

  Args:
    transformer: the model (its role, patch_nums, input_mode and prefix_noise_max are read).
    tokenizer: the stage-1 `AQVAE`.
    tokenizer_variables: its `{"params", "vq_ema"}`.
    levels_BKHW2: the six levels, R = 32 first, FS last.
    family_B: mask-family ids.
    rng: PRNG key for the prefix noise (required when prefix_noise_max > 0).

  Returns:
    dict with `targets_BL` (int32, B × L), `inputs_BLZ`, `context_BHW2`, `idx` (the six clean
    `idx_Bl`), `input_idx` (the five input `idx_Bl`) and `prefix_prob_B` (zeros without noise).
  """
  noisy = transformer.prefix_noise_max > 0
  if noisy and rng is None:
    raise ValueError("prefix_noise_max > 0 needs an rng")
  tokenizer = tokenizer_at(tokenizer, transformer.patch_nums)
  idx = tokenize_levels(tokenizer, tokenizer_variables, levels_BKHW2, family_B)
  input_idx = idx[:-1]
  prob_B = jnp.zeros((levels_BKHW2.shape[0],), jnp.float32)
  if noisy:
    input_idx, aux = randomize_prefix(
      rng, input_idx, transformer.prefix_noise_max, transformer.vocab_size
    )
    prob_B = aux["prob_B"]
  h = lookup_contributions(tokenizer, tokenizer_variables, input_idx)
  return {
    "targets_BL": jnp.concatenate(idx[1:], axis=1),
    "inputs_BLZ": build_inputs(h, transformer.patch_nums, transformer.input_mode),
    "context_BHW2": context_image(levels_BKHW2, transformer.role),
    "idx": idx,
    "input_idx": list(input_idx),
    "prefix_prob_B": prob_B,
  }


# --------------------------------------------------------------------------------------------------
# The context encoder starts as a copy of the stage-1 encoder.


def _unwrap(tree):
  return tree["params"] if isinstance(tree, Mapping) and "params" in tree else tree


def context_encoder_params_from_aqvae(aqvae_params) -> dict:
  """The stage-1 encoder subtree (`aqvae_params` may be the params or `{"params", "vq_ema"}`)."""
  return jax.tree.map(jnp.array, dict(_unwrap(aqvae_params)["encoder"]))


def insert_context_encoder(transformer_params, encoder_params):
  """A copy of the transformer params with `context_encoder` replaced (shapes must match).

  Keeps the `{"params": ...}` wrapping of the input if it has one.
  """
  wrapped = isinstance(transformer_params, Mapping) and "params" in transformer_params
  params = dict(_unwrap(transformer_params))
  if "context_encoder" not in params:
    raise ValueError(
      "the transformer has no context encoder (cross_attention=False): there is nothing to copy "
      "the stage-1 encoder into"
    )
  old = traverse_util.flatten_dict(dict(params["context_encoder"]))
  new = traverse_util.flatten_dict(dict(encoder_params))
  if set(old) != set(new):
    missing, extra = sorted(set(old) - set(new)), sorted(set(new) - set(old))
    raise ValueError(f"encoder trees differ: missing {missing[:5]}, unexpected {extra[:5]}")
  for path, leaf in new.items():
    if tuple(leaf.shape) != tuple(old[path].shape):
      raise ValueError(f"{'/'.join(path)}: {leaf.shape} != {old[path].shape}")
  params["context_encoder"] = traverse_util.unflatten_dict(
    {p: jnp.asarray(v, old[p].dtype) for p, v in new.items()}
  )
  return {"params": params} if wrapped else params


__all__: Sequence[str] = (
  "build_inputs",
  "context_encoder_params_from_aqvae",
  "context_image",
  "insert_context_encoder",
  "lookup_contributions",
  "r32_tokens",
  "randomize_prefix",
  "scale_input",
  "teacher_forcing_batch",
  "tokenize_levels",
  "tokenizer_at",
)
