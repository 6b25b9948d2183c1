"""Centred FFTs, multicoil operators and the six-level undersampling (fastmri_spec.md §2.1, §4.2).

Shape legend: B batch, C coils, H×W image grid, L = 6 levels (R = 32, 16, 8, 4, 2, FS), M = 5 masks.

Conventions follow fastMRI exactly: `fft2c(x) = fftshift(fft2(ifftshift(x)), norm="ortho")`
over the last two axes of a complex array, so DC sits at index (H//2, W//2) and the transform
preserves energy. The JAX functions are used in jitted model and loader code; the `*_np` twins
serve the offline builder.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

ACCELERATIONS = (32, 16, 8, 4, 2)
NUM_LEVELS = len(ACCELERATIONS) + 1
_AXES = (-2, -1)


def fft2c(x: jax.Array) -> jax.Array:
  """Centred orthonormal 2-D FFT over the last two axes (complex in, complex out)."""
  x = jnp.fft.ifftshift(x, axes=_AXES)
  return jnp.fft.fftshift(jnp.fft.fft2(x, axes=_AXES, norm="ortho"), axes=_AXES)


def ifft2c(k: jax.Array) -> jax.Array:
  """Centred orthonormal 2-D inverse FFT over the last two axes."""
  k = jnp.fft.ifftshift(k, axes=_AXES)
  return jnp.fft.fftshift(jnp.fft.ifft2(k, axes=_AXES, norm="ortho"), axes=_AXES)


def fft2c_np(x: np.ndarray) -> np.ndarray:
  """numpy twin of `fft2c`; keeps complex64 inputs in complex64."""
  out = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x, axes=_AXES), norm="ortho"), axes=_AXES)
  return out.astype(np.result_type(x.dtype, np.complex64), copy=False)


def ifft2c_np(k: np.ndarray) -> np.ndarray:
  """numpy twin of `ifft2c`; keeps complex64 inputs in complex64."""
  out = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k, axes=_AXES), norm="ortho"), axes=_AXES)
  return out.astype(np.result_type(k.dtype, np.complex64), copy=False)


def center_crop(x, shape: tuple[int, int]):
  """Crops the last two axes to `shape` with fastMRI's offsets `(H-h)//2`, `(W-w)//2`."""
  h, w = shape
  big_h, big_w = x.shape[-2:]
  if h > big_h or w > big_w:
    raise ValueError(f"cannot crop a {big_h}x{big_w} image to {h}x{w}")
  top, left = (big_h - h) // 2, (big_w - w) // 2
  return x[..., top : top + h, left : left + w]


def rss(x, axis: int = 0):
  """Root sum of squares of complex coil images along `axis` (numpy or JAX)."""
  xp = jnp if isinstance(x, jax.Array) else np
  return xp.sqrt(xp.sum(xp.abs(x) ** 2, axis=axis))


def complex_to_channels(x):
  """`[..., H, W]` complex → `[..., H, W, 2]` float32 `[real, imag]` (numpy or JAX)."""
  xp = jnp if isinstance(x, jax.Array) else np
  return xp.stack([x.real, x.imag], axis=-1).astype(xp.float32)


def channels_to_complex(x):
  """`[..., H, W, 2]` `[real, imag]` → `[..., H, W]` complex64 (numpy or JAX)."""
  return (x[..., 0] + 1j * x[..., 1]).astype(np.complex64)


def mc_forward(x_HW: jax.Array, maps_CHW: jax.Array, mask_HW: jax.Array) -> jax.Array:
  """Multicoil forward operator `A x = M ⊙ F(S_c x)` → `[..., C, H, W]` (broadcasts)."""
  return mask_HW[..., None, :, :] * fft2c(maps_CHW * x_HW[..., None, :, :])


def mc_adjoint(k_CHW: jax.Array, maps_CHW: jax.Array) -> jax.Array:
  """Multicoil adjoint `A^H k = Σ_c conj(S_c) F^{-1}(k_c)` (SENSE-1) → `[..., H, W]`."""
  return jnp.sum(jnp.conj(maps_CHW) * ifft2c(k_CHW), axis=-3)


def _stack_levels(x_HW: jax.Array, under_MHW: jax.Array) -> jax.Array:
  # The FS image is the last level; the model sees every level as [real, imag] channels.
  levels = jnp.concatenate([under_MHW, x_HW[..., None, :, :]], axis=-3)
  return complex_to_channels(levels.astype(jnp.complex64))


def undersample_levels(x_HW, maps_CHW, masks_MHW) -> jax.Array:
  """The five undersampled images and the FS image, multicoil adjoint (decisions.md §2).

  `x_R = Σ_c conj(S_c) · ifft2c(M_R ⊙ fft2c(S_c · x))`. With ESPIRiT maps `Σ|S_c|² = 1` on the
  support, so the FS level equals `x` there.

  Args:
    x_HW: complex image `[..., H, W]`.
    maps_CHW: coil sensitivities `[..., C, H, W]`.
    masks_MHW: sampling masks `[..., 5, H, W]` ordered R = 32, 16, 8, 4, 2 (bool or 0/1).

  Returns:
    `[..., 6, H, W, 2]` float32; levels ordered R = 32, 16, 8, 4, 2, FS.
  """
  x_HW = jnp.asarray(x_HW, jnp.complex64)
  maps_CHW = jnp.asarray(maps_CHW, jnp.complex64)
  masks_MHW = jnp.asarray(masks_MHW).astype(jnp.complex64)
  k_CHW = fft2c(maps_CHW * x_HW[..., None, :, :])
  k_MCHW = masks_MHW[..., :, None, :, :] * k_CHW[..., None, :, :, :]
  under_MHW = jnp.sum(jnp.conj(maps_CHW)[..., None, :, :, :] * ifft2c(k_MCHW), axis=-3)
  return _stack_levels(x_HW, under_MHW)


def undersample_levels_single(x_HW, masks_MHW) -> jax.Array:
  """Single-coil variant `x_R = ifft2c(M_R ⊙ fft2c(x))`; same layout as `undersample_levels`."""
  x_HW = jnp.asarray(x_HW, jnp.complex64)
  masks_MHW = jnp.asarray(masks_MHW).astype(jnp.complex64)
  under_MHW = ifft2c(masks_MHW * fft2c(x_HW)[..., None, :, :])
  return _stack_levels(x_HW, under_MHW)


def undersample_levels_np(x_HW: np.ndarray, maps_CHW: np.ndarray | None, masks_MHW) -> np.ndarray:
  """numpy twin of both JAX variants (multicoil when `maps_CHW` is given), for the builder."""
  x_HW = np.asarray(x_HW, np.complex64)
  masks_MHW = np.asarray(masks_MHW, bool)
  if maps_CHW is None:
    under = ifft2c_np(masks_MHW * fft2c_np(x_HW)[..., None, :, :])
  else:
    maps_CHW = np.asarray(maps_CHW, np.complex64)
    k_CHW = fft2c_np(maps_CHW * x_HW[..., None, :, :])
    k_MCHW = masks_MHW[..., :, None, :, :] * k_CHW[..., None, :, :, :]
    under = np.sum(np.conj(maps_CHW)[..., None, :, :, :] * ifft2c_np(k_MCHW), axis=-3)
  levels = np.concatenate([under, x_HW[..., None, :, :]], axis=-3)
  return complex_to_channels(levels.astype(np.complex64))
