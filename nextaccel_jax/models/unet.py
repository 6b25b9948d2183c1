"""The fastMRI U-Net baseline (Ronneberger et al. 2015, as in fastMRI's `models/unet.py`).

Shape legend:
  B: batch size.
  H, W: image grid of the input; h, w: a reduced grid inside the network.
  I: input channels (`in_chans`); O: output channels (`out_chans`); C: feature channels.

All tensors are NHWC. With `chans = c` and `num_pool_layers = n` the network is

  down:  d_0 = Block(x, c), d_i = Block(avgpool2(d_{i-1}), c·2^i)      i = 1 … n-1
  mid:   u   = Block(avgpool2(d_{n-1}), c·2^n)
  up:    u   = Block([fix(Up(u)), d_i], c·2^i)                          i = n-1 … 0
  out:   y   = Conv1x1(u) + bias,   O channels

where `Block(x, C) = (Conv3x3 → InstanceNorm → LeakyReLU(0.2) → Dropout2d) × 2` with bias-free
convolutions, `Up` is a bias-free 2×2 stride-2 transposed convolution halving the channels,
followed by InstanceNorm and LeakyReLU(0.2), and `avgpool2` is a 2×2 stride-2 average pool that
drops an odd last row or column. `fix` restores such a dropped row/column by reflect-padding one
row at the bottom and/or one column at the right, so any H, W ≥ 2^n works. InstanceNorm has no
affine parameters: `(x - E[x]) / sqrt(Var[x] + 1e-5)` per sample and channel over (h, w), with
the biased variance; it is an fp32 island.

Parameter paths mirror fastMRI's state-dict keys, an integer segment joined to the name before
it with `_` (`layers.torch_key_path`): `down_sample_layers_{i}/layers_{0,4}`, `conv/layers_{0,4}`,
`up_transpose_conv_{i}/layers_0`, `up_conv_{i}/layers_{0,4}` and, for the last level, fastMRI's
nested `Sequential` as `up_conv_{n-1}_0/layers_{0,4}` (the block) and `up_conv_{n-1}_1` (the 1×1
convolution). A convolution weight (O, I, kh, kw) is the kernel (kh, kw, I, O); a transposed
convolution weight (I, O, kh, kw) is the kernel (kh, kw, O, I) of `nn.ConvTranspose` with
`transpose_kernel=True` (`convert.fastmri_baselines`).

Baseline convention on this project's images: the input is the complex R = 32 image as
`[real, imag]` channels, `x_BHW2` (`in_chans = 2`); with `out_chans = 1` the output is the
magnitude image, with `out_chans = 2` it is the complex image as `[real, imag]`. `to_magnitude`
gives the magnitude of either.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nextaccel_jax.models import fields as fields_lib
from nextaccel_jax.models import layers

Dtype = Any

# torch.nn.InstanceNorm2d's default.
INSTANCE_NORM_EPS = 1e-5
LEAKY_SLOPE = 0.2

# The paper's magnitude baseline: fastMRI's default U-Net on the [real, imag] R = 32 image.
PAPER = dict(in_chans=2, out_chans=1, chans=32, num_pool_layers=4, drop_prob=0.0)


def instance_norm(x_BHWC: jax.Array, dtype: Dtype, eps: float = INSTANCE_NORM_EPS) -> jax.Array:
  """`(x - E[x]) / sqrt(Var[x] + eps)` per sample and channel over (H, W), in fp32, cast to dtype.

  The variance is biased and two-pass, the arithmetic of `torch.nn.InstanceNorm2d`.
  """
  x = x_BHWC.astype(layers.island_dtype(dtype))
  mean = x.mean(axis=(1, 2), keepdims=True)
  centred = x - mean
  var = jnp.square(centred).mean(axis=(1, 2), keepdims=True)
  return (centred * jax.lax.rsqrt(var + eps)).astype(dtype)


def to_magnitude(y_BHWO: jax.Array) -> jax.Array:
  """The magnitude image `[B, H, W]` of a baseline output: channel 0 when O = 1 (the network
  predicts the magnitude), `sqrt(re² + im²)` when O = 2 (`[real, imag]`)."""
  if y_BHWO.shape[-1] == 1:
    return y_BHWO[..., 0]
  if y_BHWO.shape[-1] == 2:
    return jnp.sqrt(jnp.square(y_BHWO[..., 0]) + jnp.square(y_BHWO[..., 1]))
  raise ValueError(f"a baseline output has 1 or 2 channels, got shape {y_BHWO.shape}")


def _conv3x3(features: int, name: str, dtype: Dtype, param_dtype: Dtype) -> nn.Conv:
  return nn.Conv(
    features,
    (3, 3),
    padding=((1, 1), (1, 1)),
    use_bias=False,
    dtype=dtype,
    param_dtype=param_dtype,
    name=name,
  )


class ConvBlock(nn.Module):
  """Two rounds of bias-free Conv3x3 → InstanceNorm → LeakyReLU(0.2) → Dropout2d.

  Dropout2d zeroes whole channels per sample (`broadcast_dims` over H, W). The convolutions are
  `layers_0` and `layers_4`, the positions of fastMRI's `nn.Sequential`.

  Attributes:
    out_chans: output channels C.
    drop_prob: channel dropout probability (train only).
    dtype: compute dtype.
    param_dtype: parameter storage dtype.
  """

  out_chans: int
  drop_prob: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BHWI: jax.Array, train: bool = False) -> jax.Array:
    """`[B, H, W, I]` → `[B, H, W, C]` in `dtype`; `train` turns dropout on (rng "dropout")."""
    h = x_BHWI.astype(self.dtype)
    for name in ("layers_0", "layers_4"):
      h = _conv3x3(self.out_chans, name, self.dtype, self.param_dtype)(h)
      h = nn.leaky_relu(instance_norm(h, self.dtype), LEAKY_SLOPE)
      h = nn.Dropout(self.drop_prob, broadcast_dims=(1, 2), deterministic=not train)(h)
    return h


class TransposeConvBlock(nn.Module):
  """Bias-free 2×2 stride-2 transposed convolution → InstanceNorm → LeakyReLU(0.2).

  Attributes:
    out_chans: output channels C.
    dtype: compute dtype.
    param_dtype: parameter storage dtype.
  """

  out_chans: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BhwI: jax.Array) -> jax.Array:
    """`[B, h, w, I]` → `[B, 2h, 2w, C]` in `dtype`."""
    h = nn.ConvTranspose(
      self.out_chans,
      (2, 2),
      strides=(2, 2),
      padding="VALID",
      use_bias=False,
      # The kernel is stored (kh, kw, C, I) and applied as the gradient of a convolution, which
      # is PyTorch's ConvTranspose2d: its weight (I, C, kh, kw) converts with a plain transpose.
      transpose_kernel=True,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="layers_0",
    )(x_BhwI.astype(self.dtype))
    return nn.leaky_relu(instance_norm(h, self.dtype), LEAKY_SLOPE)


def _avg_pool2(x_BHWC: jax.Array) -> jax.Array:
  # VALID pooling drops an odd last row/column, as `F.avg_pool2d(kernel_size=2, stride=2)`.
  return nn.avg_pool(x_BHWC, (2, 2), strides=(2, 2), padding="VALID")


def _match_skip(up_BhwC: jax.Array, skip_BHWC: jax.Array) -> jax.Array:
  """Reflect-pads one row at the bottom / one column at the right where the pooling dropped one."""
  pad_h = skip_BHWC.shape[1] - up_BhwC.shape[1]
  pad_w = skip_BHWC.shape[2] - up_BhwC.shape[2]
  if (pad_h, pad_w) == (0, 0):
    return up_BhwC
  return jnp.pad(up_BhwC, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="reflect")


class Unet(nn.Module):
  """fastMRI's U-Net (module docstring), NHWC.

  Attributes:
    in_chans: input channels I (2 for a `[real, imag]` image).
    out_chans: output channels O (1: magnitude, 2: `[real, imag]`).
    chans: channels of the first block; level i has `chans · 2^i`.
    num_pool_layers: number of 2× down- and up-sampling steps n; H and W must be ≥ 2^n.
    drop_prob: Dropout2d probability in every `ConvBlock` (train only).
    dtype: compute dtype (InstanceNorm statistics are fp32).
    param_dtype: parameter storage dtype.
  """

  in_chans: int = 2
  out_chans: int = 1
  chans: int = 32
  num_pool_layers: int = 4
  drop_prob: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BHWI: jax.Array, train: bool = False) -> tuple[jax.Array, dict]:
    """Applies the U-Net.

    Args:
      x_BHWI: input image `[B, H, W, I]`, H, W ≥ 2^num_pool_layers (any parity).
      train: enables Dropout2d (needs the "dropout" rng when `drop_prob > 0`).

    Returns:
      `(y_BHWO, aux)` with `y_BHWO` in `dtype`; aux is `{}`.
    """
    if x_BHWI.shape[-1] != self.in_chans:
      raise ValueError(f"Unet expects {self.in_chans} input channels, got shape {x_BHWI.shape}")
    n = self.num_pool_layers
    if n < 1:
      raise ValueError(f"num_pool_layers must be >= 1, got {n}")
    side = min(x_BHWI.shape[1:3])
    if side < 2**n:
      raise ValueError(f"a {n}-pool U-Net needs H, W >= {2**n}, got {x_BHWI.shape[1:3]}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    block = dict(drop_prob=self.drop_prob, **kw)

    skips = []
    h = x_BHWI
    ch = self.chans
    for i in range(n):
      h = ConvBlock(ch, name=f"down_sample_layers_{i}", **block)(h, train)
      skips.append(h)
      h = _avg_pool2(h)
      ch *= 2
    h = ConvBlock(ch, name="conv", **block)(h, train)

    for i in range(n):
      ch //= 2
      skip = skips.pop()
      h = _match_skip(TransposeConvBlock(ch, name=f"up_transpose_conv_{i}", **kw)(h), skip)
      h = jnp.concatenate([h, skip], axis=-1)
      last = i == n - 1
      h = ConvBlock(ch, name=f"up_conv_{i}_0" if last else f"up_conv_{i}", **block)(h, train)
    y = nn.Conv(self.out_chans, (1, 1), use_bias=True, name=f"up_conv_{n - 1}_1", **kw)(h)
    return y, {}


def init_params(model: Unet, rng: jax.Array, image_shape: tuple[int, int] = (32, 32)):
  """The `params` collection of `model` for `[1, H, W, in_chans]` inputs (jitted init)."""
  x = jnp.zeros((1, *image_shape, model.in_chans), jnp.float32)
  return jax.jit(model.init)(rng, x)["params"]


def from_fields(fields: Mapping[str, Any], where: str = "", **overrides) -> Unet:
  """The U-Net of a config section or stored JSON fields (`fields.build`), `overrides` on top."""
  return fields_lib.build(Unet, {**dict(fields), **overrides}, where or "Unet fields")
