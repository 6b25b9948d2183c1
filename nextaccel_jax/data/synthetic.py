"""Synthetic multicoil brain volumes in the exact fastMRI `.h5` layout (fastmri_spec.md §1, §5).

No real fastMRI file is reachable offline, so tests and the demo run on volumes synthesised from
real anatomy: the MNI152 2009a symmetric template shipped inside nilearn's wheel (T1, GM and WM maps
at 1 mm, fastmri_spec.md §5.1). The recipe is fastmri_spec.md §5.2:

1. tissue maps: brain mask `T1 > 0`, CSF `= clip(brain − GM − WM)`, then a dark skull shell and a
   bright scalp-fat shell grown around the brain;
2. contrast from the signal equations with the §5.2 table (spin echo for the T1 family and AXT2,
   inversion recovery for AXFLAIR), partial volume, and the template's own texture;
3. axial slices `rot90(vol[:, :, z])` evenly spaced in z ∈ [40, 140], resampled onto the recon grid
   of a 220 mm FOV, a smooth random phase, rows zero-padded for the 2× readout oversampling;
4. birdcage coils with unit RSS, centred orthonormal FFT (§2.1), complex Gaussian noise, RSS values
   of about 1e-4 to 1e-3;
5. files written by `fastmri.write_volume` with `reconstruction_rss` from `fastmri.rss_from_kspace`.

Every volume is a different "subject" (rotation, scale, shift, bias field, relaxation times, coil
count, noise level, phase), drawn deterministically from its seed. The template's licence is unclear
(§5.1), so volumes are generated at run time into a scratch or cache directory and never committed.
When nilearn is missing, phantominator's MR Shepp-Logan phantom (its M0/T1/T2 maps through the same
signal equations) stands in for the anatomy.

Command line::

  python -m nextaccel_jax.data.synthetic --out /tmp/synth/train --volumes 8 --slices 4 --coils 8 8

Shape legend: S slices, C coils, K channels, H×W the recon grid for images and the encoded grid for
k-space, R×Q an axial slice of the 1 mm template.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import importlib.util
import math
import numbers
import os
import pathlib
import time
from collections.abc import Callable, Sequence

import numpy as np
from scipy import ndimage

from nextaccel_jax.data import fastmri, transforms

ACQUISITIONS = fastmri.ACQUISITIONS
ANATOMIES = ("auto", "mni152", "phantom")
SITE_CODE = 999
FOV_MM = 220.0
SLICE_THICKNESS_MM = 5.0
FIELD_STRENGTH_T = 3.0
Z_RANGE = (40.0, 140.0)
COIL_RADIUS = 1.3
DEFAULT_COILS = (8, 20)
DEFAULT_NOISE_LEVEL = (0.004, 0.012)
RSS_MAX_RANGE = (2e-4, 8e-4)
TEST_ACCELERATIONS = (4, 8)
# Roughly the train-split frequencies of fastmri_spec.md §1.1 (AXT2 ≫ AXT1POST > AXFLAIR ≈ AXT1PRE
# ≈ AXT1), ordered so that the first three volumes already cover the three contrast groups.
DEFAULT_MIX = (
  "AXT2", "AXT1POST", "AXFLAIR", "AXT2", "AXT1PRE", "AXT2", "AXT1POST", "AXT2", "AXT1", "AXT2",
)  # fmt: skip

_Z_MARGIN = 3
_DIST_MARGIN = 16
_SKULL_MM = (4.0, 6.5)
_FAT_MM = (3.0, 5.5)
_Z_JITTER_MM = 2.0
_PHANTOM_SIZE = 192
_TEXTURE_CLIP = (0.7, 1.3)
_MAX_FILE_INDEX = 10**7


# ------------------------------------------------------------------------------------------------
# Tissues and sequences (fastmri_spec.md §5.2)


@dataclasses.dataclass(frozen=True)
class Tissue:
  """Relaxation times (ms) and proton density of one tissue class at 3 T."""

  t1_ms: float
  t2_ms: float
  pd: float


TISSUES = {
  "wm": Tissue(830.0, 80.0, 0.70),
  "gm": Tissue(1330.0, 110.0, 0.82),
  "csf": Tissue(4000.0, 2000.0, 1.0),
  "fat": Tissue(380.0, 130.0, 0.9),
  "skull": Tissue(1000.0, 1.0, 0.05),
}
_BRAIN_TISSUES = ("wm", "gm", "csf")


@dataclasses.dataclass(frozen=True)
class PulseSequence:
  """Timing of one acquisition and how its image is built from the tissue maps.

  Attributes:
    tr_ms: repetition time.
    te_ms: echo time.
    ti_ms: inversion time; None means spin echo, otherwise inversion recovery.
    texture_power: exponent applied to the template texture ratio (1 for T1 weighting, where the
      template's own contrast agrees in sign; 0.5 elsewhere, where it would partly disagree).
    gm_t1_factor: multiplies the grey-matter T1 of the MNI152 anatomy; below 1 mimics gadolinium
      in the blood volume, which shortens T1 more in the better-perfused grey matter.
  """

  tr_ms: float
  te_ms: float
  ti_ms: float | None = None
  texture_power: float = 1.0
  gm_t1_factor: float = 1.0

  def signal(self, pd, t1_ms, t2_ms):
    """Magnitude signal for the given tissue parameters (scalars or arrays, broadcast)."""
    t1_ms = np.maximum(t1_ms, 1e-3)
    decay = np.exp(-self.te_ms / np.maximum(t2_ms, 1e-3))
    recovery = np.exp(-self.tr_ms / t1_ms)
    if self.ti_ms is None:
      return pd * (1.0 - recovery) * decay
    return pd * np.abs(1.0 - 2.0 * np.exp(-self.ti_ms / t1_ms) + recovery) * decay


SEQUENCES = {
  "AXT1": PulseSequence(500.0, 12.0),
  "AXT1PRE": PulseSequence(500.0, 12.0),
  "AXT1POST": PulseSequence(500.0, 12.0, gm_t1_factor=0.93),
  "AXT2": PulseSequence(4000.0, 100.0, texture_power=0.5),
  "AXFLAIR": PulseSequence(9000.0, 120.0, ti_ms=2500.0, texture_power=0.5),
}


def _sequence(acquisition: str) -> PulseSequence:
  try:
    return SEQUENCES[acquisition]
  except (KeyError, TypeError):
    raise ValueError(
      f"acquisition must be one of {', '.join(ACQUISITIONS)}; got {acquisition!r}"
    ) from None


# ------------------------------------------------------------------------------------------------
# Geometry


@dataclasses.dataclass(frozen=True)
class Geometry:
  """k-space and recon grid sizes of a volume; the recon grid always spans a 220 mm FOV.

  Attributes:
    encoded_size: `(H, W)` of the stored k-space; H is the oversampled readout, W the phase encodes.
    recon_size: `(h, w)` of `reconstruction_rss`; the pixel is `220 / w` mm.
    narrow_kspace: allow `W < w` (the narrow-FLAIR quirk of fastmri_spec.md §1.3): the image is
      synthesised at the recon width and its k-space cropped to the W central columns.
  """

  encoded_size: tuple[int, int] = (640, 320)
  recon_size: tuple[int, int] = (320, 320)
  narrow_kspace: bool = False

  def __post_init__(self):
    for name in ("encoded_size", "recon_size"):
      size = getattr(self, name)
      try:
        ok = len(size) == 2 and all(
          isinstance(s, int | np.integer) and s > 0 and s % 2 == 0 for s in size
        )
      except TypeError:
        ok = False
      if not ok:
        raise ValueError(f"{name} must be two positive even integers, got {size!r}")
      object.__setattr__(self, name, tuple(int(s) for s in size))
    (enc_h, enc_w), (rec_h, rec_w) = self.encoded_size, self.recon_size
    if enc_h < rec_h:
      raise ValueError(
        f"encoded_size height {enc_h} must be >= recon_size height {rec_h} (readout oversampling)"
      )
    if enc_w < rec_w and not self.narrow_kspace:
      raise ValueError(
        f"encoded_size width {enc_w} < recon_size width {rec_w}; pass narrow_kspace=True for the "
        "narrow-FLAIR quirk"
      )
    if enc_w >= rec_w and self.narrow_kspace:
      raise ValueError(
        f"narrow_kspace=True needs encoded_size width {enc_w} < recon_size width {rec_w}"
      )

  @property
  def pixel_mm(self) -> float:
    return FOV_MM / self.recon_size[1]

  @property
  def image_size(self) -> tuple[int, int]:
    """The zero-padded coil-image grid whose FFT gives the k-space (before any narrow crop)."""
    return self.encoded_size[0], max(self.encoded_size[1], self.recon_size[1])


GEOMETRIES = {
  "fastmri": Geometry((640, 320), (320, 320)),
  # Half the fastMRI grid: the demo crop of 128² covers the same 176 mm as the paper's 256² crop.
  "demo": Geometry((320, 160), (160, 160)),
  "small": Geometry((256, 128), (128, 128)),
  "tiny": Geometry((128, 64), (64, 64)),
  "recon384": Geometry((768, 396), (384, 384)),
  "narrow_flair": Geometry((640, 260), (320, 320), narrow_kspace=True),
  "tiny_narrow": Geometry((128, 52), (64, 64), narrow_kspace=True),
}


def get_geometry(geometry: str | Geometry) -> Geometry:
  """Returns a `Geometry` given one or the name of a preset in `GEOMETRIES`."""
  if isinstance(geometry, Geometry):
    return geometry
  try:
    return GEOMETRIES[geometry]
  except (KeyError, TypeError):
    raise ValueError(
      f"geometry must be a Geometry or one of {', '.join(GEOMETRIES)}; got {geometry!r}"
    ) from None


# ------------------------------------------------------------------------------------------------
# Anatomy templates


@dataclasses.dataclass(frozen=True)
class _Template:
  """Axial slices of a 1 mm anatomy; `channels_at(z)` returns `[K, R, Q]` for an integer z."""

  channels: tuple[str, ...]
  channels_at: Callable[[int], np.ndarray]
  center_rq: tuple[float, float]

  def slice_at(self, z: float) -> np.ndarray:
    """Channels at a fractional z, linearly interpolated between the two nearest slices."""
    z0 = math.floor(z)
    frac = np.float32(z - z0)
    lower = self.channels_at(z0)
    if frac == 0:
      return lower
    return (1 - frac) * lower + frac * self.channels_at(z0 + 1)


def _mni152_available() -> bool:
  return all(importlib.util.find_spec(m) is not None for m in ("nilearn", "nibabel"))


def _texture_ratio(t1: np.ndarray, probs: Sequence[np.ndarray], brain: np.ndarray) -> np.ndarray:
  """Template T1 divided by its own least-squares tissue-mean model, clipped, 1 outside the brain.

  The tissue means are fitted on the template itself, so the ratio averages about 1 within each
  tissue: it carries the real texture (cortical ribbon, deep grey nuclei) without changing the
  tissue contrast that the signal equations set.
  """
  design = np.stack([p[brain] for p in probs], axis=1)
  means, *_ = np.linalg.lstsq(design, t1[brain], rcond=None)
  model = design @ means
  ratio = np.ones_like(t1)
  ratio[brain] = np.clip(t1[brain] / np.maximum(model, 1e-3), *_TEXTURE_CLIP)
  return ratio


@functools.lru_cache(maxsize=1)
def _mni152_template() -> _Template:
  import nibabel
  from nilearn import datasets

  def load(path):
    return np.asarray(nibabel.load(path).dataobj, np.float32) / 255.0

  t1 = load(datasets.MNI152_FILE_PATH)
  brain = t1 > 0
  gm = load(datasets.GM_MNI152_FILE_PATH) * brain
  wm = load(datasets.WM_MNI152_FILE_PATH) * brain
  # The probability maps may sum above 1 at a few voxels; renormalise so partial volumes add up.
  total = np.maximum(gm + wm, 1.0)
  gm, wm = gm / total, wm / total
  csf = np.clip(brain - gm - wm, 0.0, 1.0)
  texture = _texture_ratio(t1, (wm, gm, csf), brain)
  z_first = max(0, int(Z_RANGE[0]) - _Z_MARGIN)
  z_last = min(t1.shape[2] - 1, int(Z_RANGE[1]) + _Z_MARGIN + 1)
  # A Euclidean distance threshold is a dilation by a ball, and the distance itself lets every
  # subject get its own skull and fat thickness with partial-volume edges. Distances are only
  # needed up to the outer shell, so a z margin beyond it keeps them exact at a lower cost.
  lo, hi = max(0, z_first - _DIST_MARGIN), min(t1.shape[2], z_last + 1 + _DIST_MARGIN)
  dist = ndimage.distance_transform_edt(~brain[..., lo:hi]).astype(np.float32)
  dist = dist[..., z_first - lo : z_last + 1 - lo]
  stack_KXYZ = np.stack([wm, gm, csf, texture])[..., z_first : z_last + 1]
  stack_KXYZ = np.concatenate([stack_KXYZ[:3], dist[None], stack_KXYZ[3:]])
  # rot90 of each vol[:, :, z] puts anterior up (fastmri_spec.md §5.2).
  slices_ZKRQ = np.ascontiguousarray(np.rot90(stack_KXYZ, axes=(1, 2)).transpose(3, 0, 1, 2))
  head_RQ = (slices_ZKRQ[:, 3] <= _SKULL_MM[1] + _FAT_MM[1]).any(axis=0)
  rows, cols = np.nonzero(head_RQ.any(axis=1))[0], np.nonzero(head_RQ.any(axis=0))[0]
  center = ((rows[0] + rows[-1]) / 2.0, (cols[0] + cols[-1]) / 2.0)

  def channels_at(z: int) -> np.ndarray:
    return slices_ZKRQ[int(np.clip(z - z_first, 0, len(slices_ZKRQ) - 1))]

  return _Template(("wm", "gm", "csf", "dist", "texture"), channels_at, center)


@functools.lru_cache(maxsize=256)
def _phantom_slice(z: int) -> np.ndarray:
  from phantominator import mr_shepp_logan

  # One phantom unit is half the matrix; at 1 mm per pixel the head is about 180 mm long, and z
  # uses the same scale so that slices 1 mm apart are 1 mm apart in the phantom too.
  zp = (z - sum(Z_RANGE) / 2) / (_PHANTOM_SIZE / 2)
  m0, t1, t2 = mr_shepp_logan((_PHANTOM_SIZE, _PHANTOM_SIZE, 1), zlims=(zp, zp))
  # phantominator gives T1 and T2 in seconds.
  return np.stack([m0[..., 0], 1e3 * t1[..., 0], 1e3 * t2[..., 0]]).astype(np.float32)


@functools.lru_cache(maxsize=1)
def _phantom_template() -> _Template:
  if importlib.util.find_spec("phantominator") is None:
    raise ImportError("the phantom anatomy needs phantominator (pip install phantominator)")
  center = ((_PHANTOM_SIZE - 1) / 2.0, (_PHANTOM_SIZE - 1) / 2.0)
  return _Template(("m0", "t1", "t2"), _phantom_slice, center)


def _resolve_anatomy(anatomy: str) -> str:
  if anatomy not in ANATOMIES:
    raise ValueError(f"anatomy must be one of {', '.join(ANATOMIES)}; got {anatomy!r}")
  if anatomy == "auto":
    return "mni152" if _mni152_available() else "phantom"
  return anatomy


def _template(anatomy: str) -> _Template:
  return _mni152_template() if anatomy == "mni152" else _phantom_template()


# ------------------------------------------------------------------------------------------------
# Subjects


@dataclasses.dataclass(frozen=True)
class _SmoothField:
  """A sum of random low-frequency cosines over (y, x, z), with unit standard deviation."""

  freqs_K3: np.ndarray
  phases_K: np.ndarray

  @classmethod
  def draw(cls, rng: np.random.Generator, num_terms: int, max_cycles: float) -> _SmoothField:
    freqs = rng.uniform(-max_cycles, max_cycles, size=(num_terms, 3))
    return cls(freqs, rng.uniform(0.0, 2 * np.pi, size=num_terms))

  def __call__(self, y_H: np.ndarray, x_W: np.ndarray, z: float) -> np.ndarray:
    """Evaluates the field on a grid; coordinates are in units of the FOV."""
    arg = (
      self.freqs_K3[:, 0, None, None] * y_H[None, :, None]
      + self.freqs_K3[:, 1, None, None] * x_W[None, None, :]
      + self.freqs_K3[:, 2, None, None] * z
    )
    terms = np.cos(2 * np.pi * arg + self.phases_K[:, None, None])
    return (np.sqrt(2.0 / len(self.phases_K)) * terms.sum(axis=0)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class _Subject:
  """Everything that makes one synthetic subject differ from another."""

  angle_rad: float
  scale: float
  shift_mm: np.ndarray
  dz_mm: float
  skull_mm: float
  fat_mm: float
  t1_factors: dict[str, float]
  t2_factors: dict[str, float]
  bias: _SmoothField
  bias_strength: float
  phase: _SmoothField
  phase_rad: float
  phase_offset: float


def _draw_subject(rng: np.random.Generator) -> _Subject:
  # A shared scanner-level factor times a small per-tissue one keeps the total within about ±10 %
  # while never swapping the order of tissues (independent ±10 % could erase the T1 GM/WM contrast).
  g1, g2 = rng.uniform(0.93, 1.07, size=2)
  t1_factors = {t: float(g1 * rng.uniform(0.97, 1.03)) for t in TISSUES}
  t2_factors = {t: float(g2 * rng.uniform(0.97, 1.03)) for t in TISSUES}
  return _Subject(
    angle_rad=float(np.deg2rad(rng.uniform(-5.0, 5.0))),
    scale=float(rng.uniform(0.9, 1.1)),
    shift_mm=rng.uniform(-6.0, 6.0, size=2),
    dz_mm=float(rng.uniform(-_Z_JITTER_MM, _Z_JITTER_MM)),
    skull_mm=float(rng.uniform(*_SKULL_MM)),
    fat_mm=float(rng.uniform(*_FAT_MM)),
    t1_factors=t1_factors,
    t2_factors=t2_factors,
    bias=_SmoothField.draw(rng, 6, 0.75),
    bias_strength=float(rng.uniform(0.05, 0.15)),
    phase=_SmoothField.draw(rng, 6, 1.0),
    phase_rad=float(rng.uniform(0.6, 1.2)),
    phase_offset=float(rng.uniform(0.0, 2 * np.pi)),
  )


def _soft_within(dist: np.ndarray, radius: float) -> np.ndarray:
  # Fraction of a 1 mm voxel closer than `radius` to the brain, for partial-volume shell edges.
  return np.clip(radius + 0.5 - dist, 0.0, 1.0) * (dist > 0)


def _mni152_signal(ch_KRQ, seq: PulseSequence, subject: _Subject):
  wm, gm, csf, dist, texture = ch_KRQ
  maps = {"wm": wm, "gm": gm, "csf": csf}
  inner = _soft_within(dist, subject.skull_mm)
  maps["skull"] = inner
  maps["fat"] = _soft_within(dist, subject.skull_mm + subject.fat_mm) - inner
  level = {}
  for name, tissue in TISSUES.items():
    t1 = tissue.t1_ms * subject.t1_factors[name] * (seq.gm_t1_factor if name == "gm" else 1.0)
    level[name] = float(seq.signal(tissue.pd, t1, tissue.t2_ms * subject.t2_factors[name]))
  brain = sum(maps[t] * level[t] for t in _BRAIN_TISSUES) * texture**seq.texture_power
  signal = brain + maps["skull"] * level["skull"] + maps["fat"] * level["fat"]
  return signal.astype(np.float32), maps


def _phantom_signal(ch_KRQ, seq: PulseSequence, subject: _Subject):
  m0, t1, t2 = ch_KRQ
  # The phantom has no tissue labels, so one subject-wide jitter factor scales every T1 and T2.
  signal = seq.signal(
    np.maximum(m0, 0.0), t1 * subject.t1_factors["wm"], t2 * subject.t2_factors["wm"]
  )
  return np.where(m0 > 0, signal, 0.0).astype(np.float32), {}


def _resample(stack_KRQ, center_rq, size_hw, pixel_mm, subject: _Subject) -> np.ndarray:
  """Rotates, scales and shifts template channels onto the output grid (linear interpolation)."""
  h, w = size_hw
  step = pixel_mm / subject.scale  # template pixels per output pixel
  if step > 1:
    # Anti-alias before shrinking; (step − 1)/2 is the usual Gaussian width for a factor `step`.
    sigma = (step - 1) / 2
    stack_KRQ = ndimage.gaussian_filter(stack_KRQ, sigma=(0, sigma, sigma), mode="constant")
  cos, sin = math.cos(subject.angle_rad), math.sin(subject.angle_rad)
  rot_inv = np.array([[cos, sin], [-sin, cos]])
  matrix = step * rot_inv
  out_center = np.array([(h - 1) / 2, (w - 1) / 2])
  offset = np.asarray(center_rq) - matrix @ out_center - rot_inv @ subject.shift_mm / subject.scale
  out = np.empty((len(stack_KRQ), h, w), np.float32)
  for k, channel in enumerate(stack_KRQ):
    ndimage.affine_transform(
      channel, matrix, offset, output_shape=(h, w), output=out[k], order=1, mode="constant"
    )
  return out


def birdcage_maps(
  num_coils: int, size_hw: tuple[int, int], *, radius: float = COIL_RADIUS, angle: float = 0.0
) -> np.ndarray:
  """Birdcage-style receive sensitivities with unit root-sum-of-squares, `[C, H, W]` complex64.

  Coil c is a small loop on a circle of `radius` (in units of the half-FOV) at angle
  `angle + 2πc/C`. Its sensitivity falls off as the inverse distance and its phase winds once
  around the loop. Unlike `sigpy.mri.birdcage_maps`, x and y are both normalised by the half-width,
  so coils stay circular on non-square grids.

  Args:
    num_coils: number of coils C (>= 1).
    size_hw: image grid `(H, W)`; the half-FOV is W/2 pixels.
    radius: radius of the coil circle.
    angle: rotation of the whole array in radians.
  """
  if int(num_coils) < 1:
    raise ValueError(f"num_coils must be >= 1, got {num_coils}")
  h, w = size_hw
  half = w / 2.0
  y_H = (np.arange(h) - h / 2.0) / half
  x_W = (np.arange(w) - w / 2.0) / half
  alpha_C = angle + 2 * np.pi * np.arange(num_coils) / num_coils
  dy_CHW = y_H[None, :, None] - radius * np.sin(alpha_C)[:, None, None]
  dx_CHW = x_W[None, None, :] - radius * np.cos(alpha_C)[:, None, None]
  dist_CHW = np.maximum(np.hypot(dx_CHW, dy_CHW), 1e-6)
  maps_CHW = np.exp(1j * (np.arctan2(dy_CHW, dx_CHW) - alpha_C[:, None, None])) / dist_CHW
  maps_CHW /= np.sqrt(np.sum(np.abs(maps_CHW) ** 2, axis=0, keepdims=True))
  return maps_CHW.astype(np.complex64)


# ------------------------------------------------------------------------------------------------
# Volumes


@dataclasses.dataclass
class SyntheticVolume:
  """One synthetic volume plus the ground truth behind it.

  Attributes:
    kspace_SCHW: fully sampled k-space `[S, C, H, W]` complex64 on the encoded grid.
    reconstruction_rss: `[S, h, w]` float32, fastMRI's target recipe (fastmri_spec.md §1.4).
    header: ISMRMRD XML bytes.
    acquisition: one of `ACQUISITIONS`.
    patient_id: sha256 hex string, the same for every acquisition of one seed.
    m_SHW: noiseless complex image `[S, h, w]` complex64 on the recon grid.
    maps_SCHW: coil sensitivities `[S, C, h, w]` (a read-only view; the same for every slice).
    tissues: tissue fractions `[S, h, w]` on the recon grid keyed by tissue name (empty for the
      phantom).
    geometry: the grid sizes.
    anatomy: "mni152" or "phantom".
    slice_z: template z coordinate of each slice, in 1 mm voxels.
    noise_std: standard deviation of the complex k-space noise per coil and sample.
    sequence: the pulse sequence used.
  """

  kspace_SCHW: np.ndarray
  reconstruction_rss: np.ndarray
  header: bytes
  acquisition: str
  patient_id: str
  m_SHW: np.ndarray
  maps_SCHW: np.ndarray
  tissues: dict[str, np.ndarray]
  geometry: Geometry
  anatomy: str
  slice_z: np.ndarray
  noise_std: float
  sequence: PulseSequence

  @property
  def num_slices(self) -> int:
    return self.kspace_SCHW.shape[0]

  @property
  def num_coils(self) -> int:
    return self.kspace_SCHW.shape[1]


_STREAMS = ("subject", "coils", "levels", "noise", "mask")


def _rng(entropy: tuple[int, ...], stream: str, *extra: int) -> np.random.Generator:
  # Independent streams per purpose: changing the coil range or slice count of a seed leaves its
  # anatomy untouched.
  key = (_STREAMS.index(stream), *extra)
  return np.random.default_rng(np.random.SeedSequence(entropy, spawn_key=key))


def _seed_entropy(seed) -> tuple[int, ...]:
  values = (seed,) if isinstance(seed, int | np.integer) else seed
  try:
    values = tuple(values)
  except TypeError:
    values = None
  if not values or any(
    isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 0 for v in values
  ):
    raise ValueError(f"seed must be a non-negative integer or a sequence of them, got {seed!r}")
  return tuple(int(v) for v in values)


def _coil_range(coils) -> tuple[int, int]:
  try:
    lo, hi = (coils, coils) if isinstance(coils, int | np.integer) else tuple(coils)
  except (TypeError, ValueError):
    lo = hi = None
  if not (isinstance(lo, int | np.integer) and isinstance(hi, int | np.integer) and 1 <= lo <= hi):
    raise ValueError(
      f"coils must be an int >= 1 or a (min, max) pair with 1 <= min <= max; {coils!r}"
    )
  return int(lo), int(hi)


def _noise_range(noise_level) -> tuple[float, float]:
  try:
    lo, hi = (
      (noise_level, noise_level) if isinstance(noise_level, numbers.Real) else tuple(noise_level)
    )
  except (TypeError, ValueError):
    lo = hi = None
  if not (isinstance(lo, numbers.Real) and isinstance(hi, numbers.Real) and 0 <= lo <= hi):
    raise ValueError(
      f"noise_level must be a float >= 0 or a (min, max) pair with 0 <= min <= max; {noise_level!r}"
    )
  return float(lo), float(hi)


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
  # Always one draw, so the streams stay aligned whether or not the range is degenerate.
  u = rng.uniform()
  if lo <= 0 or lo == hi:
    return lo + u * (hi - lo)
  return float(lo * (hi / lo) ** u)


def _positive_int(value, name: str) -> int:
  if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
    raise ValueError(f"{name} must be a positive integer, got {value!r}")
  return int(value)


def slice_positions(num_slices: int) -> np.ndarray:
  """Template z of `num_slices` axial slices evenly spaced over `Z_RANGE` (slab centres)."""
  lo, hi = Z_RANGE
  return lo + (np.arange(num_slices) + 0.5) * (hi - lo) / num_slices


def generate_volume(
  seed: int | Sequence[int],
  acquisition: str = "AXT2",
  *,
  num_slices: int = 16,
  coils: int | tuple[int, int] = DEFAULT_COILS,
  geometry: str | Geometry = "fastmri",
  noise_level: float | tuple[float, float] = DEFAULT_NOISE_LEVEL,
  anatomy: str = "auto",
) -> SyntheticVolume:
  """Synthesises one fully sampled multicoil volume (fastmri_spec.md §5.2).

  Args:
    seed: non-negative int or sequence of them. The seed fixes the subject: the same seed gives
      the same anatomy, coils and phase for every acquisition.
    acquisition: one of `ACQUISITIONS`.
    num_slices: axial slices, evenly spaced over `Z_RANGE` of the template.
    coils: fixed coil count or an inclusive `(min, max)` range to draw from.
    geometry: a `Geometry` or a name in `GEOMETRIES`.
    noise_level: standard deviation of the complex k-space noise of each coil relative to the
      largest image magnitude, fixed or an inclusive `(min, max)` range drawn log-uniformly.
    anatomy: "mni152" (nilearn's template), "phantom" (phantominator) or "auto" (the template when
      nilearn and nibabel are installed, otherwise the phantom).

  Returns:
    The volume, its target and header, and the ground truth used to make it.

  Raises:
    ValueError: an argument is out of range or names an unknown acquisition, geometry or anatomy.
  """
  seq = _sequence(acquisition)
  geom = get_geometry(geometry)
  num_slices = _positive_int(num_slices, "num_slices")
  coil_lo, coil_hi = _coil_range(coils)
  noise_lo, noise_hi = _noise_range(noise_level)
  anatomy = _resolve_anatomy(anatomy)
  entropy = _seed_entropy(seed)
  template = _template(anatomy)
  subject = _draw_subject(_rng(entropy, "subject"))

  coil_rng = _rng(entropy, "coils")
  num_coils = int(coil_rng.integers(coil_lo, coil_hi + 1))
  maps_CHW = birdcage_maps(
    num_coils, geom.recon_size, angle=float(coil_rng.uniform(0, 2 * np.pi / num_coils))
  )
  level_rng = _rng(entropy, "levels")
  noise_level = _log_uniform(level_rng, noise_lo, noise_hi)
  rss_max = _log_uniform(level_rng, *RSS_MAX_RANGE)

  rec_h, rec_w = geom.recon_size
  pixel = geom.pixel_mm
  y_H = (np.arange(rec_h) - rec_h / 2) * pixel / FOV_MM
  x_W = (np.arange(rec_w) - rec_w / 2) * pixel / FOV_MM
  signal_fn = _mni152_signal if anatomy == "mni152" else _phantom_signal
  slice_z = np.clip(slice_positions(num_slices) + subject.dz_mm, *Z_RANGE)
  m_SHW = np.empty((num_slices, rec_h, rec_w), np.complex64)
  tissues: dict[str, np.ndarray] = {}
  for s, z in enumerate(slice_z):
    signal_RQ, maps = signal_fn(template.slice_at(z), seq, subject)
    out_KHW = _resample(
      np.stack([signal_RQ, *maps.values()]), template.center_rq, (rec_h, rec_w), pixel, subject
    )
    for name, frac_HW in zip(maps, out_KHW[1:], strict=True):
      tissues.setdefault(name, np.empty((num_slices, rec_h, rec_w), np.float32))[s] = frac_HW
    zn = (z - sum(Z_RANGE) / 2) / FOV_MM
    bias = np.exp(subject.bias_strength * subject.bias(y_H, x_W, zn))
    phase = subject.phase_offset + subject.phase_rad * subject.phase(y_H, x_W, zn)
    m_SHW[s] = np.maximum(out_KHW[0], 0.0) * bias * np.exp(1j * phase)
  peak = float(np.abs(m_SHW).max())
  if peak > 0:
    m_SHW *= np.float32(rss_max / peak)
  noise_std = noise_level * rss_max

  # Each acquisition of a subject is a separate scan with its own noise.
  noise_rng = _rng(entropy, "noise", ACQUISITIONS.index(acquisition))
  kspace_SCHW = _to_kspace(m_SHW, maps_CHW, geom, noise_std, noise_rng)
  header = fastmri.make_ismrmrd_header(
    geom.encoded_size,
    geom.recon_size,
    num_slices=num_slices,
    num_coils=num_coils,
    protocol_name=acquisition,
    field_strength_t=FIELD_STRENGTH_T,
    recon_fov_mm=(pixel * rec_h, pixel * rec_w, SLICE_THICKNESS_MM),
  )
  digest = hashlib.sha256(f"nextaccel_jax.synthetic:{anatomy}:{entropy}".encode()).hexdigest()
  return SyntheticVolume(
    kspace_SCHW=kspace_SCHW,
    reconstruction_rss=target_rss(kspace_SCHW, geom),
    header=header,
    acquisition=acquisition,
    patient_id=digest,
    m_SHW=m_SHW,
    maps_SCHW=np.broadcast_to(maps_CHW, (num_slices, *maps_CHW.shape)),
    tissues=tissues,
    geometry=geom,
    anatomy=anatomy,
    slice_z=slice_z,
    noise_std=noise_std,
    sequence=seq,
  )


def _to_kspace(m_SHW, maps_CHW, geom: Geometry, noise_std: float, rng) -> np.ndarray:
  """Coil images, zero-padded to the encoded grid, to noisy k-space `[S, C, H, W]`."""
  rec_h, rec_w = geom.recon_size
  img_h, img_w = geom.image_size
  enc_w = geom.encoded_size[1]
  # fastMRI's centre-crop offsets, so the recon crop returns exactly the synthesised grid.
  top, left = (img_h - rec_h) // 2, (img_w - rec_w) // 2
  col = (img_w - enc_w) // 2
  num_coils = maps_CHW.shape[0]
  kspace_SCHW = np.empty((len(m_SHW), num_coils, img_h, enc_w), np.complex64)
  coil_CHW = np.zeros((num_coils, img_h, img_w), np.complex64)
  for s, m_HW in enumerate(m_SHW):
    coil_CHW[:, top : top + rec_h, left : left + rec_w] = maps_CHW * m_HW
    kspace_SCHW[s] = transforms.fft2c_np(coil_CHW)[..., col : col + enc_w]
    noise = rng.standard_normal((num_coils, img_h, enc_w, 2), dtype=np.float32)
    kspace_SCHW[s] += np.float32(noise_std / np.sqrt(2)) * noise.view(np.complex64)[..., 0]
  return kspace_SCHW


def target_rss(kspace_SCHW: np.ndarray, geometry: str | Geometry) -> np.ndarray:
  """`reconstruction_rss` for a volume: fastMRI's recipe, slice by slice to bound memory.

  Narrow k-space is zero-padded to the recon width first (same FOV, lower phase-encode resolution),
  since the recipe's centre crop cannot widen an image.
  """
  geom = get_geometry(geometry)
  rec_w = geom.recon_size[1]
  out = np.empty((kspace_SCHW.shape[0], *geom.recon_size), np.float32)
  for s, k_CHW in enumerate(kspace_SCHW):
    if k_CHW.shape[-1] < rec_w:
      pad = (rec_w - k_CHW.shape[-1]) // 2
      k_CHW = np.pad(k_CHW, ((0, 0), (0, 0), (pad, rec_w - k_CHW.shape[-1] - pad)))
    out[s] = fastmri.rss_from_kspace(k_CHW[None], geom.recon_size)[0]
  return out


# ------------------------------------------------------------------------------------------------
# Datasets


def volume_filename(acquisition: str, index: int) -> str:
  """`file_brain_<ACQ>_999_<7-digit index>.h5`; site code 999 marks synthetic data."""
  _sequence(acquisition)
  if not 0 <= index < _MAX_FILE_INDEX:
    raise ValueError(f"index must be in [0, {_MAX_FILE_INDEX}), got {index}")
  return f"file_brain_{acquisition}_{SITE_CODE}_{index:07d}.h5"


def equispaced_mask(width: int, acceleration: int, rng: np.random.Generator):
  """A fastMRI-style equispaced 1-D mask over W (fastmri_spec.md §3.1) for test-style files.

  The centre block holds `round(W · 0.32 / R)` columns (0.08 at 4×, 0.04 at 8×, as in the brain
  test set), starting at `(W − n + 1) // 2`; every R-th column from a random offset is added.

  Returns:
    `(mask_W, num_low_frequency)`.
  """
  num_low = max(1, round(width * 0.32 / acceleration))
  mask = np.zeros(width, bool)
  start = (width - num_low + 1) // 2
  mask[start : start + num_low] = True
  mask[int(rng.integers(acceleration)) :: acceleration] = True
  return mask, num_low


def _acquisition_list(acquisitions) -> tuple[str, ...]:
  if acquisitions is None:
    return DEFAULT_MIX
  if isinstance(acquisitions, str):
    acquisitions = [a.strip() for a in acquisitions.split(",") if a.strip()]
  acquisitions = tuple(acquisitions)
  if not acquisitions:
    raise ValueError(f"acquisitions must name at least one of {', '.join(ACQUISITIONS)}")
  for acquisition in acquisitions:
    _sequence(acquisition)
  return acquisitions


def _existing_is_complete(path, num_slices, geom: Geometry, test_style: bool) -> bool:
  """True when `path` is a readable volume made with these settings; raises if made with others."""
  try:
    vol = fastmri.read_volume(path, load_kspace=False)
  except fastmri.FastMRIFileError:
    return False
  got = (vol.num_slices, vol.kspace_shape[2:], vol.header.recon_size[:2], vol.is_test_file)
  want = (num_slices, geom.encoded_size, geom.recon_size, test_style)
  if got != want:
    raise ValueError(
      f"{path} exists with (slices, encoded, recon, test_style) = {got}, not {want}; "
      "pass overwrite=True or write to another directory"
    )
  return True


def write_dataset(
  out_dir: os.PathLike | str,
  num_volumes: int,
  *,
  seed: int = 0,
  acquisitions: Sequence[str] | str | None = None,
  num_slices: int = 16,
  coils: int | tuple[int, int] = DEFAULT_COILS,
  geometry: str | Geometry = "fastmri",
  test_style: bool = False,
  start_index: int = 0,
  overwrite: bool = False,
  noise_level: float | tuple[float, float] = DEFAULT_NOISE_LEVEL,
  anatomy: str = "auto",
  accelerations: Sequence[int] = TEST_ACCELERATIONS,
  progress: Callable[[pathlib.Path, str, float], None] | None = None,
) -> list[pathlib.Path]:
  """Writes volumes `start_index … start_index + num_volumes − 1` as fastMRI `.h5` files.

  Volume i depends only on `(seed, i)` and the settings, so an interrupted run can be resumed and
  a dataset grown with `start_index`: files already present are checked and skipped. `(seed, i)`
  also fixes the subject, so give each split its own seed (or disjoint index ranges), or the
  splits will share subjects. File names carry only the index, so splits written with different
  seeds reuse names; use disjoint index ranges where names must be unique across splits, as they
  are in real fastMRI.

  Args:
    out_dir: split directory; created if needed. Keep it free of other files (fastMRI's loader
      opens everything in a split directory).
    num_volumes: how many volumes (>= 0).
    seed: dataset seed (non-negative int).
    acquisitions: volume i gets `acquisitions[i % len(acquisitions)]`; a comma-separated string is
      accepted. None uses `DEFAULT_MIX` (AXT2 most common, then AXT1POST, AXFLAIR, AXT1PRE, AXT1).
    num_slices: slices per volume.
    coils: fixed coil count or an inclusive `(min, max)` range, drawn per volume.
    geometry: a `Geometry` or a name in `GEOMETRIES`.
    test_style: write challenge-style files instead: k-space masked with an equispaced 1-D mask
      over W, a `mask` dataset, attrs `acceleration` and `num_low_frequency`, no target.
    start_index: index of the first volume (also its file id).
    overwrite: regenerate files that already exist.
    noise_level: as in `generate_volume`.
    anatomy: as in `generate_volume`.
    accelerations: test-style accelerations, one drawn per volume.
    progress: called as `progress(path, "wrote" | "skipped", seconds)` after each file.

  Returns:
    The paths of all `num_volumes` files, in index order.

  Raises:
    ValueError: a bad argument, or an existing file made with different settings.
  """
  seed = _seed_entropy(seed)
  if len(seed) != 1:
    raise ValueError(f"seed must be a single non-negative integer, got {seed!r}")
  if isinstance(num_volumes, bool) or not isinstance(num_volumes, int | np.integer):
    raise ValueError(f"num_volumes must be a non-negative integer, got {num_volumes!r}")
  if isinstance(start_index, bool) or not isinstance(start_index, int | np.integer):
    raise ValueError(f"start_index must be a non-negative integer, got {start_index!r}")
  if num_volumes < 0 or start_index < 0 or start_index + num_volumes > _MAX_FILE_INDEX:
    raise ValueError(
      f"num_volumes ({num_volumes}) and start_index ({start_index}) must be >= 0 with a sum of at "
      f"most {_MAX_FILE_INDEX}"
    )
  acquisition_list = _acquisition_list(acquisitions)
  geom = get_geometry(geometry)
  num_slices = _positive_int(num_slices, "num_slices")
  _coil_range(coils)
  _noise_range(noise_level)
  _resolve_anatomy(anatomy)
  accelerations = tuple(accelerations)
  if not accelerations or any(_positive_int(r, "accelerations") < 2 for r in accelerations):
    raise ValueError(f"accelerations must be integers >= 2, got {accelerations!r}")

  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  paths = []
  for index in range(start_index, start_index + num_volumes):
    start = time.perf_counter()
    acquisition = acquisition_list[index % len(acquisition_list)]
    path = out_dir / volume_filename(acquisition, index)
    others = [
      p for p in out_dir.glob(f"file_brain_*_{SITE_CODE}_{index:07d}.h5") if p.name != path.name
    ]
    if others:
      raise ValueError(
        f"{others[0]} already holds volume {index} with another acquisition than {acquisition}; "
        "use the acquisitions of the first run or another directory"
      )
    paths.append(path)
    if (
      path.exists() and not overwrite and _existing_is_complete(path, num_slices, geom, test_style)
    ):
      if progress is not None:
        progress(path, "skipped", time.perf_counter() - start)
      continue

    vol = generate_volume(
      (*seed, index),
      acquisition,
      num_slices=num_slices,
      coils=coils,
      geometry=geom,
      noise_level=noise_level,
      anatomy=anatomy,
    )
    common = dict(acquisition=acquisition, patient_id=vol.patient_id, header=vol.header)
    if test_style:
      mask_rng = _rng((*seed, index), "mask")
      acceleration = int(accelerations[int(mask_rng.integers(len(accelerations)))])
      mask_W, num_low = equispaced_mask(vol.kspace_SCHW.shape[-1], acceleration, mask_rng)
      fastmri.write_volume(
        path,
        vol.kspace_SCHW * mask_W.astype(np.complex64),
        mask=mask_W,
        extra_attrs={"acceleration": acceleration, "num_low_frequency": num_low},
        **common,
      )
    else:
      fastmri.write_volume(
        path, vol.kspace_SCHW, reconstruction_rss=vol.reconstruction_rss, **common
      )
    if progress is not None:
      progress(path, "wrote", time.perf_counter() - start)
  return paths


# ------------------------------------------------------------------------------------------------
# Command line


def main(argv: Sequence[str] | None = None) -> int:
  """Command-line entry point; see the module docstring. Returns the exit status."""
  parser = argparse.ArgumentParser(
    prog="python -m nextaccel_jax.data.synthetic",
    description="Write synthetic multicoil brain volumes in the fastMRI .h5 layout.",
  )
  parser.add_argument("--out", required=True, help="output split directory")
  parser.add_argument("--volumes", type=int, required=True, help="number of volumes")
  parser.add_argument(
    "--seed", type=int, default=0, help="dataset seed; use a different one for each split"
  )
  parser.add_argument("--slices", type=int, default=16, help="slices per volume")
  parser.add_argument(
    "--coils", type=int, nargs=2, default=DEFAULT_COILS, metavar=("MIN", "MAX"),
    help="inclusive range of the coil count",
  )  # fmt: skip
  parser.add_argument("--geometry", default="fastmri", choices=sorted(GEOMETRIES))
  parser.add_argument(
    "--acquisitions", default=None, help=f"comma-separated subset of {','.join(ACQUISITIONS)}"
  )
  parser.add_argument("--test-style", action="store_true", help="masked challenge-style files")
  parser.add_argument("--start-index", type=int, default=0)
  parser.add_argument("--overwrite", action="store_true")
  parser.add_argument("--anatomy", default="auto", choices=ANATOMIES)
  args = parser.parse_args(argv)

  counts = {"wrote": 0, "skipped": 0}

  def report(path: pathlib.Path, action: str, seconds: float) -> None:
    counts[action] += 1
    print(f"{action} {path} ({seconds:.1f} s)", flush=True)

  start = time.perf_counter()
  try:
    paths = write_dataset(
      args.out,
      args.volumes,
      seed=args.seed,
      acquisitions=args.acquisitions,
      num_slices=args.slices,
      coils=tuple(args.coils),
      geometry=args.geometry,
      test_style=args.test_style,
      start_index=args.start_index,
      overwrite=args.overwrite,
      anatomy=args.anatomy,
      progress=report,
    )
  except ValueError as e:
    parser.error(str(e))
  print(
    f"{len(paths)} volumes in {args.out}: {counts['wrote']} written, {counts['skipped']} skipped, "
    f"{time.perf_counter() - start:.1f} s"
  )
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
