"""Projected discriminator of stage 1: frozen BiomedCLIP ViT + spectral-normalised token heads.

Shape legend:
  B: batch size; H, W: magnitude-image size; S: tower input side (224).
  N: tower tokens with CLS (197); L = N - 1 patch tokens (196); C: tower width (768).
  K: number of heads (4: blocks 2, 5, 8, 11).

Design (biomedclip_lpips_spec.md §3, re-implemented from that description):
  * Readout: the CLS token is added to every patch token of a block output, `[B, L, C]`.
  * Head (unconditional, per feature level): `h = blk1(x); h = (blk9(h) + h) / √2;
    logits = SNConv(C→1, k=1)(h)`, where `blkk` is a spectral-normalised Conv1d over the token
    axis (kernel k, circular padding over the flattened token sequence), a batch-statistics
    BatchNorm over virtual batches of 8, and LeakyReLU(0.2). Output `[B, L]`.
  * One prediction per image: the K heads' token logits concatenated to `[B, K·L]`; the LSGAN
    losses (`losses.lsgan_d_loss`, `losses.lsgan_g_loss`) average over them ("tokens") or first
    per image ("image"), spec §3.3.

Variable collections of `Discriminator`:
  * `params`: the heads, the only trainable parameters (23.6 M at paper size).
  * `tower`: the BiomedCLIP tower's parameter tree, exactly `biomedclip.BiomedCLIPVision`'s
    `params` (so `biomedclip.from_torch_state_dict(sd)[0]` drops in). Always behind `stop_gradient`.
  * `spectral`: the power-iteration vectors u, v of every spectral-normalised conv. Updated by a
    call with `train=True` and `mutable=["spectral"]`; read only with `train=False`.

Training-step usage:

  disc = paper_discriminator()
  variables = init_variables(disc, rng, tower_params=biomedclip_params)
  head_params, tower, sn = variables["params"], variables["tower"], variables["spectral"]
  # D step: call real and fake separately (BatchNorm statistics are per call), threading `sn`.
  (real_BT, _), upd = disc.apply({"params": head_params, "tower": tower, "spectral": sn},
                                 real_BHW, scale_B, train=True, mutable=["spectral"])
  (fake_BT, _), upd = disc.apply({..., "spectral": upd["spectral"]},
                                 stop_gradient(fake_BHW), scale_B, train=True,
                                 mutable=["spectral"])
  d_loss = losses.lsgan_d_loss(real_BT, fake_BT)
  # G step: stored u, v, no update; gradient reaches fake_BHW through the frozen tower.
  fake_BT, _ = disc.apply({"params": head_params, "tower": tower, "spectral": sn},
                          fake_BHW, scale_B, train=False)
  g_adv = losses.lsgan_g_loss(fake_BT)

`scale_B` is the per-image normaliser of the magnitude (take it from the target and pass the same
one for real and reconstructed images). With `augment=True`, DiffAugment-style brightness,
contrast, translation and cutout are applied to every input and an `"augment"` rng is required;
the paper does not mention augmentation, so it is off by default (spec §3.4).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nextaccel_jax.models import biomedclip

TOWER = "tower"
SPECTRAL = "spectral"
# Power iterations run once at initialisation so that u, v start near the top singular pair and
# eval-mode logits of a fresh discriminator are already on the right scale.
_INIT_POWER_ITERATIONS = 15


def _normalize(x: jax.Array, eps: float) -> jax.Array:
  return x / jnp.maximum(jnp.linalg.norm(x), eps)


class SNConv1d(nn.Module):
  """Conv1d over tokens (`[B, L, C]`) with spectral normalisation and circular padding.

  The kernel is stored as `(k, C_in, C_out)`; spectral normalisation views it as the torch
  matrix `(C_out, C_in·k)` (C_in major), so u has C_out entries and v has C_in·k. One power
  iteration per training call, as torch's `spectral_norm(n_power_iterations=1)`; σ = uᵀWv with
  u, v held constant for the gradient.
  """

  features: int
  kernel_size: int = 1
  use_bias: bool = True
  eps: float = 1e-12
  precision: Any = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BLC: jax.Array, update_stats: bool = False) -> jax.Array:
    k, cin = self.kernel_size, x_BLC.shape[-1]
    if k % 2 != 1:
      raise ValueError(f"kernel_size must be odd (same-length output), got {k}")
    kernel = self.param(
      "kernel",
      nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"),
      (k, cin, self.features),
      self.param_dtype,
    )
    w_OI = jnp.transpose(kernel.astype(jnp.float32), (2, 1, 0)).reshape(self.features, cin * k)

    hi = jax.lax.Precision.HIGHEST

    def power_step(w, u):
      v = _normalize(jnp.dot(w.T, u, precision=hi), self.eps)
      return _normalize(jnp.dot(w, v, precision=hi), self.eps), v

    def init_uv():
      # A fixed start vector: any u not orthogonal to the top left-singular vector converges,
      # and it spares an rng draw per layer.
      u = jnp.full((self.features,), self.features**-0.5, jnp.float32)
      w = jax.lax.stop_gradient(w_OI)
      return jax.lax.fori_loop(
        0, _INIT_POWER_ITERATIONS, lambda _, uv: power_step(w, uv[0]), power_step(w, u)
      )

    fresh = None if self.has_variable(SPECTRAL, "u") else init_uv()
    u_var = self.variable(SPECTRAL, "u", lambda: fresh[0])
    v_var = self.variable(SPECTRAL, "v", lambda: fresh[1])
    u, v = u_var.value, v_var.value
    if update_stats and not self.is_initializing():
      u, v = power_step(jax.lax.stop_gradient(w_OI), u)
      u_var.value, v_var.value = u, v
    u, v = jax.lax.stop_gradient(u), jax.lax.stop_gradient(v)
    sigma = jnp.dot(u, jnp.dot(w_OI, v, precision=hi), precision=hi)
    kernel_kIO = (kernel.astype(jnp.float32) / sigma).astype(self.dtype)

    x = x_BLC.astype(self.dtype)
    if k > 1:
      # Wraps over the flattened token sequence, not per grid row, as torch's circular mode.
      x = jnp.pad(x, ((0, 0), (k // 2, k // 2), (0, 0)), mode="wrap")
    y = jax.lax.conv_general_dilated(
      x,
      kernel_kIO,
      window_strides=(1,),
      padding="VALID",
      dimension_numbers=("NWC", "WIO", "NWC"),
      precision=self.precision,
    )
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


class BatchNormLocal(nn.Module):
  """BatchNorm over virtual batches with no running statistics (train and eval alike).

  The batch splits into G = ceil(B / virtual_batch) consecutive groups; each group is normalised
  with its own mean and biased variance over (group members, tokens) per channel. B must be a
  multiple of G. Runs in fp32.
  """

  virtual_batch: int = 8
  eps: float = 1e-5
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BLC: jax.Array) -> jax.Array:
    b, n, c = x_BLC.shape
    g = math.ceil(b / self.virtual_batch)
    if b % g:
      raise ValueError(
        f"batch {b} splits into {g} virtual batches of {self.virtual_batch} unevenly; use a "
        f"multiple of {g}"
      )
    x = x_BLC.astype(jnp.float32).reshape(g, b // g, n, c)
    mean = x.mean(axis=(1, 2), keepdims=True)
    var = jnp.square(x - mean).mean(axis=(1, 2), keepdims=True)
    x = ((x - mean) * jax.lax.rsqrt(var + self.eps)).reshape(b, n, c)
    scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
    return x * scale.astype(jnp.float32) + bias.astype(jnp.float32)


class SNBlock(nn.Module):
  """SNConv1d(k) → BatchNormLocal → LeakyReLU(0.2), width preserved."""

  kernel_size: int
  virtual_batch: int = 8
  precision: Any = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BLC: jax.Array, train: bool) -> jax.Array:
    h = SNConv1d(
      x_BLC.shape[-1],
      self.kernel_size,
      precision=self.precision,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="conv",
    )(x_BLC, update_stats=train)
    h = BatchNormLocal(self.virtual_batch, param_dtype=self.param_dtype, name="norm")(h)
    return nn.leaky_relu(h, 0.2).astype(self.dtype)


class DiscHead(nn.Module):
  """Unconditional token head: pointwise block, a residual k-token block, a 1-channel readout."""

  kernel_size: int = 9
  virtual_batch: int = 8
  precision: Any = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens_BLC: jax.Array, train: bool = False) -> jax.Array:
    kw = dict(
      virtual_batch=self.virtual_batch,
      precision=self.precision,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
    )
    h = SNBlock(1, name="pointwise", **kw)(tokens_BLC, train)
    # The 1/√2 keeps the residual sum's variance at that of its inputs.
    h = (SNBlock(self.kernel_size, name="residual", **kw)(h, train) + h) / math.sqrt(2.0)
    logits_BL1 = SNConv1d(
      1,
      1,
      precision=self.precision,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="cls",
    )(h, update_stats=train)
    return logits_BL1[..., 0].astype(jnp.float32)


class ProjectedDiscriminator(nn.Module):
  """One `DiscHead` per feature level; token logits concatenated per image.

  Attributes:
    feature_keys: keys of the tower's aux dict to read (`block_i`, or `embed` for the patch
      embedding hook), each `[B, N, C]` with the CLS token first.
  """

  feature_keys: Sequence[str] = ("block_2", "block_5", "block_8", "block_11")
  kernel_size: int = 9
  virtual_batch: int = 8
  precision: Any = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, feats: Mapping[str, jax.Array], train: bool = False):
    """Returns `(logits_BT, aux)`: T = K·L, and aux["head_logits"][key] is `[B, L]`."""
    head_logits = {}
    for key in self.feature_keys:
      act_BNC = feats[key]
      tokens_BLC = act_BNC[:, 1:] + act_BNC[:, :1]
      head_logits[key] = DiscHead(
        self.kernel_size,
        self.virtual_batch,
        precision=self.precision,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name=f"head_{key}",
      )(tokens_BLC, train)
    logits_BT = jnp.concatenate([head_logits[k] for k in self.feature_keys], axis=1)
    return logits_BT, {"head_logits": head_logits}


def diff_augment(x_BSS: jax.Array, rng: jax.Array, translation: float = 0.125, cutout: float = 0.5):
  """DiffAugment for grey images in [0, 1]: brightness, contrast, translation, cutout.

  Colour saturation is a no-op on grey images, so "color" reduces to brightness (±0.25, i.e. ±0.5
  on the [-1, 1] scale) and contrast (×U(0.5, 1.5) about the image mean). Translation shifts by up
  to `translation`·S pixels per axis with zero fill (the MRI background); cutout zeroes one
  `cutout`·S square per image. Independent draws per image; differentiable in `x_BSS`.
  """
  b, s, _ = x_BSS.shape
  k_bright, k_contrast, k_shift, k_cut = jax.random.split(rng, 4)
  x = x_BSS + (jax.random.uniform(k_bright, (b, 1, 1)) - 0.5) * 0.5
  mean = x.mean(axis=(1, 2), keepdims=True)
  x = (x - mean) * (jax.random.uniform(k_contrast, (b, 1, 1)) + 0.5) + mean

  pad = int(s * translation + 0.5)
  if pad > 0:
    shift_B2 = jax.random.randint(k_shift, (b, 2), -pad, pad + 1)
    padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad)))

    def crop(img, sh):
      return jax.lax.dynamic_slice(img, (pad - sh[0], pad - sh[1]), (s, s))

    x = jax.vmap(crop)(padded, shift_B2)

  size = int(s * cutout + 0.5)
  if size > 0:
    centre_B2 = jax.random.randint(k_cut, (b, 2), 0, s)
    idx = jnp.arange(s)
    in_y = jnp.abs(idx[None, :] - centre_B2[:, :1]) * 2 < size
    in_x = jnp.abs(idx[None, :] - centre_B2[:, 1:]) * 2 < size
    x = x * (1.0 - (in_y[:, :, None] & in_x[:, None, :]).astype(x.dtype))
  return x


class Discriminator(nn.Module):
  """Magnitude images → frozen BiomedCLIP tower → projected heads → `[B, K·L]` logits.

  Tower fields default to BiomedCLIP ViT-B/16 (see `biomedclip.BiomedCLIPVision`); the tower
  parameters live in the `tower` collection and are never differentiated. See the module
  docstring for the collections and a training-step sketch.

  Attributes:
    hook_patch: add a fifth head on the patch embedding (StyleGAN-T's `hook_patch`; the paper
      names only blocks 2/5/8/11).
    augment: DiffAugment every input (needs an `"augment"` rng).
    tower_dtype: compute dtype of the tower (None: `dtype`).
  """

  image_size: int = 224
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  proj_dim: int | None = 512
  feature_blocks: Sequence[int] = biomedclip.FEATURE_BLOCKS
  hook_patch: bool = False
  kernel_size: int = 9
  virtual_batch: int = 8
  augment: bool = False
  remat: bool | str = False
  precision: Any = None
  tower_dtype: jnp.dtype | None = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def make_tower(self) -> biomedclip.BiomedCLIPVision:
    """The tower as a stand-alone module (its params are this module's `tower` collection)."""
    return biomedclip.BiomedCLIPVision(
      image_size=self.image_size,
      patch_size=self.patch_size,
      width=self.width,
      depth=self.depth,
      num_heads=self.num_heads,
      mlp_dim=self.mlp_dim,
      proj_dim=self.proj_dim,
      feature_blocks=tuple(self.feature_blocks),
      remat=self.remat,
      precision=self.precision,
      dtype=self.dtype if self.tower_dtype is None else self.tower_dtype,
      param_dtype=self.param_dtype,
      # Unbound: created inside a method, it must not become a child holding `params`.
      parent=None,
    )

  def make_heads(self, **kwargs) -> ProjectedDiscriminator:
    """The heads module; `kwargs` are linen's `name` / `parent`."""
    return ProjectedDiscriminator(
      self.feature_keys,
      self.kernel_size,
      self.virtual_batch,
      precision=self.precision,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      **kwargs,
    )

  @property
  def feature_keys(self) -> tuple[str, ...]:
    keys = tuple(f"block_{i}" for i in self.feature_blocks)
    return (("embed",) + keys) if self.hook_patch else keys

  @nn.compact
  def __call__(self, mag_BHW: jax.Array, scale_B: jax.Array | None = None, train: bool = False):
    """Scores magnitude images.

    Args:
      mag_BHW: magnitudes `[B, H, W]` (any H, W; area-resized to the tower's side).
      scale_B: per-image normaliser, see `biomedclip.preprocess_magnitude`.
      train: run a power iteration and store it (needs `mutable=["spectral"]`).

    Returns:
      `(logits_BT, aux)` with T = K·L; aux has `head_logits` (`[B, L]` per feature key).
    """
    x01 = biomedclip.unit_magnitude(mag_BHW, scale_B)
    x01 = biomedclip.resize_area(x01, self.image_size)
    # Initialisation needs no augmentation rng: the heads' parameters depend on shapes only.
    if self.augment and not self.is_initializing():
      x01 = diff_augment(x01, self.make_rng("augment"))
    images_BSSC = biomedclip.clip_normalize(x01)

    tower = self.make_tower()
    if not self.has_variable(TOWER, "cls_token"):
      if not self.is_mutable_collection(TOWER):
        raise ValueError(f"no tower parameters: pass them as the {TOWER!r} collection")
      init = tower.init(self.make_rng("params"), images_BSSC)["params"]
      for name, value in init.items():
        self.put_variable(TOWER, name, value)
    tower_params = self.variables[TOWER]
    _, feats = biomedclip.apply_frozen(tower, tower_params, images_BSSC)
    return self.make_heads(name="heads")(feats, train)


# Small tower for tests and smoke runs: 32² input, 8² patches → 16 + 1 tokens, width 32, and two
# blocks, each feeding a head (compile time grows with depth and head count).
TINY_TOWER = dict(
  image_size=32,
  patch_size=8,
  width=32,
  depth=2,
  num_heads=2,
  mlp_dim=64,
  proj_dim=16,
  feature_blocks=(0, 1),
)


def paper_discriminator(**overrides) -> Discriminator:
  """BiomedCLIP ViT-B/16 at 224² with four heads on blocks 2, 5, 8, 11 (decisions.md §3)."""
  return Discriminator(**overrides)


def tiny_discriminator(**overrides) -> Discriminator:
  """The same topology on a tiny random tower (`TINY_TOWER`), for tests."""
  return Discriminator(**{**TINY_TOWER, **overrides})


def init_variables(
  disc: Discriminator,
  rng: jax.Array,
  tower_params: Any = None,
  batch: int = 1,
) -> dict[str, Any]:
  """`{"params", "tower", "spectral"}` of `disc`, as `disc.init` would lay them out.

  The heads' initialisation depends only on the feature shapes, so they are initialised on
  zero features and the tower is never run. Without `tower_params` (e.g. from
  `biomedclip.from_torch_state_dict`) a random tower is drawn: a smoke-run stand-in, not BiomedCLIP.
  """
  rng_tower, rng_heads = jax.random.split(rng)
  tower = disc.make_tower()
  x = jnp.zeros((batch, disc.image_size, disc.image_size, 3), jnp.float32)
  if tower_params is None:
    # Jitted: eager init runs every initializer op by op, which is slow on CPU at ViT-B size.
    tower_params = jax.jit(tower.init)(rng_tower, x)["params"]
  _, feats = jax.eval_shape(tower.apply, {"params": tower_params}, x)
  zeros = {k: jnp.zeros(feats[k].shape, jnp.float32) for k in disc.feature_keys}
  heads = jax.jit(disc.make_heads(parent=None).init)(rng_heads, zeros)
  return {
    "params": {"heads": heads["params"]},
    TOWER: tower_params,
    SPECTRAL: {"heads": heads[SPECTRAL]},
  }
