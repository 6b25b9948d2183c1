"""Cross-attentive next-acceleration-scale transformer (stage 2; decisions.md §4, var_spec.md §3,
§4.4–4.6, §6.4).

Shape legend:
  B  batch
  K  tokenizer scales (6: Q32, Q16, Q8, Q4, Q2, QFS); k indexes them, k = 0 is Q32
  L  sequence positions (990 = 12² + 13² + 14² + 15² + 16², the scales k = 1..5; 5 · 16² = 1280
     with flat tokens)
  l  positions of one scale (pn_k²)
  Z  codebook / latent channels (32)
  V  vocabulary size (4096)
  C  transformer width (1024); D = C, the width of the adaLN condition
  H  attention heads; d = head width
  N  context tokens of one encoder level (h·w); c its channels
  h, w  latent grid (16²); X×Y a context level's grid

Q32 is given (the tokenisation of the R = 32 input) and never predicted, so the sequence has five
blocks; block k − 1 (positions `begin_k:end_k`) predicts the tokens of scale k. Its input is the
mean of the earlier scales' tokenizer contributions, area-downsampled to scale k's grid:

  in_k = area_{pn_k}( (1/k) Σ_{s<k} h_s ),   h_s = Phi_s(bicubic16(e[idx_s]))   (var_spec.md §6.4)

which is what the tokenizer decodes from "the first k scales"; `input_mode="previous"` uses
`area_{pn_k}(h_{k−1})` instead. Every position adds `word_embed(in) + lvl_embed(k − 1) + pos_1LC`.
A token attends to its own and all earlier scales (block-causal mask).

Each block is VAR's adaLN block with RemoteVAR's cross-attention in front of the self-attention:

  g1, g2, s1, s2, b1, b2 = split6(ada_lin(SiLU(cond)))
  x = x + DropPath(CrossAttn(LN(x), ctx))
  x = x + DropPath(SelfAttn(LN(x)·(1+s1) + b1) · g1)
  x = x + DropPath(FFN(LN(x)·(1+s2) + b2) · g2)

with l2-normalised q/k and a learnable per-head temperature in both attentions. `cond` is the
embedding of the mask family. The context is a list of feature maps of the model's own copy of the
stage-1 FiLM encoder (`context_encoder`, trainable by default) applied to the context image with
its acceleration label: the R = 32 image (label 0) for the student, the fully sampled image
(label 5) for the privileged teacher. Each context level gets a fixed 2-D sin-cos position
embedding (half the channels encode the row, half the column); early blocks attend to coarse
levels, deep blocks to fine ones (`context_map`).

Two fields switch parts off for the paper's component ablations (Table 4):

- `cross_attention=False` ("w/o Cross-Attention"): VAR's conditioning only. There is no context
  encoder and no cross-attention branch, so the parameter tree holds no context parameters, the
  context image is ignored, and the model sees the R = 32 input only through its given tokens
  Q32 and the mask family (adaLN).
- `flat_tokens=True` ("w/o Token Hierarchy"): every scale sits on the latent's full grid,
  `patch_nums = (16,) * 6`, so the sequence has five blocks of 256 positions (L = 1280) and the
  block-causal mask, level and position embeddings and the KV cache follow. `from_fields` derives
  the grids from the tokenizer; `next_scale.tokenizer_at` tokenises with the same trained
  tokenizer at those grids (see there for why that is a fair reading of the ablation).

Parameter paths follow VAR's state dict where one exists (`word_embed`, `class_emb`,
`lvl_embed`, `pos_1LC`, `blocks_{i}/attn/{mat_qkv,q_bias,v_bias,scale_mul_1H11,proj}`,
`blocks_{i}/ffn/{fc1,fc2}`, `blocks_{i}/ada_lin`, `head_nm/ada_lin`, `head`) and RemoteVAR's
for the cross-attention (`blocks_{i}/cross_attn/{mat_q,q_bias,mat_kv,v_bias,scale_mul_1H11,
proj}`); the context encoder has the stage-1 encoder's paths under `context_encoder/`.

Building and initialising it (pure; usable inside `jax.jit`, the model objects are static):

  from_fields(model_fields, tokenizer_fields) -> NextAccelTransformer
  NextAccelTransformer.__call__(x_BLZ, context_BHW2, family_B, train=False) -> (logits_BLV, aux)
  init_params(transformer, rng, image_size, batch=1) -> {"params": ...}

The inputs the sequence is built from (tokens of the frozen tokenizer, the running mean of the
scales, the teacher's randomised prefix, the context image of each role) are in `next_scale`.
The cached sampler (`prepare` + `step`, one call per scale) lives in `nextaccel_jax.inference`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nextaccel_jax.models import aqvae as aqvae_lib
from nextaccel_jax.models import autoencoder
from nextaccel_jax.models import fields as fields_lib
from nextaccel_jax.models.layers import Dtype, island_dtype, maybe_remat
from nextaccel_jax.models.quantizer import PATCH_NUMS

ROLES = ("student", "teacher")
INPUT_MODES = ("mean", "previous")
# Encoder features, coarse first: 16² after the middle block, 16² before it, 32², 64² (a name
# that is a number picks the `down_{i}` level whose feature map has that side).
DEFAULT_CONTEXT_LEVELS = ("mid", "pre_mid", "32", "64")
# VAR clamps the learnable attention temperature at log 100.
_MAX_LOG_SCALE = math.log(100.0)
_NEG_INF = -1e30


# --------------------------------------------------------------------------------------------------
# Static tables.


def sequence_layout(patch_nums: Sequence[int] = PATCH_NUMS) -> tuple[tuple[int, int], ...]:
  """`(begin, end)` of scale k = 1..K−1 in the sequence (index k − 1); L = 990 for 11² … 16²."""
  out, begin = [], 0
  for pn in patch_nums[1:]:
    out.append((begin, begin + pn * pn))
    begin += pn * pn
  return tuple(out)


def sequence_length(patch_nums: Sequence[int] = PATCH_NUMS) -> int:
  return sequence_layout(patch_nums)[-1][1]


def level_ids(patch_nums: Sequence[int] = PATCH_NUMS) -> np.ndarray:
  """Sequence block (scale − 1) of every position, int32 (L,)."""
  return np.concatenate(
    [np.full(e - b, j, np.int32) for j, (b, e) in enumerate(sequence_layout(patch_nums))]
  )


@functools.cache
def _block_causal_mask(patch_nums: tuple[int, ...]) -> np.ndarray:
  lvl = level_ids(patch_nums)
  return lvl[:, None] >= lvl[None, :]


def block_causal_mask(patch_nums: Sequence[int] = PATCH_NUMS) -> np.ndarray:
  """`mask[q, k]` = position q may attend to position k: k's scale is not later than q's."""
  return _block_causal_mask(tuple(patch_nums))


def allocate_counts(total: int, weights: Sequence[float]) -> list[int]:
  """Splits `total` proportionally to `weights`: floors first, then the leftover units go to the
  largest fractional parts, ties to the larger index (RemoteVAR's rule, var_spec.md §4.4)."""
  w = np.asarray(weights, np.float64)
  exact = total * w / w.sum()
  counts = np.floor(exact).astype(int)
  frac = exact - counts
  order = sorted(range(len(w)), key=lambda i: (-round(frac[i], 12), -i))
  for i in order[: total - int(counts.sum())]:
    counts[i] += 1
  return [int(c) for c in counts]


def default_context_map(depth: int, num_levels: int) -> tuple[int, ...]:
  """Context level of every block: equal shares, coarse levels in the early blocks.

  Depth 16 with four levels gives blocks 0–3 → level 0, 4–7 → 1, 8–11 → 2, 12–15 → 3.
  """
  counts = allocate_counts(depth, [1.0] * num_levels)
  return tuple(j for j, n in enumerate(counts) for _ in range(n))


@functools.cache
def sincos_2d(height: int, width: int, dim: int) -> np.ndarray:
  """Fixed 2-D sin-cos embedding (height·width, dim), row-major tokens, float32.

  Channels `[0, dim/2)` encode the row and `[dim/2, dim)` the column, each as
  `[sin(p·ω_i), cos(p·ω_i)]` with `ω_i = 10000^(−i/(dim/4))`; leftover channels (dim not a
  multiple of 4) are zero. Unlike RemoteVAR's buffer, which keeps only the row half, every token
  of the grid gets its own embedding.
  """
  quarter = dim // 4
  out = np.zeros((height, width, dim), np.float64)
  if quarter:
    omega = 1.0 / 10000.0 ** (np.arange(quarter, dtype=np.float64) / quarter)
    rows = np.arange(height, dtype=np.float64)[:, None] * omega
    cols = np.arange(width, dtype=np.float64)[:, None] * omega
    out[:, :, :quarter] = np.sin(rows)[:, None, :]
    out[:, :, quarter : 2 * quarter] = np.cos(rows)[:, None, :]
    out[:, :, 2 * quarter : 3 * quarter] = np.sin(cols)[None, :, :]
    out[:, :, 3 * quarter : 4 * quarter] = np.cos(cols)[None, :, :]
  return out.reshape(height * width, dim).astype(np.float32)


def _resolve_context(feats: Mapping[str, jax.Array], name: str) -> jax.Array:
  if name in feats:
    return feats[name]
  if name.isdigit():
    side = int(name)
    hits = [k for k, v in feats.items() if k.startswith("down_") and v.shape[1] == side]
    if hits:
      return feats[hits[-1]]
  sides = {k: tuple(v.shape[1:3]) for k, v in feats.items()}
  raise KeyError(f"no encoder feature {name!r}; available: {sides}")


# --------------------------------------------------------------------------------------------------
# Initialisers (VAR's init_weights, var_spec.md §3.8). Torch's trunc_normal_ cuts at ±2 in absolute
# terms, which at std ≈ 0.02 never happens, so a plain normal is the same distribution.


def _normal(std: float):
  return nn.initializers.normal(stddev=std)


def _ada_init(
  std: float, width: int, num_chunks: int, gamma_chunks: int, gamma: float, rest: float
):
  """Normal(std) columns, the first `gamma_chunks` chunks of `width` scaled by `gamma`, the others
  by `rest` (VAR: gammas by `alng`, scales/shifts by `aln`)."""

  def init(key, shape, dtype=jnp.float32):
    w = jax.random.normal(key, shape, jnp.float32) * std
    col = np.concatenate(
      [np.full(gamma_chunks * width, gamma), np.full((num_chunks - gamma_chunks) * width, rest)]
    )
    return (w * jnp.asarray(col, jnp.float32)).astype(dtype)

  return init


# --------------------------------------------------------------------------------------------------
# Layers.


def _layer_norm(x: jax.Array, eps: float) -> jax.Array:
  """Parameter-free LayerNorm over the last axis, computed (and returned) in float32."""
  x = x.astype(jnp.float32)
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)


def _l2_normalize(x: jax.Array) -> jax.Array:
  x = x.astype(jnp.float32)
  # F.normalize's eps: only an all-zero vector is affected.
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _attend(
  q_BHQd: jax.Array, k_BHKd: jax.Array, v_BHKd: jax.Array, mask_QK, dtype: Dtype
) -> jax.Array:
  """softmax(q·kᵀ + mask)·v with fp32 logits and softmax; q carries any scale already."""
  logits = jnp.einsum("bhqd,bhkd->bhqk", q_BHQd, k_BHKd, preferred_element_type=island_dtype(dtype))
  if mask_QK is not None:
    logits = jnp.where(jnp.asarray(mask_QK), logits, _NEG_INF)
  w = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum("bhqk,bhkd->bhqd", w.astype(dtype), v_BHKd)


def _split_heads(x_BLC: jax.Array, heads: int) -> jax.Array:
  b, n, c = x_BLC.shape
  return x_BLC.reshape(b, n, heads, c // heads).transpose(0, 2, 1, 3)


def _merge_heads(x_BHLd: jax.Array) -> jax.Array:
  b, h, n, d = x_BHLd.shape
  return x_BHLd.transpose(0, 2, 1, 3).reshape(b, n, h * d)


def _scale_param(module: nn.Module, num_heads: int) -> jax.Array:
  """VAR's learnable per-head temperature `scale_mul_1H11` (init log 4)."""
  return module.param(
    "scale_mul_1H11", nn.initializers.constant(math.log(4.0)), (1, num_heads, 1, 1), jnp.float32
  )


def _scale_query(q_BHQd: jax.Array, scale_1H11: jax.Array | None) -> jax.Array:
  """l2-normalised q times exp(min(scale, log 100)), or VAR's fixed 0.25/√d without l2 norm."""
  if scale_1H11 is None:
    return q_BHQd.astype(jnp.float32) * (0.25 / math.sqrt(q_BHQd.shape[-1]))
  return _l2_normalize(q_BHQd) * jnp.exp(jnp.minimum(scale_1H11, _MAX_LOG_SCALE))


class SelfAttention(nn.Module):
  """VAR's self-attention (var_spec.md §3.5) with an optional static-shape KV cache.

  Attributes:
    width: model width C.
    num_heads: heads H (head width C / H).
    attn_l2_norm: l2-normalised q/k with a learnable per-head temperature (VAR's default);
      otherwise plain dot products scaled by 0.25/√d.
    init_std: std of the weight init.
    proj_init_scale: extra factor on the output projection's init (VAR: 1/√(2·depth)).
    dtype: compute dtype (logits and softmax stay float32).
    param_dtype: parameter storage dtype.
  """

  width: int
  num_heads: int
  attn_l2_norm: bool = True
  init_std: float = 0.02
  proj_init_scale: float = 1.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    c, kw = self.width, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.mat_qkv = nn.Dense(3 * c, use_bias=False, kernel_init=_normal(self.init_std), **kw)
    # VAR keeps the key bias at zero (a buffer): a key bias only shifts every logit of a query.
    self.q_bias = self.param("q_bias", nn.initializers.zeros, (c,), self.param_dtype)
    self.v_bias = self.param("v_bias", nn.initializers.zeros, (c,), self.param_dtype)
    self.scale_mul_1H11 = _scale_param(self, self.num_heads) if self.attn_l2_norm else None
    self.proj = nn.Dense(c, kernel_init=_normal(self.init_std * self.proj_init_scale), **kw)

  def __call__(self, x_BLC: jax.Array, mask_LL=None, cache=None, start: int = 0):
    """Attends over the sequence (with `mask_LL`) or over the cache.

    Args:
      x_BLC: normalised, modulated input.
      mask_LL: boolean attention mask for the full-sequence pass.
      cache: `(k_BHSd, v_BHSd)` for the whole sequence (S = L); x's keys and values are written
        at `[start, start + l)` and the queries attend to `[0, start + l)`, which for a whole
        scale is exactly the block-causal mask.
      start: first sequence position of x (static).

    Returns:
      `(y_BLC, aux)`; aux["cache"] is the updated cache when one was given.
    """
    c, zero = self.width, jnp.zeros((self.width,), self.param_dtype)
    qkv = self.mat_qkv(x_BLC) + jnp.concatenate([self.q_bias, zero, self.v_bias]).astype(self.dtype)
    q, k, v = (_split_heads(t, self.num_heads) for t in jnp.split(qkv, [c, 2 * c], axis=-1))
    q = _scale_query(q, self.scale_mul_1H11).astype(self.dtype)
    k = (_l2_normalize(k) if self.attn_l2_norm else k).astype(self.dtype)
    aux = {}
    if cache is not None:
      k_cache, v_cache = cache
      k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, 0, start, 0))
      v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, 0, start, 0))
      end = start + x_BLC.shape[1]
      k, v = k_cache[:, :, :end].astype(self.dtype), v_cache[:, :, :end].astype(self.dtype)
      aux["cache"] = (k_cache, v_cache)
    o = _attend(q, k, v, mask_LL, self.dtype)
    return self.proj(_merge_heads(o)), aux


class CrossAttention(nn.Module):
  """RemoteVAR's cross-attention to one context level (var_spec.md §4.5).

  Queries from `mat_q` (no bias) + `q_bias`; keys and values from `mat_kv` (no bias) + `[0,
  v_bias]` on the context tokens (with their position embedding already added); l2-normalised
  q/k with a per-head temperature; no mask.

  Attributes:
    width: model width C.
    num_heads: heads H.
    inner_dim: attention width (RemoteVAR: 1024 = C); head width inner_dim / H.
    attn_l2_norm: as in `SelfAttention`.
    init_std: std of the weight init.
    proj_init_scale: extra factor on the output projection's init; 0 makes it exactly zero (a
      "zero-conv" start when the rest of the model is pretrained).
    dtype: compute dtype.
    param_dtype: parameter storage dtype.
  """

  width: int
  num_heads: int
  inner_dim: int
  attn_l2_norm: bool = True
  init_std: float = 0.02
  proj_init_scale: float = 1.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    inner = self.inner_dim
    self.mat_q = nn.Dense(inner, use_bias=False, kernel_init=_normal(self.init_std), **kw)
    self.q_bias = self.param("q_bias", nn.initializers.zeros, (inner,), self.param_dtype)
    self.mat_kv = nn.Dense(2 * inner, use_bias=False, kernel_init=_normal(self.init_std), **kw)
    self.v_bias = self.param("v_bias", nn.initializers.zeros, (inner,), self.param_dtype)
    self.scale_mul_1H11 = _scale_param(self, self.num_heads) if self.attn_l2_norm else None
    proj_init = (
      nn.initializers.zeros
      if self.proj_init_scale == 0
      else _normal(self.init_std * self.proj_init_scale)
    )
    self.proj = nn.Dense(self.width, kernel_init=proj_init, **kw)

  def kv(self, ctx_BNc: jax.Array):
    """Keys (normalised when `attn_l2_norm`) and values of the context: `(k_BHNd, v_BHNd)`."""
    inner = self.inner_dim
    bias = jnp.concatenate([jnp.zeros((inner,), self.param_dtype), self.v_bias])
    kv = self.mat_kv(ctx_BNc) + bias.astype(self.dtype)
    k, v = (_split_heads(t, self.num_heads) for t in jnp.split(kv, 2, axis=-1))
    if self.attn_l2_norm:
      k = _l2_normalize(k)
    return k.astype(self.dtype), v

  def __call__(self, x_BLC: jax.Array, kv) -> jax.Array:
    """Attends from x to precomputed context keys/values `kv = self.kv(ctx)`."""
    k, v = kv
    q = _split_heads(self.mat_q(x_BLC) + self.q_bias.astype(self.dtype), self.num_heads)
    q = _scale_query(q, self.scale_mul_1H11).astype(self.dtype)
    o = _attend(q, k, v, None, self.dtype)
    return self.proj(_merge_heads(o))


class FFN(nn.Module):
  """`fc2(GELU_tanh(fc1(x)))` (var_spec.md §3.4).

  Attributes:
    width: model width C.
    hidden: hidden width (mlp_ratio · C).
    init_std: std of the weight init.
    fc2_init_scale: extra factor on fc2's init (VAR: 1/√(2·depth)).
    dtype: compute dtype.
    param_dtype: parameter storage dtype.
  """

  width: int
  hidden: int
  init_std: float = 0.02
  fc2_init_scale: float = 1.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BLC: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.Dense(self.hidden, kernel_init=_normal(self.init_std), name="fc1", **kw)(x_BLC)
    h = nn.gelu(h, approximate=True)
    std = self.init_std * self.fc2_init_scale
    return nn.Dense(self.width, kernel_init=_normal(std), name="fc2", **kw)(h)


class CrossSelfBlock(nn.Module):
  """Cross-attention → adaLN self-attention → adaLN FFN, each a residual branch with drop path.

  Attributes:
    width: model width C.
    num_heads: heads H.
    mlp_ratio: FFN hidden width / C.
    cross_inner_dim: cross-attention width.
    drop_path: drop-path rate of this block's branches (training only).
    depth: number of blocks of the model (for the init scaling).
    attn_l2_norm: l2-normalised attention in both attentions.
    norm_eps: LayerNorm epsilon.
    init_std: std of the weight init.
    init_adaln: factor on the adaLN scale/shift weights (VAR's `aln`).
    init_adaln_gamma: factor on the adaLN gate weights (VAR's `alng`): small, so every block
      starts close to the identity.
    zero_init_cross_proj: start the cross-attention output projection at zero.
    cross_attention: False leaves out the cross-attention branch (VAR's block).
    dtype: compute dtype; the residual stream, norms and softmax stay float32.
    param_dtype: parameter storage dtype.
  """

  width: int
  num_heads: int
  mlp_ratio: float
  cross_inner_dim: int
  drop_path: float
  depth: int
  attn_l2_norm: bool = True
  norm_eps: float = 1e-6
  init_std: float = 0.02
  init_adaln: float = 0.5
  init_adaln_gamma: float = 1e-3
  zero_init_cross_proj: bool = False
  cross_attention: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    c, std = self.width, self.init_std
    residual = 1.0 / math.sqrt(2 * self.depth)
    if self.cross_attention:
      self.cross_attn = CrossAttention(
        c,
        self.num_heads,
        self.cross_inner_dim,
        self.attn_l2_norm,
        std,
        0.0 if self.zero_init_cross_proj else residual,
        **kw,
      )
    self.attn = SelfAttention(c, self.num_heads, self.attn_l2_norm, std, residual, **kw)
    self.ffn = FFN(c, int(round(c * self.mlp_ratio)), std, residual, **kw)
    self.ada_lin = nn.Dense(
      6 * c,
      kernel_init=_ada_init(std, c, 6, 2, self.init_adaln_gamma, self.init_adaln),
      bias_init=nn.initializers.zeros,
      **kw,
    )

  def cross_kv(self, ctx_BNc: jax.Array | None):
    """The context's cross-attention keys/values; None without cross-attention."""
    return self.cross_attn.kv(ctx_BNc) if self.cross_attention else None

  def _drop(self, y_BLC: jax.Array, train: bool) -> jax.Array:
    if not train or self.drop_path <= 0.0:
      return y_BLC
    keep = 1.0 - self.drop_path
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (y_BLC.shape[0], 1, 1))
    return y_BLC * mask.astype(y_BLC.dtype) / keep

  def __call__(self, x_BLC, cond_BD, ctx, mask_LL=None, cache=None, start=0, train=False):
    """Applies the block (arguments are positional so `nn.remat` can mark `start`, `train` static).

    Args:
      x_BLC: residual stream (float32).
      cond_BD: adaLN condition.
      ctx: this block's context tokens `ctx_BNc`, or their precomputed `(k, v)`; None without
        cross-attention.
      mask_LL: self-attention mask (full-sequence pass).
      cache: self-attention KV cache (cached pass); see `SelfAttention`.
      start: first sequence position of x.
      train: enables drop path (needs the "dropout" rng).

    Returns:
      `(x_BLC, aux)`; aux["cache"] is the updated self-attention cache in the cached pass.
    """
    island = island_dtype(self.dtype)
    x = x_BLC.astype(island)
    ada = self.ada_lin(nn.silu(cond_BD.astype(self.dtype))).astype(island)
    g1, g2, s1, s2, b1, b2 = (t[:, None, :] for t in jnp.split(ada, 6, axis=-1))
    if self.cross_attention:
      kv = ctx if isinstance(ctx, tuple) else self.cross_kv(ctx)
      h = _layer_norm(x, self.norm_eps).astype(self.dtype)
      x = x + self._drop(self.cross_attn(h, kv).astype(island), train)

    h = (_layer_norm(x, self.norm_eps) * (1 + s1) + b1).astype(self.dtype)
    y, aux = self.attn(h, mask_LL, cache, start)
    x = x + self._drop(y.astype(island) * g1, train)

    h = (_layer_norm(x, self.norm_eps) * (1 + s2) + b2).astype(self.dtype)
    x = x + self._drop(self.ffn(h).astype(island) * g2, train)
    return x, aux


# --------------------------------------------------------------------------------------------------
# The model.


class NextAccelTransformer(nn.Module):
  """Next-acceleration-scale transformer with a trainable context encoder (see the module doc).

  Attributes:
    depth: number of blocks (paper 16).
    width: model width C (paper 1024).
    num_heads: attention heads (paper 16).
    mlp_ratio: FFN hidden width / C (paper 4).
    vocab_size: codebook entries V (paper 4096).
    z_channels: codebook dimension Z of the inputs (paper 32).
    patch_nums: token-grid side of each scale, Q32 first: the tokenizer's (11 … 16), or the
      latent side repeated with `flat_tokens`.
    num_families: mask families (the adaLN condition).
    cross_inner_dim: cross-attention width; None uses `width`.
    context_levels: encoder features used as context, coarse first: keys of the encoder's
      `feats` (`mid`, `pre_mid`, `down_{i}`) or a side such as "32" for the `down_{i}` level of
      that resolution; channel counts are read from the features.
    context_map: context level (index into `context_levels`) of each block; None gives equal
      shares, coarse levels first (`default_context_map`).
    role: "student" (context = R = 32 image, label 0) or "teacher" (fully sampled, label K − 1).
    prefix_noise_max: p_max of the randomised prefix used by `teacher_forcing_batch`: each input
      id is replaced by a uniform random id with probability p ~ U(0, p_max) per sample.
    input_mode: "mean" (running mean of the earlier scales) or "previous" (previous scale only).
    drop_path_rate: drop-path rate of the last block; block i uses
      `linspace(0, drop_path_rate, depth)[i]`.
    attn_l2_norm: VAR's l2-normalised attention (needed to load VAR d16 weights).
    norm_eps: LayerNorm epsilon.
    init_std: std of the weight init; None uses VAR's √(1/(3C)).
    init_adaln: VAR's `aln` (adaLN scale/shift weights and the head's adaLN).
    init_adaln_gamma: VAR's `alng` (adaLN gates; 1e-3 as for VAR d16).
    init_head: VAR's `hd` (factor on the output head's init).
    zero_init_cross_proj: start every cross-attention output projection at zero.
    stop_context_grad: stop gradients at the context features (saves the encoder's backward
      pass when the encoder is frozen by `mask_frozen`).
    cross_attention: False is the "w/o Cross-Attention" ablation: no context encoder and no
      cross-attention layers (no context parameters at all); the model is conditioned through
      adaLN on the mask family only, like VAR on its class, and ignores the context image.
    flat_tokens: the "w/o Token Hierarchy" ablation: every scale on the latent's full grid.
      `patch_nums` must then repeat one side (`from_fields` derives it from the tokenizer).
    remat: rematerialise blocks (and the encoder's blocks) in the backward pass: True, False or
      a `layers.REMAT_POLICIES` name ("full", "dots", "dots_no_batch").
    enc_ch, enc_ch_mult, enc_num_res_blocks, enc_z_channels, enc_using_sa, enc_using_mid_sa,
      enc_label_features, enc_norm_groups: sizes of the stage-1 encoder copied as context
      encoder (`context_encoder_fields(aqvae)` fills them from the tokenizer).
    dtype: compute dtype (e.g. bfloat16); norms, softmax, the residual stream and the logits are
      float32.
    param_dtype: parameter storage dtype.
  """

  depth: int = 16
  width: int = 1024
  num_heads: int = 16
  mlp_ratio: float = 4.0
  vocab_size: int = 4096
  z_channels: int = 32
  patch_nums: tuple[int, ...] = PATCH_NUMS
  num_families: int = 4
  cross_inner_dim: int | None = None
  context_levels: tuple[str, ...] = DEFAULT_CONTEXT_LEVELS
  context_map: tuple[int, ...] | None = None
  role: str = "student"
  prefix_noise_max: float = 0.0
  input_mode: str = "mean"
  drop_path_rate: float = 0.025
  attn_l2_norm: bool = True
  norm_eps: float = 1e-6
  init_std: float | None = None
  init_adaln: float = 0.5
  init_adaln_gamma: float = 1e-3
  init_head: float = 0.02
  zero_init_cross_proj: bool = False
  stop_context_grad: bool = False
  cross_attention: bool = True
  flat_tokens: bool = False
  remat: bool | str = False
  enc_ch: int = 160
  enc_ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
  enc_num_res_blocks: int = 2
  enc_z_channels: int = 32
  enc_using_sa: bool = True
  enc_using_mid_sa: bool = True
  enc_label_features: int = 256
  enc_norm_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  # ---- static properties -------------------------------------------------------------------------

  @property
  def seq_len(self) -> int:
    return sequence_length(self.patch_nums)

  @property
  def head_dim(self) -> int:
    return self.width // self.num_heads

  @property
  def drop_path_rates(self) -> tuple[float, ...]:
    """Per-block drop-path rate: `linspace(0, drop_path_rate, depth)`."""
    return tuple(float(r) for r in np.linspace(0.0, self.drop_path_rate, self.depth))

  @property
  def context_acc(self) -> int:
    """Acceleration label of the context image: 0 (R = 32) or the last level (FS)."""
    return 0 if self.role == "student" else len(self.patch_nums) - 1

  @property
  def block_context(self) -> tuple[int, ...]:
    if self.context_map is not None:
      return tuple(self.context_map)
    return default_context_map(self.depth, len(self.context_levels))

  def _check(self):
    if self.role not in ROLES:
      raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
    if self.input_mode not in INPUT_MODES:
      raise ValueError(f"input_mode must be one of {INPUT_MODES}, got {self.input_mode!r}")
    if self.width % self.num_heads or self._cross_inner % self.num_heads:
      raise ValueError(f"width/inner {self.width}/{self._cross_inner} vs {self.num_heads} heads")
    if self.flat_tokens and len(set(self.patch_nums)) != 1:
      raise ValueError(
        f"flat_tokens needs one token grid for every scale, got patch_nums {self.patch_nums} "
        "(build the model with from_fields, which derives them from the tokenizer)"
      )
    if not self.cross_attention:
      return
    cmap = self.block_context
    if len(cmap) != self.depth or not all(0 <= j < len(self.context_levels) for j in cmap):
      raise ValueError(f"context_map {cmap} must give a level of {self.context_levels} per block")

  @property
  def _cross_inner(self) -> int:
    return self.cross_inner_dim or self.width

  # ---- modules -----------------------------------------------------------------------------------

  def setup(self):
    self._check()
    c = self.width
    std = self.init_std if self.init_std is not None else math.sqrt(1.0 / (3 * c))
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.cross_attention:
      self.context_encoder = autoencoder.Encoder(
        ch=self.enc_ch,
        ch_mult=tuple(self.enc_ch_mult),
        num_res_blocks=self.enc_num_res_blocks,
        z_channels=self.enc_z_channels,
        using_sa=self.enc_using_sa,
        using_mid_sa=self.enc_using_mid_sa,
        film=True,
        label_features=self.enc_label_features,
        num_accelerations=len(self.patch_nums),
        num_families=self.num_families,
        remat=self.remat,
        norm_groups=self.enc_norm_groups,
        **kw,
      )
    self.class_emb = nn.Embed(self.num_families, c, embedding_init=_normal(std), **kw)
    self.word_embed = nn.Dense(c, kernel_init=_normal(std), **kw)
    self.lvl_embed = nn.Embed(len(self.patch_nums) - 1, c, embedding_init=_normal(std), **kw)
    self.pos_1LC = self.param("pos_1LC", _normal(std), (1, self.seq_len, c), self.param_dtype)
    block_cls = maybe_remat(CrossSelfBlock, self.remat, static_argnums=(6, 7))
    rates = self.drop_path_rates
    self.blocks = [
      block_cls(
        width=c,
        num_heads=self.num_heads,
        mlp_ratio=self.mlp_ratio,
        cross_inner_dim=self._cross_inner,
        drop_path=rates[i],
        depth=self.depth,
        attn_l2_norm=self.attn_l2_norm,
        norm_eps=self.norm_eps,
        init_std=std,
        init_adaln=self.init_adaln,
        init_adaln_gamma=self.init_adaln_gamma,
        zero_init_cross_proj=self.zero_init_cross_proj,
        cross_attention=self.cross_attention,
        **kw,
      )
      for i in range(self.depth)
    ]
    self.head_nm = _AdaLNBeforeHead(c, self.norm_eps, std, self.init_adaln, **kw)
    # Logits are an fp32 island; the head is ~2 % of the FLOPs.
    self.head = nn.Dense(
      self.vocab_size,
      kernel_init=_normal(std * self.init_head),
      dtype=island_dtype(self.dtype),
      param_dtype=self.param_dtype,
    )

  # ---- pieces ------------------------------------------------------------------------------------

  def condition(self, family_B: jax.Array) -> jax.Array:
    """adaLN condition `cond_BD` = embedding of the mask family."""
    return self.class_emb(family_B.astype(jnp.int32))

  def encode_context(self, context_BHW2: jax.Array, family_B: jax.Array) -> list:
    """Context tokens per level (`ctx_BNc` + 2-D sin-cos), None for levels no block uses (for
    every level without cross-attention)."""
    if not self.cross_attention:
      return [None] * len(self.context_levels)
    b = context_BHW2.shape[0]
    acc_B = jnp.full((b,), self.context_acc, jnp.int32)
    _, feats = self.context_encoder(
      autoencoder.to_model_input(context_BHW2), acc_B, family_B.astype(jnp.int32)
    )
    used = set(self.block_context)
    out = []
    for j, name in enumerate(self.context_levels):
      if j not in used:
        out.append(None)
        continue
      f_BXYc = _resolve_context(feats, name)
      if self.stop_context_grad:
        f_BXYc = jax.lax.stop_gradient(f_BXYc)
      _, x, y, c = f_BXYc.shape
      pos = jnp.asarray(sincos_2d(x, y, c), self.dtype)
      out.append(f_BXYc.reshape(b, x * y, c).astype(self.dtype) + pos)
    return out

  def _embed(self, x_BlZ: jax.Array, start: int, end: int) -> jax.Array:
    """`word_embed(x) + lvl_embed + pos_1LC` for sequence positions [start, end), float32."""
    lvl = jnp.asarray(level_ids(self.patch_nums)[start:end])
    h = self.word_embed(x_BlZ.astype(self.dtype)) + self.lvl_embed(lvl)[None]
    h = h + self.pos_1LC[:, start:end].astype(self.dtype)
    return h.astype(island_dtype(self.dtype))

  def _logits(self, x_BLC: jax.Array, cond_BD: jax.Array) -> jax.Array:
    return self.head(self.head_nm(x_BLC, cond_BD)).astype(jnp.float32)

  # ---- forward passes ----------------------------------------------------------------------------

  def __call__(
    self, x_BLZ: jax.Array, context_BHW2: jax.Array, family_B: jax.Array, train: bool = False
  ):
    """Teacher-forced logits for all L positions.

    Args:
      x_BLZ: inputs of the five predicted scales (`build_inputs`), concatenated.
      context_BHW2: context image `[real, imag]` (R = 32 for the student, FS for the teacher);
        unused without cross-attention.
      family_B: mask-family ids.
      train: enables drop path (needs the "dropout" rng).

    Returns:
      `(logits_BLV, aux)`: float32 logits; aux["cond_BD"] is the adaLN condition.
    """
    if x_BLZ.shape[1:] != (self.seq_len, self.z_channels):
      raise ValueError(f"expected inputs [B, {self.seq_len}, {self.z_channels}], got {x_BLZ.shape}")
    cond_BD = self.condition(family_B)
    ctx = self.encode_context(context_BHW2, family_B)
    mask_LL = block_causal_mask(self.patch_nums)
    h = self._embed(x_BLZ, 0, self.seq_len)
    for blk, j in zip(self.blocks, self.block_context, strict=True):
      h, _ = blk(h, cond_BD, ctx[j], mask_LL, None, 0, train)
    return self._logits(h, cond_BD), {"cond_BD": cond_BD}

  def prepare(self, context_BHW2: jax.Array, family_B: jax.Array) -> dict:
    """Per-sample state of the cached sampler: the condition and every block's context K/V
    (None per block without cross-attention)."""
    cond_BD = self.condition(family_B)
    ctx = self.encode_context(context_BHW2, family_B)
    kv = tuple(blk.cross_kv(ctx[j]) for blk, j in zip(self.blocks, self.block_context, strict=True))
    return {"cond_BD": cond_BD, "cross_kv": kv}

  def step(self, x_BlZ: jax.Array, k: int, prepared: dict, cache: tuple):
    """One cached step: logits of scale k (1..K−1) from its input, attending to the cache.

    Args:
      x_BlZ: input of scale k (`scale_input(h_list, k)`).
      k: the scale (static).
      prepared: `prepare(...)` output.
      cache: one `(k_BHLd, v_BHLd)` pair per block (`inference.init_cache`).

    Returns:
      `(logits_BlV, cache)` with the scale's keys/values written into the cache.
    """
    start, end = sequence_layout(self.patch_nums)[k - 1]
    if x_BlZ.shape[1] != end - start:
      raise ValueError(f"scale {k} has {end - start} positions, got {x_BlZ.shape}")
    cond_BD = prepared["cond_BD"]
    h = self._embed(x_BlZ, start, end)
    new_cache = []
    for blk, kv, c in zip(self.blocks, prepared["cross_kv"], cache, strict=True):
      kv = None if kv is None else tuple(kv)
      h, aux = blk(h, cond_BD, kv, None, tuple(c), start, False)
      new_cache.append(aux["cache"])
    return self._logits(h, cond_BD), tuple(new_cache)


class _AdaLNBeforeHead(nn.Module):
  """VAR's `AdaLNBeforeHead`: `LN(x)·(1 + scale) + shift` from `ada_lin(SiLU(cond))`."""

  width: int
  norm_eps: float
  init_std: float
  init_adaln: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BLC: jax.Array, cond_BD: jax.Array) -> jax.Array:
    c = self.width
    ada = nn.Dense(
      2 * c,
      kernel_init=_ada_init(self.init_std, c, 2, 0, 1.0, self.init_adaln),
      bias_init=nn.initializers.zeros,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="ada_lin",
    )(nn.silu(cond_BD.astype(self.dtype)))
    scale, shift = jnp.split(ada.astype(jnp.float32)[:, None, :], 2, axis=-1)
    return _layer_norm(x_BLC, self.norm_eps) * (1 + scale) + shift


def init_params(model: NextAccelTransformer, rng: jax.Array, image_size: int, batch: int = 1):
  """`{"params": ...}` for context images of side `image_size` (jitted: eager init is slow)."""
  x = jnp.zeros((batch, model.seq_len, model.z_channels), jnp.float32)
  ctx = jnp.zeros((batch, image_size, image_size, 2), jnp.float32)
  family = jnp.zeros((batch,), jnp.int32)
  return jax.jit(functools.partial(model.init, train=False))(rng, x, ctx, family)


def flat_patch_nums(patch_nums: Sequence[int]) -> tuple[int, ...]:
  """Every scale on the latent's grid (the last, finest side): `(16,) * 6` for the paper."""
  return (int(patch_nums[-1]),) * len(patch_nums)


def context_encoder_fields(tokenizer, flat_tokens: bool = False) -> dict[str, Any]:
  """Transformer fields that must agree with the stage-1 tokenizer.

  Args:
    tokenizer: an `AQVAE` module or a mapping of its fields (e.g. `config.model` of stage 1).
    flat_tokens: the transformer's `flat_tokens`: its `patch_nums` are then the tokenizer's
      latent side repeated (`flat_patch_nums`).

  Returns:
    `enc_*` sizes of the context encoder plus `vocab_size`, `z_channels` and `patch_nums`.
  """

  def get(name, default=None):
    if isinstance(tokenizer, Mapping):
      return tokenizer.get(name, default)
    return getattr(tokenizer, name, default)

  defaults = aqvae_lib.AQVAE()
  patch_nums = tuple(get("patch_nums", defaults.patch_nums))
  return dict(
    enc_ch=get("ch", defaults.ch),
    enc_ch_mult=tuple(get("ch_mult", defaults.ch_mult)),
    enc_num_res_blocks=get("num_res_blocks", defaults.num_res_blocks),
    enc_z_channels=get("z_channels", defaults.z_channels),
    enc_using_sa=get("using_sa", defaults.using_sa),
    enc_using_mid_sa=get("using_mid_sa", defaults.using_mid_sa),
    enc_label_features=get("label_features", defaults.label_features),
    enc_norm_groups=get("norm_groups", defaults.norm_groups),
    vocab_size=get("vocab_size", defaults.vocab_size),
    z_channels=get("z_channels", defaults.z_channels),
    patch_nums=flat_patch_nums(patch_nums) if flat_tokens else patch_nums,
  )


def from_fields(
  model_fields: Mapping[str, Any], tokenizer_fields, where: str = ""
) -> NextAccelTransformer:
  """The transformer of a config section or stored JSON fields (`fields.build`).

  The context encoder's sizes, `vocab_size`, `z_channels` and `patch_nums` are taken from the
  tokenizer (`context_encoder_fields`), so the two always agree; with `flat_tokens` the
  `patch_nums` are the tokenizer's latent side repeated.

  Args:
    model_fields: `NextAccelTransformer` fields, e.g. `config.model` (dtypes may be names).
    tokenizer_fields: The stage-1 `AQVAE` or a mapping of its fields (`config.tokenizer`).
    where: What to name in error messages.

  Raises:
    ValueError: An unknown field, or a given field that disagrees with the tokenizer (named).
  """
  where = where or "NextAccelTransformer fields"
  fields = dict(fields_lib.tuplify(dict(model_fields)))
  if isinstance(tokenizer_fields, Mapping):
    tokenizer_fields = fields_lib.tuplify(dict(tokenizer_fields))
  derived = context_encoder_fields(tokenizer_fields, bool(fields.get("flat_tokens", False)))
  for name, value in derived.items():
    if name in fields and fields[name] != value:
      raise ValueError(
        f"{where}: transformer field {name}={fields[name]!r} disagrees with the tokenizer, which "
        f"gives {value!r}"
      )
    fields[name] = value
  return fields_lib.build(NextAccelTransformer, fields, where)


__all__: Sequence[str] = (
  "DEFAULT_CONTEXT_LEVELS",
  "CrossAttention",
  "CrossSelfBlock",
  "FFN",
  "NextAccelTransformer",
  "SelfAttention",
  "allocate_counts",
  "block_causal_mask",
  "context_encoder_fields",
  "default_context_map",
  "flat_patch_nums",
  "from_fields",
  "init_params",
  "level_ids",
  "sequence_layout",
  "sequence_length",
  "sincos_2d",
)
