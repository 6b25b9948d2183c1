"""E2E-VarNet (Sriram et al. 2020) as in fastMRI's `models/varnet.py`, for 1-D and 2-D masks.

Shape legend:
  B: batch size.
  C: coils (1 for the single-coil variant).
  H, W: k-space / image grid; DC sits at (H//2, W//2).
  2: `[real, imag]` of a complex value stored as floats.

Multicoil k-space crosses the public API as `[B, C, H, W, 2]` floats (fastMRI's layout); inside,
k-space and images are complex64 `[B, C, H, W]` and the U-Nets see `[real, imag]` channels NHWC.
F is the centred orthonormal 2-D FFT over (H, W), `fft2c(x) = fftshift(fft2(ifftshift(x)))`,
the same transform as fastMRI's `fft2c_new` and the package's `data.transforms.fft2c` (this file
keeps a private copy: models import nothing outside `models`).

With masked k-space k⁰, sampling mask M (1 where sampled) and coil maps S_c:

  sensitivities  S = R(k⁰ ⊙ W_acs) / RSS_c(R(k⁰ ⊙ W_acs)),  R(k)_c = NormUnet(F⁻¹ k_c)
  cascade t      kᵗ⁺¹ = kᵗ - η_t · M ⊙ (kᵗ - k⁰) - E(NormUnet_t(Rd(kᵗ)))
                 E(x)_c = F(S_c x),  Rd(k) = Σ_c conj(S_c) F⁻¹ k_c
  output         RSS(F⁻¹ k^T) = sqrt(Σ_c |F⁻¹ k^T_c|²)          `[B, H, W]`

η_t is a learnable scalar (`dc_weight`, initialised to 1). `NormUnet` normalises the
`[real, imag]` image by the mean and standard deviation (unbiased, fastMRI's `torch.std`) of each
of the two channels, zero-pads H and W up to multiples of 16, runs a `unet.Unet` and undoes both.

Low-frequency (ACS) window W_acs for the sensitivity estimate, from the mask alone. fastMRI reads
the centre of its 1-D column mask m: `left` and `right` are the runs of sampled columns ending at
W//2 - 1 and starting at W//2, `n = max(2·min(left, right), 1)` and the kept columns are
`[p, p + n)` with `p = (W - n + 1) // 2`. Here the same rule runs on both axes of a 2-D mask:

  * Along an axis of length L with centre c = L//2 a candidate is the centre line [c, c+1)
    (k = 0), a symmetric band [c-k, c+k) for k = 1 … L//2, or the whole axis [0, L).
  * The chosen pair of candidates (rows × columns) is the one whose box is fully sampled and has
    the largest area; ties go to the larger height + width, then to the smaller row candidate
    (the box wider along W). If not even the DC point is sampled, the box is the DC point.
  * The window keeps fastMRI's placement: a band with k ≥ 1 becomes `[p, p + 2k)`,
    `p = (L - 2k + 1) // 2` (the band itself when L is even, shifted by one when L is odd, as
    fastMRI does); the centre line and the whole axis are kept as they are.

For a column mask (constant along H) the box spans all rows and exactly fastMRI's columns, so
the two agree, except where a whole half of the centre row is sampled: there fastMRI's argmin
finds no unsampled column and keeps a single column, while this rule counts the run (the whole
axis for a fully sampled mask). Row masks give the transpose; `gaussian_2d` and `radial` masks
give the largest fully sampled centred box around DC.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nextaccel_jax.models import fields as fields_lib
from nextaccel_jax.models import unet as unet_lib

Dtype = Any

_AXES = (-2, -1)
# NormUnet pads H and W to multiples of this (fastMRI's `((n - 1) | 15) + 1`).
PAD_MULTIPLE = 16

# The paper's E2E-VarNet baseline: fastMRI's defaults.
PAPER = dict(num_cascades=12, sens_chans=8, sens_pools=4, chans=18, pools=4)


def fft2c(x: jax.Array) -> jax.Array:
  """Centred orthonormal 2-D FFT over the last two axes (= `data.transforms.fft2c`)."""
  x = jnp.fft.ifftshift(x, axes=_AXES)
  return jnp.fft.fftshift(jnp.fft.fft2(x, axes=_AXES, norm="ortho"), axes=_AXES)


def ifft2c(k: jax.Array) -> jax.Array:
  """Centred orthonormal 2-D inverse FFT over the last two axes (= `data.transforms.ifft2c`)."""
  k = jnp.fft.ifftshift(k, axes=_AXES)
  return jnp.fft.fftshift(jnp.fft.ifft2(k, axes=_AXES, norm="ortho"), axes=_AXES)


def to_complex(x_2: jax.Array) -> jax.Array:
  """`[..., 2]` `[real, imag]` floats → complex64 `[...]`."""
  x_2 = x_2.astype(jnp.float32)
  return jax.lax.complex(x_2[..., 0], x_2[..., 1])


def to_channels(x: jax.Array) -> jax.Array:
  """Complex `[...]` → float32 `[..., 2]` `[real, imag]`."""
  return jnp.stack([x.real, x.imag], axis=-1).astype(jnp.float32)


def _axis_candidates(length: int) -> tuple[np.ndarray, ...]:
  """Checked and kept intervals of one axis: the centre line, bands k = 1 … L//2, the whole axis.

  Returns:
    `(check_start, check_stop, keep_start, keep_stop)`, int arrays of length L//2 + 2.
  """
  c = length // 2
  k = np.arange(1, length // 2 + 1)
  pad = (length - 2 * k + 1) // 2
  check_start = np.concatenate([[c], c - k, [0]])
  check_stop = np.concatenate([[c + 1], c + k, [length]])
  keep_start = np.concatenate([[c], pad, [0]])
  keep_stop = np.concatenate([[c + 1], pad + 2 * k, [length]])
  return check_start, check_stop, keep_start, keep_stop


def acs_box(mask_HW: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """The low-frequency box of one mask (module docstring): rows `[r0, r1)`, columns `[c0, c1)`.

  Every candidate box is checked at once with a summed-area table, so the rule is a handful of
  gathers and reductions under jit.

  Args:
    mask_HW: sampling mask `[H, W]` (bool or 0/1), DC at (H//2, W//2).

  Returns:
    `(r0, r1, c0, c1)` int32 scalars.
  """
  h, w = mask_HW.shape
  m = (mask_HW != 0).astype(jnp.int32)
  sat = jnp.pad(jnp.cumsum(jnp.cumsum(m, axis=0), axis=1), ((1, 0), (1, 0)))
  rs, re, keep_rs, keep_re = _axis_candidates(h)
  cs, ce, keep_cs, keep_ce = _axis_candidates(w)
  count = (
    sat[re[:, None], ce[None, :]]
    - sat[rs[:, None], ce[None, :]]
    - sat[re[:, None], cs[None, :]]
    + sat[rs[:, None], cs[None, :]]
  )
  heights, widths = (re - rs)[:, None], (ce - cs)[None, :]
  area = heights * widths
  full = count == area
  best_area = jnp.max(jnp.where(full, area, -1))
  # Lexicographic (area, height + width) without a combined score that could overflow int32.
  tie_break = jnp.where(full & (area == best_area), heights + widths, -1)
  # argmax takes the first maximum: the smallest row candidate, i.e. the box widest along W. If
  # nothing is fully sampled every entry is -1 and index 0 is the DC point.
  i, j = jnp.divmod(jnp.argmax(tie_break), len(ce))
  take = lambda a, idx: jnp.asarray(a, jnp.int32)[idx]
  return take(keep_rs, i), take(keep_re, i), take(keep_cs, j), take(keep_ce, j)


def low_frequency_window(mask_BHW: jax.Array) -> jax.Array:
  """The ACS window of each mask (module docstring): bool `[B, H, W]`, True inside the box."""
  h, w = mask_BHW.shape[-2:]
  r0, r1, c0, c1 = jax.vmap(acs_box)(mask_BHW)
  rows, cols = jnp.arange(h), jnp.arange(w)
  in_rows = (rows >= r0[:, None]) & (rows < r1[:, None])
  in_cols = (cols >= c0[:, None]) & (cols < c1[:, None])
  return in_rows[:, :, None] & in_cols[:, None, :]


def _abs_sq(x: jax.Array) -> jax.Array:
  return jnp.square(x.real) + jnp.square(x.imag)


def _pad_to_multiple(n: int) -> tuple[int, int]:
  padded = ((n - 1) | (PAD_MULTIPLE - 1)) + 1
  return (padded - n) // 2, (padded - n + 1) // 2


class NormUnet(nn.Module):
  """fastMRI's `NormUnet` on a `[real, imag]` image: normalise, pad to 16, U-Net, undo.

  `y = unpad(Unet(pad((x - μ) / σ))) · σ + μ`, with μ, σ the mean and unbiased standard deviation
  of each of the two channels over (H, W) per sample, computed in fp32; the zero padding puts
  `⌊d/2⌋` before and `⌈d/2⌉` after, d the distance to the next multiple of 16. The U-Net is the
  submodule `unet` (2 → 2 channels).

  Attributes:
    chans: channels of the U-Net's first block.
    num_pools: U-Net down/up-sampling steps.
    drop_prob: Dropout2d probability (train only).
    dtype: compute dtype of the U-Net.
    param_dtype: parameter storage dtype.
  """

  chans: int
  num_pools: int
  drop_prob: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BHW2: jax.Array, train: bool = False) -> tuple[jax.Array, dict]:
    """`[B, H, W, 2]` → `([B, H, W, 2]` float32, `{}`)."""
    if x_BHW2.shape[-1] != 2:
      raise ValueError(f"NormUnet takes [real, imag] channels, got shape {x_BHW2.shape}")
    _, h, w, _ = x_BHW2.shape
    x = x_BHW2.astype(jnp.float32)
    mean = x.mean(axis=(1, 2), keepdims=True)
    std = jnp.std(x, axis=(1, 2), keepdims=True, ddof=1)
    (top, bottom), (left, right) = _pad_to_multiple(h), _pad_to_multiple(w)
    x = jnp.pad((x - mean) / std, ((0, 0), (top, bottom), (left, right), (0, 0)))
    y, _ = unet_lib.Unet(
      in_chans=2,
      out_chans=2,
      chans=self.chans,
      num_pool_layers=self.num_pools,
      drop_prob=self.drop_prob,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="unet",
    )(x, train)
    y = y[:, top : top + h, left : left + w].astype(jnp.float32)
    return y * std + mean, {}


def _norm_unet_per_image(model: NormUnet, x_N: jax.Array, train: bool) -> jax.Array:
  """Applies `model` to complex images `[..., H, W]`, flattened into one batch."""
  lead, (h, w) = x_N.shape[:-2], x_N.shape[-2:]
  y, _ = model(to_channels(x_N.reshape(-1, h, w)), train)
  return to_complex(y).reshape(*lead, h, w)


class SensitivityModel(nn.Module):
  """Coil sensitivities from the ACS region of the k-space (module docstring).

  Each coil image `F⁻¹(k⁰_c ⊙ W_acs)` goes through one shared `NormUnet` (`norm_unet`); the
  results are divided by their root sum of squares over coils, without an epsilon (as fastMRI).

  Attributes:
    chans: channels of the NormUnet's first block.
    num_pools: its down/up-sampling steps.
    drop_prob: Dropout2d probability (train only).
    mask_center: restrict the k-space to the ACS window first (fastMRI's default).
    dtype: compute dtype of the U-Net.
    param_dtype: parameter storage dtype.
  """

  chans: int = 8
  num_pools: int = 4
  drop_prob: float = 0.0
  mask_center: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
    self, k_BCHW: jax.Array, mask_BHW: jax.Array, train: bool = False
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Estimates the maps.

    Args:
      k_BCHW: masked k-space, complex.
      mask_BHW: bool sampling masks.
      train: enables dropout.

    Returns:
      `(sens_BCHW, aux)`: complex64 maps with `Σ_c |S_c|² = 1`; aux holds `acs_window` (bool
      `[B, H, W]`, all True when `mask_center` is off).
    """
    if self.mask_center:
      window_BHW = low_frequency_window(mask_BHW)
      k_BCHW = jnp.where(window_BHW[:, None], k_BCHW, 0)
    else:
      window_BHW = jnp.ones(mask_BHW.shape, bool)
    model = NormUnet(
      self.chans,
      self.num_pools,
      self.drop_prob,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="norm_unet",
    )
    s_BCHW = _norm_unet_per_image(model, ifft2c(k_BCHW), train)
    rss_B1HW = jnp.sqrt(jnp.sum(_abs_sq(s_BCHW), axis=1, keepdims=True))
    return s_BCHW / rss_B1HW, {"acs_window": window_BHW}


def sens_expand(x_BHW: jax.Array, sens_BCHW: jax.Array) -> jax.Array:
  """`E(x)_c = F(S_c · x)`: a complex image to multicoil k-space `[B, C, H, W]`."""
  return fft2c(sens_BCHW * x_BHW[:, None])


def sens_reduce(k_BCHW: jax.Array, sens_BCHW: jax.Array) -> jax.Array:
  """`Σ_c conj(S_c) · F⁻¹(k_c)`: multicoil k-space to one complex image `[B, H, W]`."""
  return jnp.sum(jnp.conj(sens_BCHW) * ifft2c(k_BCHW), axis=1)


class VarNetBlock(nn.Module):
  """One cascade: `k - η · M ⊙ (k - k⁰) - E(NormUnet(Rd(k)))` (module docstring).

  The regulariser is the submodule `model` (a `NormUnet`); η is the parameter `dc_weight` of
  shape (1,), initialised to 1.

  Attributes:
    chans: channels of the NormUnet's first block.
    pools: its down/up-sampling steps.
    drop_prob: Dropout2d probability (train only).
    dtype: compute dtype of the U-Net.
    param_dtype: parameter storage dtype.
  """

  chans: int = 18
  pools: int = 4
  drop_prob: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
    self,
    k_BCHW: jax.Array,
    ref_BCHW: jax.Array,
    mask_BHW: jax.Array,
    sens_BCHW: jax.Array,
    train: bool = False,
  ) -> tuple[jax.Array, dict]:
    """One soft-DC + regulariser update of complex k-space `k_BCHW` (ref: the measured k⁰)."""
    dc_weight = self.param("dc_weight", nn.initializers.ones, (1,), self.param_dtype)
    soft_dc = jnp.where(mask_BHW[:, None], k_BCHW - ref_BCHW, 0) * dc_weight.astype(jnp.float32)
    model = NormUnet(
      self.chans,
      self.pools,
      self.drop_prob,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="model",
    )
    x_BHW = _norm_unet_per_image(model, sens_reduce(k_BCHW, sens_BCHW), train)
    return k_BCHW - soft_dc - sens_expand(x_BHW, sens_BCHW), {}


def _mask_BHW(mask: jax.Array, batch: int, shape: tuple[int, int]) -> jax.Array:
  mask = jnp.asarray(mask)
  if mask.shape[-2:] != shape or mask.ndim not in (2, 3):
    raise ValueError(f"the mask must be [H, W] or [B, H, W] with H, W = {shape}, got {mask.shape}")
  return jnp.broadcast_to(mask != 0, (batch, *shape))


class VarNet(nn.Module):
  """E2E-VarNet (module docstring): `num_cascades` `VarNetBlock`s after a `SensitivityModel`.

  Parameter paths mirror fastMRI's keys: `sens_net/norm_unet/unet/...`,
  `cascades_{t}/model/unet/...` and `cascades_{t}/dc_weight`. With `estimate_sens=False` there is
  no `sens_net`, the maps are 1 and the k-space must have one coil: the single-coil variant for
  data without coil maps.

  Attributes:
    num_cascades: number of cascades T.
    sens_chans: channels of the sensitivity NormUnet's first block.
    sens_pools: its down/up-sampling steps.
    chans: channels of each cascade NormUnet's first block.
    pools: its down/up-sampling steps.
    mask_center: restrict the sensitivity input to the ACS window (fastMRI's default).
    estimate_sens: estimate coil maps (multicoil) or use maps of 1 (single coil).
    drop_prob: Dropout2d probability of every U-Net (0 in fastMRI's VarNet).
    dtype: compute dtype of the U-Nets (FFTs and data consistency stay complex64).
    param_dtype: parameter storage dtype.
  """

  num_cascades: int = 12
  sens_chans: int = 8
  sens_pools: int = 4
  chans: int = 18
  pools: int = 4
  mask_center: bool = True
  estimate_sens: bool = True
  drop_prob: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
    self, masked_kspace_BCHW2: jax.Array, mask: jax.Array, train: bool = False
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Reconstructs the RSS magnitude image.

    Args:
      masked_kspace_BCHW2: measured k-space, zero where not sampled, `[B, C, H, W, 2]`.
      mask: sampling mask `[H, W]` or `[B, H, W]`, bool or 0/1 (a fastMRI column mask broadcast
        over rows works as is).
      train: enables dropout (rng "dropout") when `drop_prob > 0`.

    Returns:
      `(rss_BHW, aux)`: float32 `sqrt(Σ_c |F⁻¹ k^T_c|²)`; aux holds `kspace` (the final k^T,
      `[B, C, H, W, 2]`), `sens_maps` (`[B, C, H, W, 2]`), `image` (the coil-combined
      `Σ_c conj(S_c) F⁻¹ k^T_c`, `[B, H, W, 2]`) and `acs_window` (bool `[B, H, W]`).
    """
    if masked_kspace_BCHW2.ndim != 5 or masked_kspace_BCHW2.shape[-1] != 2:
      raise ValueError(f"k-space must be [B, C, H, W, 2], got {masked_kspace_BCHW2.shape}")
    b, c, h, w, _ = masked_kspace_BCHW2.shape
    mask_BHW = _mask_BHW(mask, b, (h, w))
    ref_BCHW = to_complex(masked_kspace_BCHW2)
    kw = dict(drop_prob=self.drop_prob, dtype=self.dtype, param_dtype=self.param_dtype)
    if self.estimate_sens:
      sens_BCHW, sens_aux = SensitivityModel(
        self.sens_chans, self.sens_pools, mask_center=self.mask_center, name="sens_net", **kw
      )(ref_BCHW, mask_BHW, train)
      window_BHW = sens_aux["acs_window"]
    else:
      if c != 1:
        raise ValueError(f"estimate_sens=False is the single-coil variant; got {c} coils")
      sens_BCHW = jnp.ones_like(ref_BCHW)
      window_BHW = jnp.ones(mask_BHW.shape, bool)

    k_BCHW = ref_BCHW
    for t in range(self.num_cascades):
      k_BCHW, _ = VarNetBlock(self.chans, self.pools, name=f"cascades_{t}", **kw)(
        k_BCHW, ref_BCHW, mask_BHW, sens_BCHW, train
      )
    coil_images = ifft2c(k_BCHW)
    rss_BHW = jnp.sqrt(jnp.sum(_abs_sq(coil_images), axis=1))
    aux = {
      "kspace": to_channels(k_BCHW),
      "sens_maps": to_channels(sens_BCHW),
      "image": to_channels(jnp.sum(jnp.conj(sens_BCHW) * coil_images, axis=1)),
      "acs_window": window_BHW,
    }
    return rss_BHW, aux


def init_params(model: VarNet, rng: jax.Array, coils: int = 1, shape: tuple[int, int] = (32, 32)):
  """The `params` collection of `model` for `[1, coils, H, W, 2]` k-space (jitted init)."""
  k = jnp.ones((1, coils, *shape, 2), jnp.float32)
  mask = jnp.ones(shape, bool)
  return jax.jit(model.init)(rng, k, mask)["params"]


def from_fields(fields: Mapping[str, Any], where: str = "", **overrides) -> VarNet:
  """The VarNet of a config section or stored JSON fields (`fields.build`), `overrides` on top."""
  return fields_lib.build(VarNet, {**dict(fields), **overrides}, where or "VarNet fields")
