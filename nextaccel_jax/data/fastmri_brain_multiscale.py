"""TFDS builder `fastmri_brain_multiscale`: fastMRI multicoil brain k-space → multi-scale
training data.

Each example is one 2-D slice after coil combination (fastmri_spec.md §4.2): the complex image,
its coil maps and its normalisation scale, plus metadata. Validation and test examples also
carry the six levels (R = 32, 16, 8, 4, 2, FS) for each of the four mask families at the seeded
evaluation masks; training examples do not (the loader draws fresh nested masks per example), unless
`store_train_levels`.

Files are array_record and are read without TensorFlow through `builder.as_data_source()`.

Build the demo (synthetic volumes generated on the fly from the MNI152 template)::

  python -m nextaccel_jax.data.build --config=demo --data_dir=~/tensorflow_datasets

Build from real fastMRI (the folder holding the extracted `multicoil_train`, `multicoil_val` and, if
you have it, `multicoil_test_full`)::

  python -m nextaccel_jax.data.build --config=fastmri --manual_dir=/data/fastmri_brain \
      --data_dir=$TFDS_DATA_DIR

Preprocessing is cached per volume under `<download_dir>/fastmri_brain_multiscale_cache/`, so an
interrupted build resumes at the file level; TFDS itself writes into an `incomplete.*` folder
and only renames it when every split is complete, so a failed build never leaves a half-written
dataset.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import multiprocessing
import os
import pathlib

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from nextaccel_jax.data import coils, fastmri, masks, synthetic, transforms

NUM_LEVELS = transforms.NUM_LEVELS
SPLITS = ("train", "validation", "test")
# Real fastMRI folder per split; `multicoil_test_full` is the fully sampled release of the test set.
FASTMRI_FOLDERS = {
  "train": "multicoil_train",
  "validation": "multicoil_val",
  "test": "multicoil_test_full",
}

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Request fastMRI access at https://fastmri.med.nyu.edu/ and download the brain multicoil archives.
Extract them into one folder so that it contains `multicoil_train/`, `multicoil_val/` and optionally
`multicoil_test_full/` (each holding only `file_brain_*.h5` files), then pass that folder as
`manual_dir` (`--manual_dir` of `python -m nextaccel_jax.data.build`).
"""


@dataclasses.dataclass(eq=False)
class MultiscaleConfig(tfds.core.BuilderConfig):
  """How volumes are chosen and turned into examples.

  Attributes:
    source: "fastmri" (real files under `manual_dir`) or "synthetic" (generated into the
      download dir).
    crop: side of the square model grid (256 in the paper).
    num_virtual_coils: SVD-compressed coil count kept for the maps (5, MambaRecon parity).
    maps: "espirit" (sigpy ESPIRiT) or "lowres" (fast ratio maps).
    resize: "image" (image-domain centre crop, default) or "kspace" (crop k-space; keeps the FOV).
    norm: per-slice scale: "fs_max" (author's protocol), "r32" or "none".
    central_slices: keep this many central slices per volume (None keeps all).
    volumes_per_split: cap on volumes per split, chosen with `subset_seed` (None keeps all).
    acquisitions: keep only these `acquisition` values (None keeps all).
    store_train_levels: also store eval-style fixed levels for training examples.
    num_workers: processes for preprocessing volumes (ESPIRiT dominates the cost).
    synthetic_volumes: volumes per split for the synthetic source.
    synthetic_slices, synthetic_coils, synthetic_geometry: synthetic volume settings.
  """

  source: str = "fastmri"
  crop: int = 256
  num_virtual_coils: int = 5
  maps: str = "espirit"
  resize: str = "image"
  norm: str = "fs_max"
  central_slices: int | None = 10
  volumes_per_split: dict | None = None
  subset_seed: int = 0
  acquisitions: tuple[str, ...] | None = None
  store_train_levels: bool = False
  num_workers: int = 1
  synthetic_volumes: dict | None = None
  synthetic_slices: int = 4
  synthetic_coils: tuple[int, int] = (8, 12)
  synthetic_geometry: str = "demo"
  synthetic_seed: int = 0

  def __post_init__(self):
    if self.source not in ("fastmri", "synthetic"):
      raise ValueError(
        f"config {self.name}: source must be 'fastmri' or 'synthetic', not {self.source!r}"
      )
    if self.norm not in ("fs_max", "r32", "none"):
      raise ValueError(f"config {self.name}: norm must be fs_max, r32 or none, not {self.norm!r}")
    if self.maps not in ("espirit", "lowres"):
      raise ValueError(f"config {self.name}: maps must be espirit or lowres, not {self.maps!r}")
    if self.resize not in ("image", "kspace"):
      raise ValueError(f"config {self.name}: resize must be image or kspace, not {self.resize!r}")
    # R = 32 Cartesian masks need a whole number of lines: W/32 must be an integer.
    if self.crop < 64 or self.crop % 32:
      raise ValueError(
        f"config {self.name}: crop must be a multiple of 32 and >= 64, got {self.crop}"
      )

  def preprocessing_key(self) -> str:
    """Hash of the fields that change a preprocessed volume; names the per-volume cache."""
    fields = ("crop", "num_virtual_coils", "maps", "resize", "norm", "central_slices")
    blob = json.dumps({f: getattr(self, f) for f in fields}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


BUILDER_CONFIGS = [
  MultiscaleConfig(
    name="fastmri",
    description="Real fastMRI brain multicoil, 256² crop, 5 virtual coils, ESPIRiT, fs_max norm.",
  ),
  MultiscaleConfig(
    name="demo",
    description=(
      "Synthetic MNI152-based volumes at half the fastMRI geometry, resized in k-space to 64²."
    ),
    source="synthetic",
    crop=64,
    resize="kspace",
    central_slices=None,
    synthetic_volumes={"train": 24, "validation": 4, "test": 4},
    synthetic_slices=4,
    num_workers=2,
  ),
  MultiscaleConfig(
    name="smoke",
    description="A few tiny synthetic volumes (64² crop, low-res maps) for tests.",
    source="synthetic",
    crop=64,
    maps="lowres",
    central_slices=None,
    synthetic_volumes={"train": 2, "validation": 1, "test": 1},
    synthetic_slices=2,
    synthetic_coils=(4, 4),
    synthetic_geometry="tiny",
  ),
]


class FastmriBrainMultiscale(tfds.core.GeneratorBasedBuilder):
  """fastMRI multicoil brain slices with their maps and the multi-scale undersampled levels."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
    "1.0.0": "First release: four nested mask families at R = 32, 16, 8, 4, 2.",
    "1.1.0": "The demo config resizes in k-space to 64² (whole field of view, half the side).",
  }
  BUILDER_CONFIGS = BUILDER_CONFIGS
  DEFAULT_CONFIG_NAME = "demo"
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

  def __init__(self, *, file_format="array_record", **kwargs):
    super().__init__(file_format=file_format, **kwargs)
    self.skipped: list[tuple[str, str]] = []

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    n, v = cfg.crop, cfg.num_virtual_coils
    f32 = np.float32
    return tfds.core.DatasetInfo(
      builder=self,
      description=__doc__.split("\n\n")[0],
      features=tfds.features.FeaturesDict(
        {
          # Complex arrays are stored as trailing [real, imag] channels, the model's layout.
          "image": tfds.features.Tensor(shape=(n, n, 2), dtype=f32),
          "maps": tfds.features.Tensor(shape=(v, n, n, 2), dtype=f32),
          "scale": tfds.features.Scalar(dtype=f32),
          # [families, 6, H, W, 2]: four families on eval splits, none on train (unless stored).
          "levels": tfds.features.Tensor(shape=(None, NUM_LEVELS, n, n, 2), dtype=f32),
          # [families, H, W] index of the coarsest level sampling each pixel (masks.level_map).
          "mask_levels": tfds.features.Tensor(shape=(None, n, n), dtype=np.uint8),
          "contrast": tfds.features.ClassLabel(names=list(fastmri.CONTRAST_GROUPS)),
          "acquisition": tfds.features.Text(),
          "file_name": tfds.features.Text(),
          "slice_index": tfds.features.Scalar(dtype=np.int32),
          "patient_id": tfds.features.Text(),
          "retained_energy": tfds.features.Scalar(dtype=f32),
        }
      ),
      homepage="https://fastmri.med.nyu.edu/",
    )

  # ----------------------------------------------------------------------------------------------
  # Splits

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    if cfg.source == "synthetic":
      folders = self._write_synthetic(pathlib.Path(dl_manager.download_dir))
    else:
      root = pathlib.Path(dl_manager.manual_dir)
      folders = {
        s: root / FASTMRI_FOLDERS[s] for s in SPLITS if (root / FASTMRI_FOLDERS[s]).is_dir()
      }
      if "train" not in folders or "validation" not in folders:
        raise FileNotFoundError(
          f"{root}: expected the fastMRI folders multicoil_train/ and multicoil_val/.\n"
          + MANUAL_DOWNLOAD_INSTRUCTIONS
        )
    cache = pathlib.Path(dl_manager.download_dir) / "fastmri_brain_multiscale_cache"
    cache = cache / f"{cfg.name}-{cfg.preprocessing_key()}"
    gens = {}
    for split, folder in folders.items():
      files = self._select_files(split, folder)
      eval_levels = split != "train" or cfg.store_train_levels
      gens[split] = self._generate_examples(files, cache / split, eval_levels)
    return gens

  def _write_synthetic(self, download_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    cfg = self.builder_config
    counts = cfg.synthetic_volumes or {"train": 8, "validation": 2, "test": 2}
    folders = {}
    for i, split in enumerate(SPLITS):
      if not counts.get(split):
        continue
      folder = download_dir / "synthetic" / cfg.name / split
      # Disjoint seeds and file numbers per split keep the synthetic "subjects" of train/val/test
      # apart, and give every volume its own eval-mask seed (which hashes the file name).
      synthetic.write_dataset(
        folder,
        counts[split],
        seed=cfg.synthetic_seed * 1000 + i,
        start_index=i * 100_000,
        num_slices=cfg.synthetic_slices,
        coils=tuple(cfg.synthetic_coils),
        geometry=cfg.synthetic_geometry,
      )
      folders[split] = folder
    return folders

  def _select_files(self, split: str, folder: pathlib.Path) -> list[pathlib.Path]:
    cfg = self.builder_config
    scan = fastmri.scan_directory(folder)
    for err in scan.errors:
      logging.warning("skipping %s", err)
      self.skipped.append((err.path, err.problem))
    vols = [v for v in scan.volumes if not v.is_test_file]
    if cfg.acquisitions is not None:
      vols = [v for v in vols if v.acquisition in cfg.acquisitions]
    cap = (cfg.volumes_per_split or {}).get(split)
    if cap is not None and cap < len(vols):
      pick = np.random.default_rng([cfg.subset_seed, SPLITS.index(split)]).permutation(len(vols))
      vols = [vols[i] for i in sorted(pick[:cap])]
    return [v.path for v in vols]

  # ----------------------------------------------------------------------------------------------
  # Examples

  def _generate_examples(self, files, cache: pathlib.Path, eval_levels: bool):
    cfg = self.builder_config
    kwargs = preprocessing_kwargs(cfg)
    cache.mkdir(parents=True, exist_ok=True)
    pending = [
      p for p in files if not _cache_path(cache, p).exists() and not _skip_path(cache, p).exists()
    ]
    if pending:
      _preprocess_all(pending, cache, kwargs, cfg.num_workers)
    for path in files:
      skip = _skip_path(cache, path)
      if skip.exists():
        reason = skip.read_text()
        logging.warning("skipping %s: %s", path, reason)
        self.skipped.append((str(path), reason))
        continue
      with np.load(_cache_path(cache, path)) as z:
        vol = {k: z[k] for k in z.files}
      meta = json.loads(str(vol.pop("meta")))
      for j, s in enumerate(vol["slice_index"]):
        yield f"{path.stem}_{int(s):03d}", make_example(vol, j, meta, path.name, eval_levels)


def preprocessing_kwargs(cfg: MultiscaleConfig) -> dict:
  return dict(
    crop=(cfg.crop, cfg.crop),
    num_virtual_coils=cfg.num_virtual_coils,
    maps=cfg.maps,
    resize=cfg.resize,
    norm=cfg.norm,
    central_slices=cfg.central_slices,
  )


def _cache_path(cache: pathlib.Path, path: pathlib.Path) -> pathlib.Path:
  return cache / f"{path.stem}.npz"


def _skip_path(cache: pathlib.Path, path: pathlib.Path) -> pathlib.Path:
  return cache / f"{path.stem}.skipped"


def central_slice_indices(num_slices: int, keep: int | None) -> np.ndarray:
  """The `keep` central slices (all when None or when the volume is smaller)."""
  if keep is None or keep >= num_slices:
    return np.arange(num_slices)
  start = (num_slices - keep) // 2
  return np.arange(start, start + keep)


def preprocess_volume(
  path: os.PathLike | str, *, central_slices=None, norm="fs_max", **kwargs
) -> dict:
  """Reads one volume and coil-combines its selected slices (fastmri_spec.md §4.2).

  With `norm="r32"` the scale comes from the R = 32 image of the first mask family's eval mask,
  which is all a deployment has; every level still shares that one scale.

  Raises:
    FastMRIFileError: the file is unreadable.
    coils.SkipVolume: the geometry cannot give the crop (narrow FLAIR, a single coil).
  """
  vol = fastmri.read_volume(path)
  crop = kwargs.get("crop", (256, 256))
  coils.check_geometry(vol, crop)
  r32_mask = None
  if norm == "r32":
    r32_mask = masks.nested_masks(
      masks.FAMILIES[0], tuple(crop), seed=masks.eval_seed(vol.path.name, masks.FAMILIES[0])
    )[32]
  out = {k: [] for k in ("image", "maps", "scale", "retained_energy", "slice_index")}
  for s in central_slice_indices(vol.num_slices, central_slices):
    cs = coils.combine_slice(vol.kspace[s], vol.header, norm=norm, r32_mask=r32_mask, **kwargs)
    out["image"].append(cs.image)
    out["maps"].append(cs.maps)
    out["scale"].append(cs.scale)
    out["retained_energy"].append(cs.retained_energy)
    out["slice_index"].append(s)
  arrays = {k: np.asarray(v) for k, v in out.items()}
  arrays["meta"] = np.asarray(
    json.dumps({"acquisition": vol.acquisition, "patient_id": vol.patient_id})
  )
  return arrays


def _preprocess_to_cache(path: pathlib.Path, cache: pathlib.Path, kwargs: dict) -> str | None:
  try:
    arrays = preprocess_volume(path, **kwargs)
  except (fastmri.FastMRIFileError, coils.SkipVolume) as e:
    _skip_path(cache, path).write_text(str(e))
    return str(e)
  tmp = cache / f"{path.stem}.partial.npz"
  np.savez(tmp, **arrays)
  # Atomic rename: a killed build never leaves a cache entry that looks complete.
  os.replace(tmp, _cache_path(cache, path))
  return None


def _preprocess_all(files, cache: pathlib.Path, kwargs: dict, num_workers: int) -> None:
  if num_workers <= 1:
    for p in files:
      _preprocess_to_cache(p, cache, kwargs)
    return
  # Spawned, not forked: the parent may already run JAX threads, and forking those can deadlock.
  ctx = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=ctx) as pool:
    list(pool.map(_preprocess_to_cache, files, [cache] * len(files), [kwargs] * len(files)))


def eval_masks(file_name: str, shape: tuple[int, int]) -> np.ndarray:
  """Seeded evaluation masks of one volume, shared by its slices: `[4 families, 5, H, W]` bool."""
  return np.stack(
    [
      np.stack(list(masks.nested_masks(f, shape, seed=masks.eval_seed(file_name, f)).values()))
      for f in masks.FAMILIES
    ]
  )


def make_example(vol: dict, j: int, meta: dict, file_name: str, eval_levels: bool) -> dict:
  """One slice of a preprocessed volume as a TFDS example."""
  x_HW, maps_VHW = vol["image"][j], vol["maps"][j]
  n = x_HW.shape[-1]
  if eval_levels:
    m_FMHW = eval_masks(file_name, (n, n))
    levels = np.stack([transforms.undersample_levels_np(x_HW, maps_VHW, m) for m in m_FMHW])
    mask_levels = np.stack(
      [masks.level_map(dict(zip(transforms.ACCELERATIONS, m, strict=True))) for m in m_FMHW]
    )
  else:
    levels = np.zeros((0, NUM_LEVELS, n, n, 2), np.float32)
    mask_levels = np.zeros((0, n, n), np.uint8)
  return {
    "image": transforms.complex_to_channels(x_HW),
    "maps": transforms.complex_to_channels(maps_VHW),
    "scale": np.float32(vol["scale"][j]),
    "levels": levels.astype(np.float32),
    "mask_levels": mask_levels.astype(np.uint8),
    "contrast": fastmri.contrast_group(meta["acquisition"]),
    "acquisition": meta["acquisition"],
    "file_name": file_name,
    "slice_index": np.int32(vol["slice_index"][j]),
    "patient_id": meta["patient_id"],
    "retained_energy": np.float32(vol["retained_energy"][j]),
  }
