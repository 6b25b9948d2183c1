"""AQ-VAE encoder (VAR VQ-VAE topology + FiLM) and decoder.

Shape legend:
  B: batch size.
  H, W: image size (256 at paper size); h, w: latent size (H / 2^(levels-1), 16 at paper size).
  Z: latent channels (`z_channels`, 32).
  C: feature channels of a level (`ch · ch_mult[i]`).
  D: label-embedding width (`label_features`).

Topology and names follow var_spec.md §1.3 (encoder) and §1.4 (decoder); FiLM follows §6.2 and
decisions.md §3. With `film=False`, or with FiLM weights at their zero init, `Encoder` computes
exactly VAR's `Encoder`; `Decoder` is VAR's `Decoder` (no clamp: callers decide).

Parameter paths mirror VAR's state-dict keys, an integer segment joined to the name before it
with `_` (var_spec.md §1.7):

  torch `encoder.down.0.block.1.conv1.weight` ↔ flax `down_0/block_1/conv1/kernel`
  torch `encoder.down.4.attn.0.qkv.bias`     ↔ flax `down_4/attn_0/qkv/bias`
  torch `encoder.mid.attn_1.norm.weight`     ↔ flax `mid/attn_1/norm/scale`
  torch `decoder.up.3.upsample.conv.weight`  ↔ flax `up_3/upsample/conv/kernel`

`down_{i}`, `mid` and `up_{i}` are container modules (`Down`, `Mid`, `Up`); FiLM adds
`.../block_{j}/film/{kernel,bias}` and `label_embed/{acc,family}/embedding`, which have no
torch counterpart (`convert.var_vae` maps VAR's weights onto these paths). `remat=True` wraps
the Resnet/Attn blocks in `nn.remat` without changing any path.

Input convention: a complex image enters as channels `[real, imag, 0]` (the pretrained
`conv_in`/`conv_out` are 3-channel, decisions.md §2); `to_model_input` builds that, and
`from_model_output` keeps output channels 0 and 1 (channel 2 is ignored).

Labels: `acc_B` indexes the acceleration list (R = 32, 16, 8, 4, 2, fully sampled → 0..5) and
`family_B` the mask family (0..3), both int32 (B,).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from nextaccel_jax.models.layers import (
  AttnBlock,
  Downsample,
  Dtype,
  GroupNorm,
  ResnetBlock,
  Upsample,
  conv,
  maybe_remat,
)


def to_model_input(x_BHW2: jax.Array) -> jax.Array:
  """Appends the zero third channel: `[real, imag]` → `[real, imag, 0]` (B, H, W, 3)."""
  return jnp.concatenate([x_BHW2, jnp.zeros_like(x_BHW2[..., :1])], axis=-1)


def from_model_output(y_BHW3: jax.Array) -> jax.Array:
  """Keeps channels 0 and 1 as `[real, imag]`, dropping the unused third channel (B, H, W, 2)."""
  return y_BHW3[..., :2]


def _blocks(remat: bool | str) -> tuple[type[nn.Module], type[nn.Module]]:
  """ResnetBlock and AttnBlock classes, rematerialised in the backward pass when asked."""
  return maybe_remat(ResnetBlock, remat), maybe_remat(AttnBlock, remat)


class LabelEmbed(nn.Module):
  """Label embedding `Embed_acc(acc) + Embed_family(family)` for FiLM (§6.2, decisions.md §3).

  Attributes:
    num_accelerations: number of acceleration labels (R = 32 … 2 and fully sampled).
    num_families: number of mask families.
    features: embedding width D.
    dtype: compute dtype.
    param_dtype: parameter storage dtype.
  """

  num_accelerations: int = 6
  num_families: int = 4
  features: int = 256
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, acc_B: jax.Array, family_B: jax.Array) -> jax.Array:
    """Returns the conditioning vectors cond_BD."""
    kw = dict(features=self.features, dtype=self.dtype, param_dtype=self.param_dtype)
    acc_BD = nn.Embed(self.num_accelerations, name="acc", **kw)(acc_B)
    family_BD = nn.Embed(self.num_families, name="family", **kw)(family_B)
    return acc_BD + family_BD


class Down(nn.Module):
  """One encoder level `down_{i}`: `block_j` (→ `attn_j`) for each j, then `downsample` (§1.3).

  Attributes:
    out_ch: channels of the level.
    num_res_blocks: ResnetBlocks in the level.
    use_attn: interleave an AttnBlock after each ResnetBlock (VAR: last level only).
    with_downsample: end with `Downsample` (VAR: every level but the last).
    film: FiLM-condition the ResnetBlocks.
    remat: rematerialise the blocks in the backward pass (True, False or a `REMAT_POLICIES` name).
    norm_groups: GroupNorm groups (VAR: 32).
    dtype: compute dtype.
    param_dtype: parameter storage dtype.
  """

  out_ch: int
  num_res_blocks: int
  use_attn: bool
  with_downsample: bool
  film: bool = False
  remat: bool | str = False
  norm_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
    self, x_BHWC: jax.Array, cond_BD: jax.Array | None = None
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns `(y, aux)`: y is downsampled when `with_downsample`; aux["features"] is not."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    resnet_cls, attn_cls = _blocks(self.remat)
    h = x_BHWC
    for j in range(self.num_res_blocks):
      h, _ = resnet_cls(self.out_ch, self.film, self.norm_groups, name=f"block_{j}", **kw)(
        h, cond_BD
      )
      if self.use_attn:
        h, _ = attn_cls(self.norm_groups, name=f"attn_{j}", **kw)(h)
    aux = {"features": h}
    if self.with_downsample:
      h = Downsample(name="downsample", **kw)(h)
    return h, aux


class Mid(nn.Module):
  """The middle stage `mid`: `block_1` → `attn_1` → `block_2` at constant width (§1.3, §1.4).

  Attributes:
    use_attn: include `attn_1` (VAR's `using_mid_sa`).
    film: FiLM-condition the ResnetBlocks.
    remat: rematerialise the blocks in the backward pass (True, False or a `REMAT_POLICIES` name).
    norm_groups: GroupNorm groups (VAR: 32).
    dtype: compute dtype.
    param_dtype: parameter storage dtype.
  """

  use_attn: bool = True
  film: bool = False
  remat: bool | str = False
  norm_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
    self, x_BhwC: jax.Array, cond_BD: jax.Array | None = None
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns `(y_BhwC, aux)` with the same shape as the input; aux is empty."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    resnet_cls, attn_cls = _blocks(self.remat)
    c = x_BhwC.shape[-1]
    h, _ = resnet_cls(c, self.film, self.norm_groups, name="block_1", **kw)(x_BhwC, cond_BD)
    if self.use_attn:
      h, _ = attn_cls(self.norm_groups, name="attn_1", **kw)(h)
    h, _ = resnet_cls(c, self.film, self.norm_groups, name="block_2", **kw)(h, cond_BD)
    return h, {}


class Up(nn.Module):
  """One decoder level `up_{i}`: `block_j` (→ `attn_j`) for each j, then `upsample` (§1.4).

  Attributes:
    out_ch: channels of the level.
    num_blocks: ResnetBlocks in the level (VAR: `num_res_blocks + 1`).
    use_attn: interleave an AttnBlock after each ResnetBlock (VAR: last level only).
    with_upsample: end with `Upsample` (VAR: every level but level 0).
    remat: rematerialise the blocks in the backward pass (True, False or a `REMAT_POLICIES` name).
    norm_groups: GroupNorm groups (VAR: 32).
    dtype: compute dtype.
    param_dtype: parameter storage dtype.
  """

  out_ch: int
  num_blocks: int
  use_attn: bool
  with_upsample: bool
  remat: bool | str = False
  norm_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BhwC: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns `(y, aux)`: y is upsampled when `with_upsample`; aux["features"] is not."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    resnet_cls, attn_cls = _blocks(self.remat)
    h = x_BhwC
    for j in range(self.num_blocks):
      h, _ = resnet_cls(self.out_ch, False, self.norm_groups, name=f"block_{j}", **kw)(h)
      if self.use_attn:
        h, _ = attn_cls(self.norm_groups, name=f"attn_{j}", **kw)(h)
    aux = {"features": h}
    if self.with_upsample:
      h = Upsample(name="upsample", **kw)(h)
    return h, aux


class Encoder(nn.Module):
  """FiLM-conditioned AQ-VAE encoder on VAR's VQ-VAE encoder topology (§1.3, §6.2).

  `conv_in` → `down_0 … down_{n-1}` (each `num_res_blocks` ResnetBlocks, AttnBlocks at the last
  level, a Downsample except at the last level) → `mid` → `norm_out` → SiLU → `conv_out`. With
  `film`, a `label_embed` vector conditions every ResnetBlock of `down_*` and `mid`.

  Attributes:
    ch: base channel count.
    ch_mult: per-level channel multipliers; the latent is H / 2^(len(ch_mult)-1).
    num_res_blocks: ResnetBlocks per level.
    z_channels: latent channels Z.
    in_channels: image channels (3: `[real, imag, 0]`).
    using_sa: AttnBlocks at the last level.
    using_mid_sa: AttnBlock in `mid`.
    film: condition on (acceleration, mask family) labels.
    label_features: label-embedding width D.
    num_accelerations: number of acceleration labels.
    num_families: number of mask-family labels.
    remat: rematerialise Resnet/Attn blocks in the backward pass (six encoder passes per
      sample at 256² are memory-heavy).
    norm_groups: GroupNorm groups (VAR: 32; fewer allows narrow demo models).
    dtype: compute dtype.
    param_dtype: parameter storage dtype.
  """

  ch: int = 160
  ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  z_channels: int = 32
  in_channels: int = 3
  using_sa: bool = True
  using_mid_sa: bool = True
  film: bool = True
  label_features: int = 256
  num_accelerations: int = 6
  num_families: int = 4
  remat: bool | str = False
  norm_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
    self,
    x_BHWC: jax.Array,
    acc_B: jax.Array | None = None,
    family_B: jax.Array | None = None,
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Encodes images to latents.

    Args:
      x_BHWC: images with `in_channels` channels.
      acc_B: acceleration labels (int); required when `film`.
      family_B: mask-family labels (int); required when `film`.

    Returns:
      `(h_BhwZ, feats)`. feats: `down_{i}` = output of level i before its downsample,
      `pre_mid` = input of `mid`, `mid` = output of `mid` (before `norm_out`).
    """
    if x_BHWC.shape[-1] != self.in_channels:
      raise ValueError(f"expected {self.in_channels} input channels, got {x_BHWC.shape}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    cond_BD = None
    if self.film:
      if acc_B is None or family_B is None:
        raise ValueError("a FiLM encoder needs acc_B and family_B")
      cond_BD = LabelEmbed(
        self.num_accelerations, self.num_families, self.label_features, name="label_embed", **kw
      )(acc_B, family_B)

    h = conv(self.ch, 3, name="conv_in", **kw)(x_BHWC.astype(self.dtype))
    feats = {}
    last = len(self.ch_mult) - 1
    for i, mult in enumerate(self.ch_mult):
      h, aux = Down(
        self.ch * mult,
        self.num_res_blocks,
        use_attn=self.using_sa and i == last,
        with_downsample=i != last,
        film=self.film,
        remat=self.remat,
        norm_groups=self.norm_groups,
        name=f"down_{i}",
        **kw,
      )(h, cond_BD)
      feats[f"down_{i}"] = aux["features"]
    feats["pre_mid"] = h
    h, _ = Mid(self.using_mid_sa, self.film, self.remat, self.norm_groups, name="mid", **kw)(
      h, cond_BD
    )
    feats["mid"] = h
    h = nn.silu(GroupNorm(self.norm_groups, name="norm_out", **kw)(h))
    h_BhwZ = conv(self.z_channels, 3, name="conv_out", **kw)(h)
    return h_BhwZ, feats


class Decoder(nn.Module):
  """VAR's VQ-VAE decoder (§1.4), unconditioned.

  `conv_in` → `mid` → `up_{n-1} … up_0` (each `num_res_blocks + 1` ResnetBlocks, AttnBlocks
  at the last level, an Upsample except at level 0) → `norm_out` → SiLU → `conv_out`.

  Attributes:
    ch: base channel count.
    ch_mult: per-level channel multipliers; the output is h · 2^(len(ch_mult)-1).
    num_res_blocks: one fewer than the ResnetBlocks per level.
    z_channels: latent channels Z.
    out_channels: image channels (3; only channels 0 and 1 carry the image).
    using_sa: AttnBlocks at the last level.
    using_mid_sa: AttnBlock in `mid`.
    remat: rematerialise Resnet/Attn blocks in the backward pass (a `REMAT_POLICIES` name or bool).
    norm_groups: GroupNorm groups (VAR: 32; fewer allows narrow demo models).
    dtype: compute dtype.
    param_dtype: parameter storage dtype.
  """

  ch: int = 160
  ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  z_channels: int = 32
  out_channels: int = 3
  using_sa: bool = True
  using_mid_sa: bool = True
  remat: bool | str = False
  norm_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z_BhwZ: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Decodes latents to images.

    Args:
      z_BhwZ: latents.

    Returns:
      `(x_BHWC, aux)`, x unclamped with `out_channels` channels. aux: `mid` = output of `mid`,
      `up_{i}` = output of level i before its upsample.
    """
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    last = len(self.ch_mult) - 1
    h = conv(self.ch * self.ch_mult[last], 3, name="conv_in", **kw)(z_BhwZ.astype(self.dtype))
    h, _ = Mid(self.using_mid_sa, False, self.remat, self.norm_groups, name="mid", **kw)(h)
    aux = {"mid": h}
    for i in reversed(range(len(self.ch_mult))):
      h, up_aux = Up(
        self.ch * self.ch_mult[i],
        self.num_res_blocks + 1,
        use_attn=self.using_sa and i == last,
        with_upsample=i != 0,
        remat=self.remat,
        norm_groups=self.norm_groups,
        name=f"up_{i}",
        **kw,
      )(h)
      aux[f"up_{i}"] = up_aux["features"]
    h = nn.silu(GroupNorm(self.norm_groups, name="norm_out", **kw)(h))
    x_BHWC = conv(self.out_channels, 3, name="conv_out", **kw)(h)
    return x_BHWC, aux
