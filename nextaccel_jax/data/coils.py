"""Multicoil k-space → one complex image plus coil maps at the model grid (fastmri_spec.md §4.2).

The offline half of the preprocessing in decisions.md §2, per slice:

1. geometry check: skip volumes whose k-space is narrower than the recon width ("narrow FLAIR", spec
   §1.3), that have fewer than 2 coils, whose recon grid is smaller than the crop, or whose header
   `encodedSpace` disagrees with the k-space shape;
2. remove the readout oversampling (`ifft2c`, centre crop to the recon size, spec §1.4) and bring
   wide recon grids (384) to a 320 grid by cropping k-space, which keeps the FOV (0.6875 mm pixels);
3. SVD coil compression to a few virtual coils;
4. sensitivities by ESPIRiT (sigpy, spec §3.5) or by low-resolution ratio maps;
5. SENSE-1 combination `x = Σ_c conj(S_c) · m_c`;
6. crop to the model grid (image domain by default, or k-space);
7. one normalisation scale per slice, shared by every undersampling level.

The undersampled levels themselves are computed on the fly from `x` and the maps
(`transforms.undersample_levels`); this module only prepares what is stored.

All FFTs are fastMRI's centred orthonormal transforms (spec §2.1); sigpy's `fft` is the same
transform, so its ESPIRiT sees the k-space exactly as fastMRI would.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import numpy as np

from nextaccel_jax.data import transforms
from nextaccel_jax.data.fastmri import FastMRIVolume, VolumeHeader

MAP_METHODS = ("espirit", "lowres")
RESIZE_MODES = ("image", "kspace")
NORM_MODES = ("fs_max", "r32", "none")


class SkipVolume(Exception):
  """A volume (or slice) whose geometry cannot give the model's crop; callers skip and log it.

  Attributes:
    path: the volume file, or None when only a k-space slice was given.
    reason: what makes the geometry unusable.
  """

  def __init__(self, path, reason: str):
    self.path = None if path is None else str(path)
    self.reason = reason
    super().__init__(f"{self.path}: {reason}" if self.path else reason)


@dataclasses.dataclass
class CombinedSlice:
  """One preprocessed slice, ready to be stored.

  Attributes:
    image: SENSE-1 image divided by `scale`, complex64 `[h, w]`.
    maps: coil sensitivities, complex64 `[V, h, w]`; all-zero maps pad the virtual coils that do not
      exist.
    scale: the divisor applied to `image`; multiplying by it maps the image (and every undersampled
      level derived from it) back to the original k-space units.
    retained_energy: fraction of the coil-image energy kept by coil compression.
  """

  image: np.ndarray
  maps: np.ndarray
  scale: float
  retained_energy: float


# ------------------------------------------------------------------------------------------------
# Geometry


def harmonised_grid(recon_size, harmonise_to: int | None = 320) -> tuple[int, int]:
  """The image grid that `remove_oversampling` returns for a header's recon size.

  A recon width above `harmonise_to` is brought down to `harmonise_to`, and the height by the same
  factor: the reconstruction pixels are square, so one factor keeps them square.
  """
  rec_h, rec_w = int(recon_size[0]), int(recon_size[1])
  if harmonise_to is None or rec_w <= harmonise_to:
    return rec_h, rec_w
  return int(round(rec_h * harmonise_to / rec_w)), int(harmonise_to)


def _geometry_problem(
  kspace_shape_CHW, header: VolumeHeader, crop, harmonise_to: int | None
) -> str | None:
  num_coils, enc_h, enc_w = (int(s) for s in kspace_shape_CHW)
  rec_h, rec_w = int(header.recon_size[0]), int(header.recon_size[1])
  if enc_w < rec_w:
    return (
      f"narrow k-space (narrow FLAIR): width {enc_w} is below the recon width {rec_w}, so the "
      "recon grid cannot be filled"
    )
  if enc_h < rec_h:
    return f"k-space height {enc_h} is below the recon height {rec_h}"
  if num_coils < 2:
    return f"only {num_coils} coil; coil combination needs at least 2"
  grid = harmonised_grid((rec_h, rec_w), harmonise_to)
  if crop[0] > grid[0] or crop[1] > grid[1]:
    return f"crop {tuple(crop)} is larger than the {grid[0]}x{grid[1]} recon grid"
  return None


def check_geometry(
  volume: FastMRIVolume, crop=(256, 256), *, harmonise_to: int | None = 320
) -> None:
  """Raises `SkipVolume` when `volume` cannot give a `crop`-sized image (spec §4.2 step 1).

  Works on metadata alone, so it can run on a `scan_directory` result before any k-space is read.

  The header's `encodedSpace` (x, y) must equal the k-space `(H, W)`. When they disagree the volume
  is skipped rather than built on either guess: the k-space is what was stored, but the recon size
  that removes its oversampling comes from the same header, which evidently describes some other
  grid, so neither can be trusted (and a wrong header would otherwise pass as a narrow FLAIR).
  """
  _, num_coils, enc_h, enc_w = volume.kspace_shape
  hdr_h, hdr_w = (int(s) for s in volume.header.encoded_size[:2])
  if (hdr_h, hdr_w) != (enc_h, enc_w):
    raise SkipVolume(
      volume.path,
      f"header encodedSpace {hdr_h}x{hdr_w} disagrees with k-space {enc_h}x{enc_w}, so its "
      "recon size cannot be trusted either",
    )
  problem = _geometry_problem((num_coils, enc_h, enc_w), volume.header, crop, harmonise_to)
  if problem is not None:
    raise SkipVolume(volume.path, problem)


# ------------------------------------------------------------------------------------------------
# Steps


def _check_coil_stack(name: str, array) -> np.ndarray:
  array = np.asarray(array)
  if array.ndim != 3:
    raise ValueError(f"{name} must be [coils, H, W], got shape {array.shape}")
  if not np.issubdtype(array.dtype, np.inexact):
    raise ValueError(f"{name} must be a complex (or real) floating array, got dtype {array.dtype}")
  return array.astype(np.complex64, copy=False)


def _crop_kspace(images_CHW: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  """Keeps the central `shape` of k-space: same FOV, larger pixels.

  The result is rescaled so that image values keep their size (a constant image stays the same
  constant); with orthonormal FFTs the smaller grid would otherwise inflate them by the square root
  of the area ratio.
  """
  big_h, big_w = images_CHW.shape[-2:]
  k = transforms.center_crop(transforms.fft2c_np(images_CHW), shape)
  gain = np.sqrt(shape[0] * shape[1] / (big_h * big_w))
  return (transforms.ifft2c_np(k) * gain).astype(np.complex64)


def remove_oversampling(
  kspace_CHW: np.ndarray, header: VolumeHeader, *, harmonise_to: int | None = 320
) -> np.ndarray:
  """Coil images on the recon grid, with wide grids harmonised (spec §1.4 and §4.2 step 2).

  Args:
    kspace_CHW: fully sampled k-space of one slice, `[C, H, W]` (H is the oversampled readout).
    header: the volume header; its `recon_size` is the crop that removes the oversampling.
    harmonise_to: recon widths above this are reduced to it by cropping the k-space of the cropped
      images, which keeps the FOV (384 → 320 gives 0.6875 mm pixels over 220 mm). None disables it.

  Returns:
    complex64 coil images `[C, h, w]`; `(h, w) = harmonised_grid(header.recon_size, harmonise_to)`.

  Raises:
    SkipVolume: the k-space is smaller than the recon grid (e.g. narrow FLAIR).
  """
  kspace_CHW = _check_coil_stack("kspace_CHW", kspace_CHW)
  rec_h, rec_w = int(header.recon_size[0]), int(header.recon_size[1])
  enc_h, enc_w = kspace_CHW.shape[-2:]
  if enc_w < rec_w or enc_h < rec_h:
    raise SkipVolume(
      None,
      f"k-space {enc_h}x{enc_w} is smaller than the {rec_h}x{rec_w} recon grid (narrow FLAIR?)",
    )
  images_CHW = transforms.center_crop(transforms.ifft2c_np(kspace_CHW), (rec_h, rec_w))
  grid = harmonised_grid((rec_h, rec_w), harmonise_to)
  if grid != (rec_h, rec_w):
    images_CHW = _crop_kspace(images_CHW, grid)
  return np.ascontiguousarray(images_CHW, np.complex64)


def compress_coils(images_CHW: np.ndarray, num_virtual: int = 5) -> tuple[np.ndarray, float]:
  """SVD coil compression to `num_virtual` virtual coils (spec §4.2 step 3).

  The compression matrix is the leading left singular vectors of the `C × (h·w)` coil matrix. The
  centred FFT is unitary along each row, so the k-space matrix the spec names has the same left
  singular vectors and singular values; working on the images avoids a transform. The singular
  vectors come from the eigen-decomposition of the `C × C` coil covariance, which is far cheaper
  than an SVD of the full matrix.

  Args:
    images_CHW: coil images `[C, h, w]`.
    num_virtual: number of virtual coils to keep.

  Returns:
    `(images_VHW, retained_energy)`. With `C <= num_virtual` the images come back unchanged, with
    `retained_energy = 1.0`; the maps are zero-padded to `num_virtual` later.
  """
  images_CHW = _check_coil_stack("images_CHW", images_CHW)
  if num_virtual < 1:
    raise ValueError(f"num_virtual must be at least 1, got {num_virtual}")
  num_coils, h, w = images_CHW.shape
  if num_coils <= num_virtual:
    return images_CHW.copy(), 1.0
  mat = images_CHW.reshape(num_coils, h * w).astype(np.complex128)
  eigval, eigvec = np.linalg.eigh(mat @ mat.conj().T)
  order = np.argsort(eigval)[::-1]
  eigval = np.clip(eigval[order], 0.0, None)
  basis = eigvec[:, order[:num_virtual]]
  total = float(eigval.sum())
  retained = float(eigval[:num_virtual].sum() / total) if total > 0 else 1.0
  virtual = (basis.conj().T @ mat).reshape(num_virtual, h, w)
  return virtual.astype(np.complex64), retained


def _lowres_maps(kspace_CHW: np.ndarray, calib_width: int) -> np.ndarray:
  # Hann taper over the calibration block suppresses the ringing that a hard low-pass would put into
  # the maps; the interior window avoids the zero end points of np.hanning.
  h, w = kspace_CHW.shape[-2:]
  taper_h = np.hanning(min(calib_width, h) + 2)[1:-1]
  taper_w = np.hanning(min(calib_width, w) + 2)[1:-1]
  window = np.zeros((h, w))
  top, left = (h - taper_h.size) // 2, (w - taper_w.size) // 2
  window[top : top + taper_h.size, left : left + taper_w.size] = np.outer(taper_h, taper_w)
  low_CHW = transforms.ifft2c_np((kspace_CHW * window).astype(np.complex64)).astype(np.complex128)
  norm = np.sqrt(np.sum(np.abs(low_CHW) ** 2, axis=0))
  support = norm > 1e-6 * norm.max() if norm.max() > 0 else np.zeros_like(norm, bool)
  maps_CHW = np.where(support, low_CHW / np.where(support, norm, 1.0), 0.0)
  # Same phase convention as sigpy's ESPIRiT (relative to coil 0), so the combined image has the
  # same phase whichever method made the maps.
  ref = maps_CHW[0]
  ref_phase = np.where(np.abs(ref) > 0, np.conj(ref) / np.maximum(np.abs(ref), 1e-30), 1.0)
  return (maps_CHW * ref_phase).astype(np.complex64)


def estimate_maps(
  images_CHW: np.ndarray,
  method: str = "espirit",
  *,
  calib_width: int = 24,
  thresh: float = 0.02,
  kernel_width: int = 6,
  crop: float = 0.95,
  max_iter: int = 100,
) -> np.ndarray:
  """Coil sensitivity maps from fully sampled coil images (spec §4.2 step 4).

  Args:
    images_CHW: coil images `[C, h, w]`; their k-space is the calibration data.
    method: `"espirit"`: sigpy's `EspiritCalib` with the given parameters. Maps are referenced to
      the phase of coil 0 and are zero where the leading eigenvalue is at most `crop`, so
      `Σ_c |S_c|² = 1` on the object support and 0 outside. `"lowres"`: the fast fallback, coil
      images from the Hann-windowed central `calib_width²` k-space divided by their RSS; `|x|` then
      matches RSS, with no background cropping.
    calib_width: side of the central calibration block; must not exceed the grid.
    thresh: ESPIRiT threshold on the calibration matrix's singular values (relative to the largest).
    kernel_width: ESPIRiT kernel size; must be smaller than `calib_width`.
    crop: ESPIRiT eigenvalue threshold for the support mask.
    max_iter: ESPIRiT power iterations.

  Returns:
    complex64 maps `[C, h, w]`.
  """
  images_CHW = _check_coil_stack("images_CHW", images_CHW)
  if method not in MAP_METHODS:
    raise ValueError(f"method must be one of {MAP_METHODS}, got {method!r}")
  h, w = images_CHW.shape[-2:]
  if not 0 < calib_width <= min(h, w):
    raise ValueError(f"calib_width {calib_width} must be in [1, {min(h, w)}] for a {h}x{w} grid")
  kspace_CHW = transforms.fft2c_np(images_CHW)
  if method == "lowres":
    return _lowres_maps(kspace_CHW, calib_width)
  if not 0 < kernel_width < calib_width:
    raise ValueError(f"kernel_width {kernel_width} must be in [1, calib_width={calib_width})")
  # Imported here: sigpy pulls in numba, which the "lowres" path and the rest of the package avoid.
  from sigpy.mri.app import EspiritCalib

  # sigpy divides by |S_0| to reference the phase, which gives NaN wherever coil 0's map is exactly
  # zero (and everywhere for an all-zero slice); such pixels carry no sensitivity and are zeroed.
  with np.errstate(divide="ignore", invalid="ignore"):
    maps_CHW = EspiritCalib(
      kspace_CHW,
      calib_width=calib_width,
      thresh=thresh,
      kernel_width=kernel_width,
      crop=crop,
      max_iter=max_iter,
      show_pbar=False,
    ).run()
  maps_CHW = np.asarray(maps_CHW).astype(np.complex64)
  return np.where(np.isfinite(maps_CHW), maps_CHW, 0).astype(np.complex64)


def combine(images_CHW: np.ndarray, maps_CHW: np.ndarray) -> np.ndarray:
  """SENSE-1 combination `x = Σ_c conj(S_c) · m_c` (spec §4.2 step 5); complex64 `[h, w]`."""
  images_CHW = _check_coil_stack("images_CHW", images_CHW)
  maps_CHW = _check_coil_stack("maps_CHW", maps_CHW)
  if images_CHW.shape != maps_CHW.shape:
    raise ValueError(
      f"images_CHW {images_CHW.shape} and maps_CHW {maps_CHW.shape} must have the same shape"
    )
  return np.sum(np.conj(maps_CHW) * images_CHW, axis=0).astype(np.complex64)


# ------------------------------------------------------------------------------------------------
# Whole slice / volume


def _normalisation_scale(x_HW, maps_CHW, norm: str, r32_mask) -> float:
  if norm == "none":
    return 1.0
  if norm == "fs_max":
    reference = x_HW
  else:
    if r32_mask is None:
      raise ValueError('norm="r32" needs r32_mask, a bool [h, w] mask on the crop grid')
    mask_HW = np.asarray(r32_mask)
    if mask_HW.shape != x_HW.shape:
      raise ValueError(f"r32_mask has shape {mask_HW.shape}, the crop grid is {x_HW.shape}")
    mask_HW = mask_HW.astype(bool)
    kspace_CHW = mask_HW * transforms.fft2c_np(maps_CHW * x_HW)
    reference = np.sum(np.conj(maps_CHW) * transforms.ifft2c_np(kspace_CHW), axis=0)
  scale = float(np.max(np.abs(reference)))
  if not np.isfinite(scale) or scale <= 0:
    raise ValueError(f'norm="{norm}": the reference image is empty (max |x| = {scale})')
  return scale


def combine_slice(
  kspace_CHW: np.ndarray,
  header: VolumeHeader,
  *,
  num_virtual_coils: int = 5,
  crop=(256, 256),
  maps: str = "espirit",
  resize: str = "image",
  norm: str = "fs_max",
  r32_mask: np.ndarray | None = None,
  harmonise_to: int | None = 320,
  map_options: Mapping[str, object] | None = None,
) -> CombinedSlice:
  """Spec §4.2 steps 2–7 for one fully sampled slice.

  Order: remove oversampling → compress → maps → combine → crop → normalise. With
  `resize="kspace"` the crop moves before the maps: the k-space of the virtual-coil images is
  cropped to `crop` and the maps are estimated on that grid. Cropping the k-space of finished maps
  instead would blur the edge of the ESPIRiT support, so `Σ|S|² = 1` (and with it `A^H A x = x`,
  which makes the fully sampled level equal `x`) would fail along the edge; estimating on the final
  grid keeps it exact and is cheaper.

  Args:
    kspace_CHW: fully sampled k-space `[C, H, W]` of one slice.
    header: the volume header (recon size).
    num_virtual_coils: virtual coils after compression; the maps are zero-padded to this many.
    crop: `(h, w)` of the model grid.
    maps: `"espirit"` or `"lowres"` (see `estimate_maps`).
    resize: `"image"` (centre crop of x and the maps: native pixels, smaller FOV; MambaRecon parity)
      or `"kspace"` (crop of k-space: the whole FOV at coarser pixels).
    norm: `"fs_max"` divides by max |x|; `"r32"` divides by the max magnitude of the R = 32
      multicoil zero-filled image `Σ conj(S) ifft2c(M ⊙ fft2c(S x))`, which is known at deployment;
      `"none"` keeps scale 1. The one scale serves every undersampling level (decisions.md §2).
    r32_mask: bool `[h, w]` R = 32 mask on the crop grid, needed for `norm="r32"`.
    harmonise_to: see `remove_oversampling`.
    map_options: extra keyword arguments for `estimate_maps` (e.g. `calib_width`).

  Raises:
    SkipVolume: the geometry cannot give the crop (narrow k-space, one coil, crop too large).
    ValueError: an unknown option, a missing or misshapen `r32_mask`, or an all-zero slice.
  """
  kspace_CHW = _check_coil_stack("kspace_CHW", kspace_CHW)
  if maps not in MAP_METHODS:
    raise ValueError(f"maps must be one of {MAP_METHODS}, got {maps!r}")
  if resize not in RESIZE_MODES:
    raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
  if norm not in NORM_MODES:
    raise ValueError(f"norm must be one of {NORM_MODES}, got {norm!r}")
  crop = (int(crop[0]), int(crop[1]))
  problem = _geometry_problem(kspace_CHW.shape, header, crop, harmonise_to)
  if problem is not None:
    raise SkipVolume(None, problem)

  images_CHW = remove_oversampling(kspace_CHW, header, harmonise_to=harmonise_to)
  images_VHW, retained = compress_coils(images_CHW, num_virtual_coils)
  if resize == "kspace":
    images_VHW = _crop_kspace(images_VHW, crop)
  maps_VHW = estimate_maps(images_VHW, maps, **dict(map_options or {}))
  x_HW = combine(images_VHW, maps_VHW)
  if resize == "image":
    x_HW = transforms.center_crop(x_HW, crop)
    maps_VHW = transforms.center_crop(maps_VHW, crop)

  scale = _normalisation_scale(x_HW, maps_VHW, norm, r32_mask)
  num_maps = maps_VHW.shape[0]
  if num_maps < num_virtual_coils:
    pad = np.zeros((num_virtual_coils - num_maps, *crop), np.complex64)
    maps_VHW = np.concatenate([maps_VHW, pad], axis=0)
  return CombinedSlice(
    image=np.ascontiguousarray(x_HW / scale, np.complex64),
    maps=np.ascontiguousarray(maps_VHW, np.complex64),
    scale=scale,
    retained_energy=float(retained),
  )


def combine_volume(
  volume: FastMRIVolume, slices: Iterable[int] | None = None, **kwargs
) -> list[CombinedSlice]:
  """`combine_slice` over the slices of a loaded volume (all slices when `slices` is None).

  The geometry is checked once up front, so an unusable volume raises `SkipVolume` (naming the file)
  before any work is done.

  Raises:
    SkipVolume: see `check_geometry`.
    ValueError: the volume was read without k-space, or a slice index is out of range.
  """
  check_geometry(
    volume, kwargs.get("crop", (256, 256)), harmonise_to=kwargs.get("harmonise_to", 320)
  )
  if volume.kspace is None:
    raise ValueError(f"{volume.path}: k-space not loaded; read it with load_kspace=True")
  indices = range(volume.num_slices) if slices is None else [int(i) for i in slices]
  for index in indices:
    if not 0 <= index < volume.num_slices:
      raise ValueError(f"{volume.path}: slice {index} out of range [0, {volume.num_slices})")
  out = []
  for index in indices:
    try:
      out.append(combine_slice(volume.kspace[index], volume.header, **kwargs))
    except ValueError as e:
      raise ValueError(f"{volume.path}: slice {index}: {e}") from e
  return out
