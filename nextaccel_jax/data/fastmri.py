"""fastMRI multicoil `.h5` volumes: reading, validation, directory scans and writing
(fastmri_spec.md §1).

A volume file holds `kspace` `[slices, coils, H, W]` complex64 (H is the 2×-oversampled
readout, W the phase encode axis), an optional `reconstruction_rss` `[slices, h, w]`, an
ISMRMRD XML header and attributes. Test files carry a 1-D `mask` over W and no target. This
module reproduces fastMRI's `SliceDataset` metadata semantics with h5py alone (importing
`fastmri` pulls in torch and lightning).

Every problem with a file surfaces as `FastMRIFileError`, which names the file and what is
wrong, so a directory scan can skip the file, report it and go on.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping

import h5py
import numpy as np

from nextaccel_jax.data import transforms

ISMRMRD_NS = "http://www.ismrm.org/ISMRMRD"
ACQUISITIONS = ("AXT1", "AXT1PRE", "AXT1POST", "AXT2", "AXFLAIR")
CONTRAST_GROUPS = ("T1", "T2", "FLAIR")
_GROUP_OF = {"AXT1": "T1", "AXT1PRE": "T1", "AXT1POST": "T1", "AXT2": "T2", "AXFLAIR": "FLAIR"}
# Real releases carry variants of the five names (`AXT1PRE_FS`, `AXT2_FS`, ...); a variant
# belongs to the group of the base name it starts with.
_GROUP_PREFIXES = (("AXFLAIR", "FLAIR"), ("AXT1", "T1"), ("AXT2", "T2"))


class FastMRIFileError(ValueError):
  """A fastMRI file that cannot be used; `path` and `problem` say which and why."""

  def __init__(self, path: os.PathLike | str, problem: str):
    self.path = str(path)
    self.problem = problem
    super().__init__(f"{self.path}: {problem}")


def contrast_group(acquisition: str) -> str:
  """Maps an `acquisition` attribute to T1 / T2 / FLAIR (decisions.md §2).

  The five names of `ACQUISITIONS` map as listed in `_GROUP_OF`. Any other value is placed by its
  prefix: `AXFLAIR*` → FLAIR, `AXT1*` → T1, `AXT2*` → T2, so `AXT1PRE_FS` is T1 and `AXT2_FS` is
  T2. The raw value is stored with every example, so a different grouping can be recomputed.

  Raises:
    ValueError: the value matches neither a known name nor a prefix (e.g. `AXPD`, `SAGT1`).
  """
  group = _GROUP_OF.get(acquisition)
  if group is not None:
    return group
  for prefix, group in _GROUP_PREFIXES:
    if acquisition.startswith(prefix):
      return group
  raise ValueError(
    f"unknown acquisition {acquisition!r}: it is none of {', '.join(ACQUISITIONS)} and starts "
    "with none of AXFLAIR, AXT1, AXT2, so it has no T1/T2/FLAIR contrast group"
  )


@dataclasses.dataclass(frozen=True)
class VolumeHeader:
  """What the reader needs from the ISMRMRD header (fastmri_spec.md §1.2).

  Attributes:
    encoded_size: `(x, y, z)` of the encoded space; x is the oversampled readout (H), y the
      phase encodes (W).
    recon_size: `(x, y, z)` of the reconstruction space, the crop that yields
      `reconstruction_rss`.
    padding: `[left, right)` window of acquired phase-encode columns, as fastMRI computes it.
  """

  encoded_size: tuple[int, int, int]
  recon_size: tuple[int, int, int]
  padding: tuple[int, int]


@dataclasses.dataclass
class FastMRIVolume:
  """One fastMRI volume. `kspace` is None when read with `load_kspace=False`."""

  path: pathlib.Path
  kspace_shape: tuple[int, int, int, int]
  header: VolumeHeader
  acquisition: str
  patient_id: str
  attrs: dict
  kspace: np.ndarray | None = None
  reconstruction_rss: np.ndarray | None = None
  mask: np.ndarray | None = None

  @property
  def num_slices(self) -> int:
    return self.kspace_shape[0]

  @property
  def num_coils(self) -> int:
    return self.kspace_shape[1]

  @property
  def contrast(self) -> str:
    return contrast_group(self.acquisition)

  @property
  def is_test_file(self) -> bool:
    """Test/challenge files carry undersampled k-space and a mask, and no target."""
    return self.mask is not None or "acceleration" in self.attrs


# ------------------------------------------------------------------------------------------------
# Header


def make_ismrmrd_header(
  encoded_size: tuple[int, int] = (640, 320),
  recon_size: tuple[int, int] = (320, 320),
  *,
  pe_center: int | None = None,
  pe_maximum: int | None = None,
  num_slices: int = 16,
  num_coils: int = 16,
  protocol_name: str = "AXT2",
  field_strength_t: float = 3.0,
  recon_fov_mm: tuple[float, float, float] = (220.0, 220.0, 5.0),
) -> bytes:
  """Builds a schema-ordered ISMRMRD XML header for a 2-D multicoil brain acquisition.

  The encoded FOV is the recon FOV scaled by the oversampling of each axis, as on the scanner.
  `pe_center`/`pe_maximum` default to a fully sampled phase-encode window (`y//2`, `y−1`).
  """
  enc_x, enc_y = (int(v) for v in encoded_size)
  rec_x, rec_y = (int(v) for v in recon_size)
  pe_center = enc_y // 2 if pe_center is None else int(pe_center)
  pe_maximum = enc_y - 1 if pe_maximum is None else int(pe_maximum)
  fx, fy, fz = recon_fov_mm
  enc_fov = (fx * enc_x / rec_x, fy * enc_y / rec_y, fz)

  ET.register_namespace("", ISMRMRD_NS)
  q = lambda tag: f"{{{ISMRMRD_NS}}}{tag}"
  root = ET.Element(q("ismrmrdHeader"))

  def sub(parent, tag, text=None):
    el = ET.SubElement(parent, q(tag))
    if text is not None:
      el.text = str(text)
    return el

  def space(parent, tag, size, fov):
    sp = sub(parent, tag)
    ms = sub(sp, "matrixSize")
    for axis, v in zip("xyz", (*size, 1), strict=True):
      sub(ms, axis, v)
    fv = sub(sp, "fieldOfView_mm")
    for axis, v in zip("xyz", fov, strict=True):
      sub(fv, axis, f"{v:g}")

  def limit(parent, tag, minimum, maximum, center):
    el = sub(parent, tag)
    sub(el, "minimum", minimum)
    sub(el, "maximum", maximum)
    sub(el, "center", center)

  sys_info = sub(root, "acquisitionSystemInformation")
  sub(sys_info, "systemVendor", "SYNTHETIC")
  sub(sys_info, "systemFieldStrength_T", f"{field_strength_t:g}")
  sub(sys_info, "receiverChannels", num_coils)
  sub(
    sub(root, "experimentalConditions"), "H1resonanceFrequency_Hz", int(42577478 * field_strength_t)
  )
  enc = sub(root, "encoding")
  space(enc, "encodedSpace", (enc_x, enc_y), enc_fov)
  space(enc, "reconSpace", (rec_x, rec_y), recon_fov_mm)
  lims = sub(enc, "encodingLimits")
  limit(lims, "kspace_encoding_step_0", 0, enc_x - 1, enc_x // 2)
  limit(lims, "kspace_encoding_step_1", 0, pe_maximum, pe_center)
  limit(lims, "slice", 0, num_slices - 1, 0)
  sub(enc, "trajectory", "cartesian")
  sub(sub(root, "measurementInformation"), "protocolName", protocol_name)
  return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def parse_ismrmrd_header(xml: bytes | str, path: os.PathLike | str = "<header>") -> VolumeHeader:
  """Reads encoded/recon sizes and the phase-encode window like fastMRI's `_retrieve_metadata`."""
  try:
    root = ET.fromstring(xml)
  except ET.ParseError as e:
    raise FastMRIFileError(path, f"ismrmrd_header is not valid XML ({e})") from None
  ns = {"ns": ISMRMRD_NS}

  def integer(*tags):
    query = ".//" + "//".join(f"ns:{t}" for t in tags)
    el = root.find(query, ns)
    if el is None or el.text is None:
      raise FastMRIFileError(path, f"ismrmrd_header has no {'/'.join(tags)}")
    try:
      return int(float(el.text))
    except (ValueError, OverflowError):
      raise FastMRIFileError(path, f"ismrmrd_header {'/'.join(tags)} is not a number") from None

  enc = tuple(integer("encoding", "encodedSpace", "matrixSize", a) for a in "xyz")
  rec = tuple(integer("encoding", "reconSpace", "matrixSize", a) for a in "xyz")
  center = integer("encodingLimits", "kspace_encoding_step_1", "center")
  maximum = integer("encodingLimits", "kspace_encoding_step_1", "maximum")
  left = enc[1] // 2 - center
  return VolumeHeader(encoded_size=enc, recon_size=rec, padding=(left, left + maximum + 1))


# ------------------------------------------------------------------------------------------------
# Reading


def _attr_str(value) -> str:
  # Fixed-length attributes arrive as bytes; a stray non-UTF-8 byte must not make a volume
  # unreadable.
  return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else str(value)


def read_volume(path: os.PathLike | str, *, load_kspace: bool = True) -> FastMRIVolume:
  """Reads and validates one multicoil volume.

  Args:
    path: the `.h5` file.
    load_kspace: read the k-space (and target) arrays; False reads metadata only, which is what a
      directory scan needs.

  Raises:
    FastMRIFileError: not HDF5, truncated, missing `kspace` or header, wrong rank or dtype, NaN/Inf
      k-space, an unparsable header, or a target whose slice count disagrees with the k-space.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FastMRIFileError(path, "no such file")
  try:
    f = h5py.File(path, "r")
  except OSError as e:
    raise FastMRIFileError(path, f"not a readable HDF5 file ({e})") from None
  try:
    with f:
      return _read_open_file(path, f, load_kspace)
  except FastMRIFileError:
    raise
  except (OSError, KeyError, RuntimeError, TypeError) as e:
    # h5py raises these for truncated datasets and damaged chunks.
    raise FastMRIFileError(path, f"damaged or truncated HDF5 data ({e})") from None


def _read_open_file(path: pathlib.Path, f: h5py.File, load_kspace: bool) -> FastMRIVolume:
  if "kspace" not in f or not isinstance(f["kspace"], h5py.Dataset):
    raise FastMRIFileError(path, "missing the 'kspace' dataset")
  ds = f["kspace"]
  if ds.ndim != 4:
    raise FastMRIFileError(
      path, f"'kspace' must be [slices, coils, H, W] (rank 4), got shape {tuple(ds.shape)}"
    )
  if not np.issubdtype(ds.dtype, np.complexfloating):
    raise FastMRIFileError(path, f"'kspace' must be complex, got dtype {ds.dtype}")
  if min(ds.shape) == 0:
    raise FastMRIFileError(path, f"'kspace' is empty, shape {tuple(ds.shape)}")
  if "ismrmrd_header" not in f:
    raise FastMRIFileError(path, "missing the 'ismrmrd_header' dataset")
  header = parse_ismrmrd_header(f["ismrmrd_header"][()], path)
  attrs = {k: (_attr_str(v) if isinstance(v, bytes | str) else v) for k, v in f.attrs.items()}
  acquisition = attrs.get("acquisition")
  if acquisition is None:
    raise FastMRIFileError(path, "missing the 'acquisition' attribute")

  shape = tuple(int(s) for s in ds.shape)
  vol = FastMRIVolume(
    path=path,
    kspace_shape=shape,
    header=header,
    acquisition=str(acquisition),
    patient_id=str(attrs.get("patient_id", "")),
    attrs=attrs,
  )
  if "mask" in f:
    vol.mask = np.asarray(f["mask"][()]).astype(bool).reshape(-1)
    if vol.mask.shape[0] != shape[-1]:
      raise FastMRIFileError(
        path, f"'mask' has length {vol.mask.shape[0]}, kspace width {shape[-1]}"
      )
  if "reconstruction_rss" in f:
    rss_ds = f["reconstruction_rss"]
    if rss_ds.ndim != 3 or rss_ds.shape[0] != shape[0]:
      raise FastMRIFileError(
        path, f"'reconstruction_rss' shape {tuple(rss_ds.shape)} does not match {shape[0]} slices"
      )
    if load_kspace:
      vol.reconstruction_rss = np.asarray(rss_ds[()], np.float32)
  if load_kspace:
    kspace = np.asarray(ds[()])
    if not np.all(np.isfinite(kspace)):
      raise FastMRIFileError(path, "'kspace' contains NaN or Inf values")
    vol.kspace = kspace.astype(np.complex64, copy=False)
  return vol


def read_slice(path: os.PathLike | str, index: int) -> np.ndarray:
  """Reads one k-space slice `[coils, H, W]` without loading the whole volume."""
  path = pathlib.Path(path)
  try:
    with h5py.File(path, "r") as f:
      ds = f["kspace"]
      if not isinstance(ds, h5py.Dataset) or ds.ndim != 4:
        raise FastMRIFileError(path, "'kspace' must be a rank 4 [slices, coils, H, W] dataset")
      if not np.issubdtype(ds.dtype, np.complexfloating):
        raise FastMRIFileError(path, f"'kspace' must be complex, got dtype {ds.dtype}")
      if not 0 <= index < ds.shape[0]:
        raise FastMRIFileError(path, f"slice {index} out of range [0, {ds.shape[0]})")
      k = np.asarray(ds[index]).astype(np.complex64, copy=False)
  except OSError as e:
    raise FastMRIFileError(path, f"not a readable HDF5 file ({e})") from None
  except KeyError:
    raise FastMRIFileError(path, "missing the 'kspace' dataset") from None
  if not np.all(np.isfinite(k)):
    raise FastMRIFileError(path, f"'kspace' slice {index} contains NaN or Inf values")
  return k


@dataclasses.dataclass
class ScanResult:
  """Outcome of `scan_directory`: readable volumes (metadata only) and skipped files, with why."""

  volumes: list[FastMRIVolume]
  errors: list[FastMRIFileError]

  def report(self) -> str:
    lines = [f"{len(self.volumes)} readable volumes, {len(self.errors)} skipped"]
    lines += [f"  skipped {e.path}: {e.problem}" for e in self.errors]
    return "\n".join(lines)


def scan_directory(
  root: os.PathLike | str, *, pattern: str = "*.h5", check_kspace: bool = False
) -> ScanResult:
  """Reads the metadata of every matching file under `root` (sorted, non-recursive).

  Bad files are collected in `errors` instead of stopping the scan. `check_kspace=True` also loads
  each k-space to catch NaN/Inf and truncation, at the cost of reading every byte.
  """
  root = pathlib.Path(root)
  if not root.is_dir():
    raise FileNotFoundError(f"{root}: not a directory of fastMRI .h5 files")
  volumes, errors = [], []
  for path in sorted(root.glob(pattern)):
    try:
      volumes.append(read_volume(path, load_kspace=check_kspace))
    except FastMRIFileError as e:
      errors.append(e)
  return ScanResult(volumes, errors)


# ------------------------------------------------------------------------------------------------
# Targets and writing


def rss_from_kspace(kspace_SCHW: np.ndarray, recon_size: tuple[int, int]) -> np.ndarray:
  """fastMRI's `reconstruction_rss` recipe (spec §1.4): ifft2c per coil, crop to recon size, RSS."""
  images = transforms.ifft2c_np(np.asarray(kspace_SCHW, np.complex64))
  images = transforms.center_crop(images, tuple(recon_size))
  return transforms.rss(images, axis=-3).astype(np.float32)


def write_volume(
  path: os.PathLike | str,
  kspace_SCHW: np.ndarray,
  *,
  acquisition: str,
  patient_id: str,
  header: bytes | None = None,
  reconstruction_rss: np.ndarray | None = None,
  mask: np.ndarray | None = None,
  extra_attrs: Mapping[str, object] | None = None,
) -> pathlib.Path:
  """Writes a volume in the exact fastMRI layout; `max`/`norm` attrs are derived from the target.

  The file is written to a temporary name and renamed, so an interrupted write never leaves a
  half-written volume under the final name.
  """
  path = pathlib.Path(path)
  kspace_SCHW = np.asarray(kspace_SCHW)
  if kspace_SCHW.ndim != 4:
    raise ValueError(f"kspace_SCHW must be [slices, coils, H, W], got shape {kspace_SCHW.shape}")
  if header is None:
    s, c, h, w = kspace_SCHW.shape
    header = make_ismrmrd_header(
      (h, w), (h // 2, w), num_slices=s, num_coils=c, protocol_name=acquisition
    )
  tmp = path.with_name(path.name + ".partial")
  path.parent.mkdir(parents=True, exist_ok=True)
  with h5py.File(tmp, "w") as f:
    f.create_dataset("kspace", data=kspace_SCHW.astype(np.complex64))
    f.create_dataset("ismrmrd_header", data=np.bytes_(header))
    if reconstruction_rss is not None:
      target = np.asarray(reconstruction_rss, np.float32)
      f.create_dataset("reconstruction_rss", data=target)
      f.attrs["max"] = float(target.max())
      f.attrs["norm"] = float(np.linalg.norm(target))
    if mask is not None:
      f.create_dataset("mask", data=np.asarray(mask).astype(bool))
    f.attrs["acquisition"] = acquisition
    f.attrs["patient_id"] = patient_id
    for key, value in (extra_attrs or {}).items():
      f.attrs[key] = value
  os.replace(tmp, path)
  return path


def volume_files(root: os.PathLike | str, pattern: str = "*.h5") -> Iterable[pathlib.Path]:
  """The sorted volume files of a split directory."""
  return sorted(pathlib.Path(root).glob(pattern))
