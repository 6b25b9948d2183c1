"""AQ-VAE: the acceleration-conditioned multi-scale tokenizer of stage 1 (decisions.md §3,
var_spec.md §6.2).

Shape legend: B batch, K = 6 levels (R = 32, 16, 8, 4, 2, FS), H×W image grid, h×w = 16×16
latent grid, Z latent channels (32), l = pn_k² tokens of scale k, V codebook size.

Every level is encoded by one shared FiLM encoder (label = acceleration index k + mask family),
quantised at its own token grid (11² … 16²) against one EMA codebook, mapped back to 16² by
bicubic + Phi, and the active scales' contributions are averaged into `f_hat`, which the
decoder turns into the FS image.

Parameter paths follow VAR's VQ-VAE (`encoder`, `quant_conv`, `quantize/quant_resi/qresi_ls_{j}`,
`post_quant_conv`, `decoder`), so `convert.var_vae` converts `vae_ch160v4096z32.pth`
mechanically (var_spec.md §1.7). The codebook is not a parameter: it lives in the `vq_ema`
collection.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nextaccel_jax.models import autoencoder
from nextaccel_jax.models import fields as fields_lib
from nextaccel_jax.models.quantizer import PATCH_NUMS, MultiScaleQuantizer

NUM_LEVELS = len(PATCH_NUMS)


def _conv3(features: int, dtype, param_dtype, name: str) -> nn.Conv:
  return nn.Conv(
    features, (3, 3), padding=((1, 1), (1, 1)), dtype=dtype, param_dtype=param_dtype, name=name
  )


class AQVAE(nn.Module):
  """Encoder + multi-scale EMA quantizer + decoder. Sizes default to the paper (VAR's VQ-VAE)."""

  ch: int = 160
  ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  z_channels: int = 32
  using_sa: bool = True
  using_mid_sa: bool = True
  label_features: int = 256
  vocab_size: int = 4096
  patch_nums: Sequence[int] = PATCH_NUMS
  num_phi: int = 4
  quant_resi: float = 0.5
  ema_decay: float = 0.99
  beta: float = 0.25
  restart_threshold: float = 0.0
  remat: bool | str = False
  norm_groups: int = 32
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    size = dict(
      ch=self.ch,
      ch_mult=tuple(self.ch_mult),
      num_res_blocks=self.num_res_blocks,
      z_channels=self.z_channels,
      using_sa=self.using_sa,
      using_mid_sa=self.using_mid_sa,
      remat=self.remat,
      norm_groups=self.norm_groups,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
    )
    self.encoder = autoencoder.Encoder(film=True, label_features=self.label_features, **size)
    self.quant_conv = _conv3(self.z_channels, self.dtype, self.param_dtype, "quant_conv")
    self.quantize = MultiScaleQuantizer(
      vocab_size=self.vocab_size,
      dim=self.z_channels,
      patch_nums=tuple(self.patch_nums),
      num_phi=self.num_phi,
      quant_resi=self.quant_resi,
      ema_decay=self.ema_decay,
      beta=self.beta,
      restart_threshold=self.restart_threshold,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
    )
    self.post_quant_conv = _conv3(self.z_channels, self.dtype, self.param_dtype, "post_quant_conv")
    self.decoder = autoencoder.Decoder(**size)

  # ----------------------------------------------------------------------------------------------
  # The API later stages use.

  def encode(self, x_BHW2: jax.Array, acc_B: jax.Array, family_B: jax.Array):
    """Latent `f_BhwZ` (after quant_conv) and the encoder's context features (`feats`)."""
    h, feats = self.encoder(autoencoder.to_model_input(x_BHW2), acc_B, family_B)
    return self.quant_conv(h), feats

  def tokenize(self, f_BKhwZ: jax.Array) -> list[jax.Array]:
    """Token ids per scale: scale k quantises level k's latent at pn_k² (`idx_Bl`, int32)."""
    return self.quantize.tokenize(f_BKhwZ)

  def tokenize_scale(self, f_BhwZ: jax.Array, k: int) -> jax.Array:
    return self.quantize.tokenize_scale(f_BhwZ, k)

  def lookup(self, idx_Bl: jax.Array, k: int) -> jax.Array:
    """Contribution `h_k` of scale k's tokens on the 16² grid (no rotation trick)."""
    return self.quantize.lookup(idx_Bl, k)

  def combine(self, h, active_BK: jax.Array) -> jax.Array:
    """Mean of the active scales' contributions: `Σ m_k h_k / Σ m_k`."""
    return self.quantize.combine(h, active_BK)

  def decode(self, f_hat_BhwZ: jax.Array) -> jax.Array:
    """Complex image `[B, H, W, 2]` from the fused latent (decoder channel 2 is ignored)."""
    y, _ = self.decoder(self.post_quant_conv(f_hat_BhwZ))
    return autoencoder.from_model_output(y)

  def encode_levels(self, levels_BKHW2: jax.Array, family_B: jax.Array):
    """Encodes all K levels as one batch of B·K images with labels (k, family)."""
    b, k = levels_BKHW2.shape[:2]
    acc = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (b, k)).reshape(-1)
    fam = jnp.repeat(family_B.astype(jnp.int32), k)
    f, feats = self.encode(levels_BKHW2.reshape(b * k, *levels_BKHW2.shape[2:]), acc, fam)
    return f.reshape(b, k, *f.shape[1:]), feats

  def codebook_latents(self, levels_BKHW2: jax.Array, family_B: jax.Array) -> jax.Array:
    """The latents the six levels are quantised from, `[B·Σ_k pn_k², Z]` float32: what the
    codebook is initialised from (`quantizer.kmeans_plus_plus`)."""
    f_BKhwZ, _ = self.encode_levels(levels_BKHW2, family_B)
    return self.quantize.scale_latents(f_BKhwZ)

  def __call__(
    self,
    levels_BKHW2: jax.Array,
    family_B: jax.Array,
    active_BK: jax.Array | None = None,
    train: bool = False,
  ):
    """Reconstructs the FS image from the active levels.

    Args:
      levels_BKHW2: the six levels, `[real, imag]` channels, R = 32 first and FS last.
      family_B: mask family ids (masks.FAMILIES order).
      active_BK: which scales are averaged (all six when None).
      train: update the EMA codebook (needs `mutable=["vq_ema"]`).

    Returns:
      `(x_hat_BHW2, aux)`; aux holds the quantizer's terms (`commitment`, `idx`, usage and
      perplexity per scale) and `f_hat`.
    """
    b, k = levels_BKHW2.shape[:2]
    if active_BK is None:
      active_BK = jnp.ones((b, k), jnp.float32)
    f_BKhwZ, _ = self.encode_levels(levels_BKHW2, family_B)
    f_hat, aux = self.quantize(f_BKhwZ, active_BK, train=train)
    x_hat = self.decode(f_hat)
    return x_hat, {**aux, "f_hat": f_hat}

  def reconstruct(self, levels_BKHW2, family_B, active_BK=None):
    """Evaluation-mode reconstruction (no codebook update)."""
    x_hat, _ = self(levels_BKHW2, family_B, active_BK, train=False)
    return x_hat


def init_variables(model: AQVAE, rng: jax.Array, image_size: int, batch: int = 1):
  """Initialises `{"params", "vq_ema"}` for images of side `image_size`."""
  levels = jnp.zeros((batch, NUM_LEVELS, image_size, image_size, 2), jnp.float32)
  family = jnp.zeros((batch,), jnp.int32)
  # Jitted: eager init runs every initializer op by op, which is slow on CPU for big models.
  return jax.jit(functools.partial(model.init, train=False))(rng, levels, family)


def from_fields(fields: Mapping[str, Any], where: str = "", **overrides) -> AQVAE:
  """The AQ-VAE of a config section or stored JSON fields (`fields.build`), `overrides` on top.

  Stage 2 passes `remat=False`: the frozen tokenizer only runs forward.
  """
  return fields_lib.build(AQVAE, {**dict(fields), **overrides}, where or "AQVAE fields")


def min_image_size(ch_mult: Sequence[int], latent: int = 16) -> int:
  """The image side giving a `latent`² grid: each level but the last halves the resolution."""
  return latent * 2 ** (len(ch_mult) - 1)
