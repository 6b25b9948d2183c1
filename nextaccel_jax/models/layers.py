"""Building blocks of VAR's VQ-VAE in Flax linen (var_spec.md §1.2), plus FiLM (§6.2).

Shape legend:
  B: batch size.
  H, W: spatial size of the block's input; h, w: a reduced spatial size.
  C: channels of the block's input; O: output channels.
  D: width of the conditioning vector (label embedding).
  Q, K: query and key token counts of the attention block (both H·W, row-major).

All tensors are NHWC. Every convolution is an `nn.Conv` with bias and explicit padding, so a
PyTorch NCHW kernel converts with a plain transpose (var_spec.md §1.7). Norms and the attention
softmax are fp32 islands: they compute in at least float32 whatever `dtype` is, then cast back.

Leaf layers (`GroupNorm`, `Downsample`, `Upsample`) return an array, as `nn.Conv` does; the
blocks (`ResnetBlock`, `AttnBlock`) return `(y, aux)`.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

_PAD_SAME_3x3 = ((1, 1), (1, 1))
_PAD_NONE = ((0, 0), (0, 0))
# VAR's Downsample2x pads only the right and bottom edges before a stride-2 valid conv.
_PAD_DOWNSAMPLE = ((0, 1), (0, 1))


# What the backward pass may keep of a rematerialised block instead of recomputing it.
# "full" keeps only the block inputs (least memory); "dots" also keeps every matmul/conv output;
# "dots_no_batch" keeps the matmul outputs without batch dimensions (weight-stationary products).
REMAT_POLICIES = {
  "none": None,
  "full": jax.checkpoint_policies.nothing_saveable,
  "dots": jax.checkpoint_policies.checkpoint_dots,
  "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_name(remat: bool | str) -> str:
  """The policy name of a `remat` field: False → "none", True → "full", or a name as is."""
  if isinstance(remat, bool | int) and not isinstance(remat, str):
    return "full" if remat else "none"
  if remat not in REMAT_POLICIES:
    raise ValueError(f"remat={remat!r}: choose True, False or one of {sorted(REMAT_POLICIES)}")
  return remat


def maybe_remat(cls, remat: bool | str, **kwargs):
  """`cls` wrapped in `nn.remat` with the named policy (`cls` itself for "none")."""
  name = remat_name(remat)
  if name == "none":
    return cls
  return nn.remat(cls, policy=REMAT_POLICIES[name], **kwargs)


def torch_key_path(torch_key: str) -> tuple[tuple[str, ...], str]:
  """A PyTorch state-dict key as a Flax path and its leaf name: an integer segment joins the name
  before it with `_`, so `down.0.block.1.conv1.weight` gives `("down_0", "block_1", "conv1")` and
  `"weight"`."""
  *segments, leaf = torch_key.split(".")
  path: list[str] = []
  for seg in segments:
    if seg.isdigit() and path:
      path[-1] = f"{path[-1]}_{seg}"
    else:
      path.append(seg)
  return tuple(path), leaf


def count_params(tree) -> int:
  """Number of scalars in a tree of arrays or `jax.ShapeDtypeStruct`s."""
  return sum(math.prod(getattr(x, "shape", np.shape(x))) for x in jax.tree.leaves(tree))


def island_dtype(dtype: Dtype) -> Dtype:
  """The dtype of an fp32 island: float32, or wider when the model itself runs wider."""
  return jnp.promote_types(dtype, jnp.float32)


def conv(
  features: int,
  kernel: int,
  *,
  name: str,
  dtype: Dtype,
  param_dtype: Dtype,
  stride: int = 1,
  padding: tuple[tuple[int, int], tuple[int, int]] | None = None,
) -> nn.Conv:
  """A biased square `nn.Conv`; padding defaults to "same" for odd kernels at stride 1."""
  if padding is None:
    padding = _PAD_SAME_3x3 if kernel == 3 else _PAD_NONE
  return nn.Conv(
    features,
    (kernel, kernel),
    strides=(stride, stride),
    padding=padding,
    use_bias=True,
    dtype=dtype,
    param_dtype=param_dtype,
    name=name,
  )


class GroupNorm(nn.Module):
  """VAR's `Normalize`: GroupNorm with 32 contiguous channel groups and eps 1e-6 (§1.2).

  Statistics and normalisation run in float32 with the two-pass variance E[(x - E[x])²], the
  same arithmetic as `nn.GroupNorm(use_fast_variance=False)`; the result is cast to `dtype`.
  Parameters are `scale` and `bias`, one per channel.

  Attributes:
    num_groups: number of channel groups; the channel count must be a multiple of it.
    epsilon: added to the variance.
    dtype: output dtype.
    param_dtype: storage dtype of `scale` and `bias`.
  """

  num_groups: int = 32
  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BHWC: jax.Array) -> jax.Array:
    """Normalises over (H, W, channels of the group) per sample and group.

    Args:
      x_BHWC: input of any float dtype.

    Returns:
      The normalised, affinely transformed input in `dtype`, same shape.
    """
    c = x_BHWC.shape[-1]
    if c % self.num_groups:
      raise ValueError(f"{c} channels do not split into {self.num_groups} groups")
    scale_C = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
    bias_C = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
    compute = island_dtype(self.dtype)
    x = x_BHWC.astype(compute)
    x_BHWGc = x.reshape(*x.shape[:-1], self.num_groups, c // self.num_groups)
    axes = (*range(1, x_BHWGc.ndim - 2), x_BHWGc.ndim - 1)
    mean = x_BHWGc.mean(axes, keepdims=True)
    centred = x_BHWGc - mean
    var = jnp.square(centred).mean(axes, keepdims=True)
    y = (centred * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
    y = y * scale_C.astype(compute) + bias_C.astype(compute)
    return y.astype(self.dtype)


class ResnetBlock(nn.Module):
  """VAR's `ResnetBlock` (§1.2) with optional FiLM scale-shift after `norm2` (§6.2).

  `h = conv1(silu(norm1(x)))`; `h = norm2(h)`; with FiLM, `h = h·(1+γ) + β` where
  `(γ, β) = film(silu(cond))` is a Dense initialised to zero, so a fresh FiLM block computes
  exactly VAR's block; then `h = conv2(silu(h))` and the output is `shortcut(x) + h`. The
  shortcut is the 1×1 conv `nin_shortcut` only when the channel count changes (VAR has no
  parameters there otherwise). Dropout is omitted: VAR's checkpoint uses 0.0.

  Attributes:
    out_ch: output channels O.
    film: whether the block takes a conditioning vector.
    norm_groups: GroupNorm groups (32 in VAR; fewer lets small presets use < 32 channels).
    dtype: compute dtype.
    param_dtype: parameter storage dtype.
  """

  out_ch: int
  film: bool = False
  norm_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
    self, x_BHWC: jax.Array, cond_BD: jax.Array | None = None
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Applies the block.

    Args:
      x_BHWC: input features.
      cond_BD: conditioning vectors; required when `film` is true, ignored otherwise.

    Returns:
      `(y_BHWO, aux)`; with FiLM, aux holds `film_gamma` and `film_beta` (B, O).
    """
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h_BHWO = conv(self.out_ch, 3, name="conv1", **kw)(
      nn.silu(GroupNorm(self.norm_groups, name="norm1", **kw)(x_BHWC))
    )
    h_BHWO = GroupNorm(self.norm_groups, name="norm2", **kw)(h_BHWO)
    aux = {}
    if self.film:
      if cond_BD is None:
        raise ValueError("a FiLM ResnetBlock needs cond_BD")
      film_B2O = nn.Dense(
        2 * self.out_ch,
        kernel_init=nn.initializers.zeros,
        bias_init=nn.initializers.zeros,
        name="film",
        **kw,
      )(nn.silu(cond_BD.astype(self.dtype)))
      gamma_BO, beta_BO = jnp.split(film_B2O, 2, axis=-1)
      h_BHWO = h_BHWO * (1 + gamma_BO[:, None, None, :]) + beta_BO[:, None, None, :]
      aux = {"film_gamma": gamma_BO, "film_beta": beta_BO}
    h_BHWO = conv(self.out_ch, 3, name="conv2", **kw)(nn.silu(h_BHWO))
    if x_BHWC.shape[-1] != self.out_ch:
      x_BHWC = conv(self.out_ch, 1, name="nin_shortcut", **kw)(x_BHWC)
    return x_BHWC.astype(self.dtype) + h_BHWO, aux


class AttnBlock(nn.Module):
  """VAR's single-head spatial `AttnBlock` (§1.2).

  `qkv` is a 1×1 conv C→3C on `norm(x)`, split as q = [0:C], k = [C:2C], v = [2C:3C]; the
  weights are `softmax_keys(q·k · C^-0.5)` over the H·W row-major tokens, computed in fp32;
  the output is `x + proj_out(Σ_k w·v)`.

  Attributes:
    norm_groups: GroupNorm groups.
    dtype: compute dtype.
    param_dtype: parameter storage dtype.
  """

  norm_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BHWC: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Applies self-attention over the spatial positions.

    Args:
      x_BHWC: input features.

    Returns:
      `(y_BHWC, aux)`; aux holds the attention weights `attn_weights` (B, Q, K) in fp32.
    """
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, h, w, c = x_BHWC.shape
    qkv_BHW3C = conv(3 * c, 1, name="qkv", **kw)(
      GroupNorm(self.norm_groups, name="norm", **kw)(x_BHWC)
    )
    q_BQC, k_BKC, v_BKC = jnp.split(qkv_BHW3C.reshape(b, h * w, 3 * c), 3, axis=-1)
    island = island_dtype(self.dtype)
    logits_BQK = jnp.einsum("bqc,bkc->bqk", q_BQC, k_BKC, preferred_element_type=island)
    w_BQK = jax.nn.softmax(logits_BQK * c**-0.5, axis=-1)
    o_BQC = jnp.einsum("bqk,bkc->bqc", w_BQK.astype(self.dtype), v_BKC)
    y_BHWC = conv(c, 1, name="proj_out", **kw)(o_BQC.reshape(b, h, w, c))
    return x_BHWC.astype(self.dtype) + y_BHWC, {"attn_weights": w_BQK}


class Downsample(nn.Module):
  """VAR's `Downsample2x` (§1.2): pad right/bottom by one, then a 3×3 stride-2 valid conv.

  Attributes:
    dtype: compute dtype.
    param_dtype: parameter storage dtype.
  """

  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BHWC: jax.Array) -> jax.Array:
    """Halves H and W (rounding up); returns (B, ⌈H/2⌉, ⌈W/2⌉, C)."""
    c = x_BHWC.shape[-1]
    return conv(
      c,
      3,
      stride=2,
      padding=_PAD_DOWNSAMPLE,
      name="conv",
      dtype=self.dtype,
      param_dtype=self.param_dtype,
    )(x_BHWC)


class Upsample(nn.Module):
  """VAR's `Upsample2x` (§1.2): nearest-neighbour ×2 (each pixel repeated 2×2), then 3×3 conv.

  Attributes:
    dtype: compute dtype.
    param_dtype: parameter storage dtype.
  """

  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BhwC: jax.Array) -> jax.Array:
    """Doubles H and W; returns (B, 2h, 2w, C)."""
    c = x_BhwC.shape[-1]
    x_BHWC = jnp.repeat(jnp.repeat(x_BhwC, 2, axis=1), 2, axis=2)
    return conv(c, 3, name="conv", dtype=self.dtype, param_dtype=self.param_dtype)(x_BHWC)
