"""Multi-scale EMA vector quantizer of the AQ-VAE (decisions.md §3; var_spec.md §2, §5, §6.1–6.3).

Shape legend:
  B  batch
  K  scales (6: Q32, Q16, Q8, Q4, Q2, QFS), k indexes them
  h, w  latent grid side (16 = patch_nums[-1])
  p  token-grid side of one scale (pn_k ∈ 11..16)
  l  tokens of one scale (pn_k²), row-major over (p, p)
  C  codebook / latent channels (32)
  V  vocabulary size (4096)
  N  any number of flattened vectors

Unlike VAR's residual pyramid (var_spec.md §2.3), every scale quantises its *own* level's latent:
`z_k = area(f_k → pn_k)`, `idx_k = argmin ‖z_k − e‖²`, `h_k = Phi_k(bicubic(q̃_k → 16))` with
the rotation trick `q̃_k = rotate_to(z_k, e[idx_k])`, and the active scales are averaged (§6.2).
The shared codebook is updated by EMA with Laplace smoothing (§6.3) and lives in the non-param
collection `vq_ema`, so it never receives gradients. Every batch statistic is a plain sum over the
batch, which `jax.jit` makes global when the batch is sharded (style.md §4.5).

Parameter paths follow VAR's `quantize.quant_resi.qresi_ls.{j}` (var_spec.md §1.7):
`quant_resi/qresi_ls_{j}/kernel` and `/bias`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

PATCH_NUMS = (11, 12, 13, 14, 15, 16)

_HIGHEST = jax.lax.Precision.HIGHEST
# Below this norm a vector has no usable direction: the rotation falls back to the identity.
_NORM_EPS = 1e-6


# --------------------------------------------------------------------------------------------------
# Static resize tables (var_spec.md §2.6).


def area_matrix(out_size: int, in_size: int) -> np.ndarray:
  """PyTorch `mode='area'` (adaptive average pooling) along one axis, as an (out, in) matrix.

  Output i averages inputs `[floor(i·in/out), ceil((i+1)·in/out))`; windows overlap when the ratio
  is not an integer (var_spec.md §2.6).
  """
  mat = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    start = (i * in_size) // out_size
    end = -((-(i + 1) * in_size) // out_size)
    mat[i, start:end] = 1.0 / (end - start)
  return mat


def _keys_cubic(d: np.ndarray, a: float) -> np.ndarray:
  d = np.abs(d)
  near = ((a + 2) * d - (a + 3)) * d * d + 1
  far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
  return np.where(d <= 1, near, np.where(d < 2, far, 0.0))


def bicubic_matrix(out_size: int, in_size: int, a: float = -0.75) -> np.ndarray:
  """PyTorch `mode='bicubic'`, `align_corners=False`, no antialias, as an (out, in) matrix.

  Source coordinate `(i + 0.5)·in/out − 0.5` (not clamped, as in PyTorch's cubic path); the four
  taps are clamped to the border, so border weights accumulate (var_spec.md §2.6).
  """
  mat = np.zeros((out_size, in_size), np.float64)
  scale = in_size / out_size
  for i in range(out_size):
    x = (i + 0.5) * scale - 0.5
    x0 = int(np.floor(x))
    t = x - x0
    weights = _keys_cubic(np.array([t + 1, t, 1 - t, 2 - t]), a)
    for tap, wt in zip(range(x0 - 1, x0 + 3), weights, strict=True):
      mat[i, min(max(tap, 0), in_size - 1)] += wt
  return mat


def resize(x_BhwC: jax.Array, mat_out_in) -> jax.Array:
  """Separable square resize `M · X · Mᵀ` over the two spatial axes of an NHWC tensor."""
  mat = jnp.asarray(mat_out_in, dtype=x_BhwC.dtype)
  return jnp.einsum("oi,bijc,pj->bopc", mat, x_BhwC, mat, precision=_HIGHEST)


@functools.cache
def _resize_tables(patch_nums: tuple[int, ...]):
  """Per scale: (area side→pn, bicubic pn→side) float32 matrices, None where pn is the side."""
  side = patch_nums[-1]
  tables = []
  for pn in patch_nums:
    if pn == side:
      tables.append((None, None))
    else:
      tables.append(
        (
          area_matrix(pn, side).astype(np.float32),
          bicubic_matrix(side, pn).astype(np.float32),
        )
      )
  return tuple(tables)


def phi_index(k: int, num_scales: int = 6, num_convs: int = 4) -> int:
  """Which shared Phi conv scale k uses: VAR's nearest-tick rule (var_spec.md §2.2).

  `at = k/(num_scales−1)`; ticks are `linspace(1/(3K), 1−1/(3K), K)` for K = 4 convs and
  `linspace(1/(2K), 1−1/(2K), K)` otherwise; the first nearest tick wins. A single scale counts as
  the finest one (`at = 1`).
  """
  if not 0 <= k < num_scales:
    raise ValueError(f"scale {k} outside 0..{num_scales - 1}")
  at = k / (num_scales - 1) if num_scales > 1 else 1.0
  div = 3 if num_convs == 4 else 2
  ticks = np.linspace(1 / (div * num_convs), 1 - 1 / (div * num_convs), num_convs)
  return int(np.argmin(np.abs(ticks - at)))


# --------------------------------------------------------------------------------------------------
# Rotation trick (var_spec.md §5).


def rotate_to(z_NC: jax.Array, q_NC: jax.Array) -> jax.Array:
  """Rotation trick: returns q in value, with gradient `(‖q‖/‖z‖)·Rᵀ g` into z.

  `R = I − 2wwᵀ + 2q̂uᵀ` (u = z/‖z‖, q̂ = q/‖q‖, w = (u+q̂)/‖u+q̂‖) rotates u onto q̂; R and the norm
  ratio are constants, so the map is linear in z. q itself receives no gradient. Works on any
  leading shape (channels last); computed in float32.

  Degenerate cases stay finite: for z ≈ −q̂ (u + q̂ ≈ 0) w is dropped, leaving the reflection
  `I − 2q̂q̂ᵀ`, which still maps u to q̂; for ‖z‖ < 1e-6 the rotation is undefined and the gradient
  passes straight through (R = I, scale 1).
  """
  z = z_NC.astype(jnp.float32)
  q = jax.lax.stop_gradient(q_NC.astype(jnp.float32))
  z_sg = jax.lax.stop_gradient(z)
  z_norm = jnp.linalg.norm(z_sg, axis=-1, keepdims=True)
  q_norm = jnp.linalg.norm(q, axis=-1, keepdims=True)
  ok = z_norm >= _NORM_EPS
  u = jnp.where(ok, z_sg / jnp.maximum(z_norm, _NORM_EPS), 0.0)
  q_hat = q / jnp.maximum(q_norm, _NORM_EPS)
  v = u + q_hat
  v_norm = jnp.linalg.norm(v, axis=-1, keepdims=True)
  w = jnp.where(ok & (v_norm >= _NORM_EPS), v / jnp.maximum(v_norm, _NORM_EPS), 0.0)
  scale = jnp.where(ok, q_norm / jnp.maximum(z_norm, _NORM_EPS), 1.0)
  w_dot_z = jnp.sum(w * z, axis=-1, keepdims=True)
  u_dot_z = jnp.sum(u * z, axis=-1, keepdims=True)
  rotated = scale * (z - 2.0 * w_dot_z * w + 2.0 * u_dot_z * q_hat)
  # R·z equals q only up to rounding (and not at all in the fallback); pin the value to q.
  return rotated + jax.lax.stop_gradient(q - rotated)


# --------------------------------------------------------------------------------------------------
# Phi (var_spec.md §2.2).


class Phi(nn.Module):
  """`h → (1−r)·h + r·conv3×3(h)` with `r = |quant_resi|`; identity when r < 1e-6 (VAR's Phi).

  Owns `kernel` (3, 3, C, C) and `bias` (C,) directly so the path is `…/qresi_ls_{j}/kernel`.
  """

  features: int
  quant_resi: float = 0.5
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, h_BhwC: jax.Array) -> jax.Array:
    r = abs(self.quant_resi)
    if r < 1e-6:
      return h_BhwC
    c_in = h_BhwC.shape[-1]
    kernel = self.param(
      "kernel", nn.initializers.lecun_normal(), (3, 3, c_in, self.features), self.param_dtype
    )
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
    h = h_BhwC.astype(self.dtype)
    conv = jax.lax.conv_general_dilated(
      h,
      kernel.astype(self.dtype),
      window_strides=(1, 1),
      padding=((1, 1), (1, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    return (1.0 - r) * h + r * (conv + bias.astype(self.dtype))


class PhiPartiallyShared(nn.Module):
  """`num_phi` Phi convs shared across scales by `phi_index` (VAR's PhiPartiallyShared)."""

  features: int
  num_phi: int = 4
  num_scales: int = 6
  quant_resi: float = 0.5
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.qresi_ls = [
      Phi(self.features, self.quant_resi, dtype=self.dtype, param_dtype=self.param_dtype)
      for _ in range(self.num_phi)
    ]

  def __call__(self, h_BhwC: jax.Array, k: int) -> jax.Array:
    if self.is_initializing():
      # Short scale tables can skip some convs; create them all so checkpoints always match.
      for phi in self.qresi_ls:
        phi(h_BhwC)
    return self.qresi_ls[phi_index(k, self.num_scales, self.num_phi)](h_BhwC)


# --------------------------------------------------------------------------------------------------
# The quantizer.


def combine_contributions(h_BKhwC, active_BK: jax.Array) -> jax.Array:
  """`Σ_k m_k h_k / max(Σ_k m_k, 1)`; `h_BKhwC` may also be a list of per-scale `h_BhwC`."""
  if isinstance(h_BKhwC, (list, tuple)):
    h_BKhwC = jnp.stack(h_BKhwC, axis=1)
  m_BK = active_BK.astype(jnp.float32)
  den_B = jnp.maximum(m_BK.sum(axis=1), 1.0)
  num_BhwC = jnp.einsum("bk,bkhwc->bhwc", m_BK, h_BKhwC.astype(jnp.float32), precision=_HIGHEST)
  return (num_BhwC / den_B[:, None, None, None]).astype(h_BKhwC.dtype)


def _nearest_code(z_NC: jax.Array, embed_VC: jax.Array) -> jax.Array:
  """argmin_v ‖z − e_v‖² as ‖z‖² + ‖e‖² − 2 z·eᵀ, in float32 at full matmul precision."""
  z = z_NC.astype(jnp.float32)
  e = embed_VC.astype(jnp.float32)
  dist_NV = (
    jnp.sum(z * z, axis=-1, keepdims=True)
    + jnp.sum(e * e, axis=-1)[None, :]
    - 2.0 * jnp.matmul(z, e.T, precision=_HIGHEST)
  )
  return jnp.argmin(dist_NV, axis=-1).astype(jnp.int32)


def kmeans_plus_plus(x_NC: jax.Array, k: int, rng: jax.Array) -> jax.Array:
  """`k` rows of `x_NC` picked by k-means++ seeding, `[k, C]` float32.

  The first row is uniform over the N latents; row i is drawn with probability
  `d_n² / Σ_m d_m²`, where `d_n` is latent n's distance to the nearest row picked so far. Every
  pick is a real latent, so each code starts as the nearest code of at least one latent, and the
  picks spread over the distribution: a flat background, thousands of near-identical latents,
  gets a few codes rather than most of them. When fewer than `k` distinct latents exist the
  remaining draws repeat picked ones. O(k·N·C) in a `fori_loop`; the draw is an inverse-CDF
  lookup, so memory stays O(N).
  """
  x = x_NC.astype(jnp.float32)
  n = x.shape[0]
  keys = jax.random.split(rng, k)

  def sq_dist_N(c_C):
    return jnp.sum(jnp.square(x - c_C), axis=-1)

  first = x[jax.random.randint(keys[0], (), 0, n)]
  centers_kC = jnp.zeros((k, x.shape[1]), jnp.float32).at[0].set(first)

  def pick(i, carry):
    centers_kC, d2_N = carry
    cum_N = jnp.cumsum(d2_N)
    u = jax.random.uniform(keys[i]) * cum_N[-1]
    c_C = x[jnp.clip(jnp.searchsorted(cum_N, u, side="right"), 0, n - 1)]
    return centers_kC.at[i].set(c_C), jnp.minimum(d2_N, sq_dist_N(c_C))

  centers_kC, _ = jax.lax.fori_loop(1, k, pick, (centers_kC, sq_dist_N(first)))
  return centers_kC


class MultiScaleQuantizer(nn.Module):
  """AQ-VAE quantizer: per-level area resize, shared EMA codebook, rotation trick, Phi, average.

  Attributes:
    vocab_size: codebook entries V.
    dim: code / latent channels C.
    patch_nums: token-grid side per scale, coarse (Q32) first; the last equals the latent side.
    num_phi: shared Phi convs (VAR's released VAE: 4).
    quant_resi: Phi blend ratio r.
    ema_decay: EMA decay d of `cluster_size` and `embed_avg`.
    eps: Laplace smoothing constant of the cluster sizes.
    beta: commitment weight applied to `aux["commitment"]`.
    restart_threshold: codes whose EMA cluster size falls below this are re-seeded with random
      active latents of the current batch (0 disables; needs an rng named "vq" when training).
      Small codebooks trained from scratch otherwise keep most codes dead, because VAR's tiny
      initial codes are never the nearest to anything once the used codes move onto the data.
    dtype: compute dtype of the Phi convs and of the returned latents; distances, the rotation and
      all statistics stay float32.
    param_dtype: storage dtype of the Phi params (the codebook is always float32).
  """

  vocab_size: int = 4096
  dim: int = 32
  patch_nums: tuple[int, ...] = PATCH_NUMS
  num_phi: int = 4
  quant_resi: float = 0.5
  ema_decay: float = 0.99
  eps: float = 1e-5
  beta: float = 0.25
  restart_threshold: float = 0.0
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    v, c = self.vocab_size, self.dim
    # VAR's `eini(-1)` rule, uniform(−1/V, 1/V): tiny codes that the first EMA steps pull onto the
    # data; `embed_avg = embed` and `cluster_size = 1` keep unused codes in place (§6.3). A
    # codebook converted from VAR replaces all three.
    self.embed = self.variable(
      "vq_ema",
      "embed",
      lambda: jax.random.uniform(self.make_rng("params"), (v, c), jnp.float32, -1.0 / v, 1.0 / v),
    )
    self.embed_avg = self.variable("vq_ema", "embed_avg", lambda: self.embed.value)
    self.cluster_size = self.variable("vq_ema", "cluster_size", lambda: jnp.ones((v,), jnp.float32))
    # The field `quant_resi` is the blend ratio; the container takes VAR's name explicitly.
    self.phi = PhiPartiallyShared(
      self.dim,
      num_phi=self.num_phi,
      num_scales=len(self.patch_nums),
      quant_resi=self.quant_resi,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="quant_resi",
    )

  # ---- helpers -----------------------------------------------------------------------------------

  @property
  def _side(self) -> int:
    return self.patch_nums[-1]

  def _check_latent(self, f_BhwC: jax.Array) -> None:
    if f_BhwC.shape[1:] != (self._side, self._side, self.dim):
      raise ValueError(f"latent {f_BhwC.shape} is not [B, {self._side}, {self._side}, {self.dim}]")

  def _downsample(self, f_BhwC: jax.Array, k: int) -> jax.Array:
    """`z_k` on scale k's token grid (float32); identity at the latent side."""
    self._check_latent(f_BhwC)
    area, _ = _resize_tables(tuple(self.patch_nums))[k]
    f = f_BhwC.astype(jnp.float32)
    return f if area is None else resize(f, area)

  def _contribution(self, q_BppC: jax.Array, k: int) -> jax.Array:
    """`Phi_k(bicubic(q → side))`."""
    _, bicubic = _resize_tables(tuple(self.patch_nums))[k]
    q = q_BppC.astype(jnp.float32)
    up = q if bicubic is None else resize(q, bicubic)
    return self.phi(up, k)

  def _codebook(self) -> jax.Array:
    return jax.lax.stop_gradient(self.embed.value.astype(jnp.float32))

  # ---- stage-2 API -------------------------------------------------------------------------------

  def tokenize_scale(self, f_BhwC: jax.Array, k: int) -> jax.Array:
    """Token ids of one level's latent at scale k: `idx_Bl`, l = pn_k², int32 (§6.2 step 3)."""
    z_BppC = jax.lax.stop_gradient(self._downsample(f_BhwC, k))
    b, p = z_BppC.shape[0], z_BppC.shape[1]
    return _nearest_code(z_BppC.reshape(-1, self.dim), self._codebook()).reshape(b, p * p)

  def tokenize(self, f_BKhwC: jax.Array) -> list[jax.Array]:
    """Scale k tokenises level k's latent `f[:, k]`; returns `[idx_Bl]` coarse first."""
    self._check_levels(f_BKhwC)
    return [self.tokenize_scale(f_BKhwC[:, k], k) for k in range(len(self.patch_nums))]

  def scale_latents(self, f_BKhwC: jax.Array) -> jax.Array:
    """Every latent the codebook is matched against: level k at scale k's grid, `[N, C]`
    float32 with N = B·Σ_k pn_k², no gradient (the sample a data-dependent codebook starts
    from)."""
    self._check_levels(f_BKhwC)
    return jnp.concatenate(
      [
        jax.lax.stop_gradient(self._downsample(f_BKhwC[:, k], k)).reshape(-1, self.dim)
        for k in range(len(self.patch_nums))
      ]
    )

  def lookup(self, idx_Bl: jax.Array, k: int) -> jax.Array:
    """Contribution `h_BhwC = Phi_k(bicubic(e[idx]))` of scale k's tokens (no rotation trick)."""
    pn = self.patch_nums[k]
    if idx_Bl.shape[-1] != pn * pn:
      raise ValueError(f"scale {k} has {pn * pn} tokens, got idx of shape {idx_Bl.shape}")
    q_BlC = jnp.take(self._codebook(), idx_Bl, axis=0)
    q_BppC = q_BlC.reshape(idx_Bl.shape[0], pn, pn, self.dim)
    return self._contribution(q_BppC, k).astype(self.dtype)

  def combine(self, h, active_BK: jax.Array) -> jax.Array:
    """Average of the active scales: `Σ_k m_k h_k / max(Σ_k m_k, 1)` (§6.2 step 5)."""
    return combine_contributions(h, active_BK).astype(self.dtype)

  def _check_levels(self, f_BKhwC: jax.Array) -> None:
    if f_BKhwC.ndim != 5 or f_BKhwC.shape[1] != len(self.patch_nums):
      raise ValueError(
        f"expected f of shape [B, {len(self.patch_nums)}, h, w, C], got {f_BKhwC.shape}"
      )

  # ---- training forward --------------------------------------------------------------------------

  def __call__(self, f_BKhwC: jax.Array, active_BK: jax.Array, train: bool):
    """Quantises every level at its scale and averages the active contributions.

    Args:
      f_BKhwC: the K per-level latents (level k feeds scale k).
      active_BK: float/bool mask of scales taking part; shapes stay static, inactive scales are
        computed but excluded from f_hat, the commitment, the statistics and the EMA update.
      train: update the `vq_ema` codebook (only if that collection is mutable).

    Returns:
      `(f_hat_BhwC, aux)` with `idx` (list of `idx_Bl`, int32), `commitment` (β-weighted mean over
      active (sample, scale) pairs), `commitment_per_scale` [K] (unweighted), `usage_per_scale` [K]
      (fraction of the vocabulary hit by active tokens), `perplexity_per_scale` [K] and `h`
      (per-scale contributions `[B, K, h, w, C]`).
    """
    self._check_levels(f_BKhwC)
    v = self.vocab_size
    if active_BK.shape != f_BKhwC.shape[:2]:
      raise ValueError(f"active mask {active_BK.shape} does not match {f_BKhwC.shape[:2]}")
    m_BK = active_BK.astype(jnp.float32)
    embed_VC = self._codebook()

    idx_list, h_list, mse_list, stats_list, pool, pool_w = [], [], [], [], [], []
    for k, pn in enumerate(self.patch_nums):
      z_BppC = self._downsample(f_BKhwC[:, k], k)
      b = z_BppC.shape[0]
      z_sg_NC = jax.lax.stop_gradient(z_BppC).reshape(-1, self.dim)
      idx_N = _nearest_code(z_sg_NC, embed_VC)
      q_BppC = jnp.take(embed_VC, idx_N, axis=0).reshape(z_BppC.shape)
      h_list.append(self._contribution(rotate_to(z_BppC, q_BppC), k))
      idx_list.append(idx_N.reshape(b, pn * pn))
      mse_list.append(jnp.mean(jnp.square(z_BppC - q_BppC), axis=(1, 2, 3)))

      # One scatter gives both the weighted sums of assigned z (first C) and the counts (last);
      # it sums over the batch axis, which is global under jit even when the batch is sharded.
      w_N1 = jnp.broadcast_to(m_BK[:, k, None], (b, pn * pn)).reshape(-1, 1)
      zw_NC1 = jnp.concatenate([z_sg_NC * w_N1, w_N1], axis=1)
      stats_list.append(jax.ops.segment_sum(zw_NC1, idx_N, num_segments=v))
      pool.append(z_sg_NC)
      pool_w.append(w_N1[:, 0])

    h_BKhwC = jnp.stack(h_list, axis=1)
    f_hat_BhwC = combine_contributions(h_BKhwC, m_BK)

    mse_BK = jnp.stack(mse_list, axis=1)
    commit_per_scale_K = (m_BK * mse_BK).sum(0) / jnp.maximum(m_BK.sum(0), 1.0)
    commitment = self.beta * (m_BK * mse_BK).sum() / jnp.maximum(m_BK.sum(), 1.0)

    stats_KVC1 = jnp.stack(stats_list)
    counts_KV = stats_KVC1[..., -1]
    usage_K = jnp.mean((counts_KV > 0).astype(jnp.float32), axis=1)
    probs_KV = counts_KV / jnp.maximum(counts_KV.sum(axis=1, keepdims=True), 1e-12)
    entropy_K = -jnp.sum(jax.scipy.special.xlogy(probs_KV, probs_KV), axis=1)

    restarted = jnp.zeros((), jnp.float32)
    if train and self.is_mutable_collection("vq_ema") and not self.is_initializing():
      restarted = self._ema_update(
        counts_KV.sum(0),
        stats_KVC1[..., :-1].sum(0),
        jnp.concatenate(pool, axis=0),
        jnp.concatenate(pool_w, axis=0),
      )

    aux = {
      "idx": idx_list,
      "commitment": commitment,
      "commitment_per_scale": commit_per_scale_K,
      "usage_per_scale": usage_K,
      "perplexity_per_scale": jnp.exp(entropy_K),
      "h": h_BKhwC.astype(self.dtype),
      "restarted_codes": restarted,
    }
    return f_hat_BhwC.astype(self.dtype), aux

  def _ema_update(self, counts_V, sums_VC, pool_NC, pool_w_N) -> jax.Array:
    """EMA of counts and assigned sums, Laplace-smoothed normalisation (var_spec.md §5, §6.3).

    Returns the number of re-seeded codes (0 unless `restart_threshold` > 0).
    """
    d = self.ema_decay
    cluster_V = d * self.cluster_size.value + (1.0 - d) * counts_V
    embed_avg_VC = d * self.embed_avg.value + (1.0 - d) * sums_VC
    restarted = jnp.zeros((), jnp.float32)
    if self.restart_threshold > 0:
      dead_V = cluster_V < self.restart_threshold
      # Inverse-CDF sampling over the active tokens: O(V log N), unlike a [V, N] categorical.
      cum_N = jnp.cumsum(pool_w_N)
      u_V = jax.random.uniform(self.make_rng("vq"), (self.vocab_size,)) * cum_N[-1]
      pick_V = jnp.clip(jnp.searchsorted(cum_N, u_V, side="right"), 0, pool_NC.shape[0] - 1)
      seed_VC = jnp.take(pool_NC, pick_V, axis=0)
      # A re-seeded code starts as one observation of its latent, like the initial state.
      cluster_V = jnp.where(dead_V, 1.0, cluster_V)
      embed_avg_VC = jnp.where(dead_V[:, None], seed_VC, embed_avg_VC)
      restarted = dead_V.sum().astype(jnp.float32)
    n = cluster_V.sum()
    smoothed_V = (cluster_V + self.eps) / (n + self.vocab_size * self.eps) * n
    self.cluster_size.value = cluster_V
    self.embed_avg.value = embed_avg_VC
    self.embed.value = embed_avg_VC / smoothed_V[:, None]
    return restarted


__all__: Sequence[str] = (
  "PATCH_NUMS",
  "MultiScaleQuantizer",
  "Phi",
  "PhiPartiallyShared",
  "area_matrix",
  "bicubic_matrix",
  "combine_contributions",
  "kmeans_plus_plus",
  "phi_index",
  "resize",
  "rotate_to",
)
