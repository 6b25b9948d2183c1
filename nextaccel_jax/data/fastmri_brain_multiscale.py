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
interrupted build resumes at the file level; a file that is replaced or repaired is preprocessed
again. TFDS itself writes into an `incomplete.*` folder and only renames it when every split is
complete, so a failed build never leaves a half-written dataset; the folder a killed build leaves
behind is removed by the next build of the same config and version.

A volume that cannot be used (unreadable, a masked test-release file, a geometry that cannot give
the crop, an acquisition with no contrast group, a crash while preprocessing it) is skipped and
listed in `builder.skipped` with the reason; so is a single slice that fails (e.g. an all-zero
one), the volume's other slices being kept. A split whose folder gives no usable volume is left
out with a warning, except train and validation, which the build needs: it stops, before writing
anything, with an error that names the folder and what was skipped.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import multiprocessing
import os
import pathlib
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from nextaccel_jax import ConfigError, MissingInputError
from nextaccel_jax.data import coils, fastmri, masks, synthetic, transforms

NUM_LEVELS = transforms.NUM_LEVELS
SPLITS = ("train", "validation", "test")
# Real fastMRI folder per split; `multicoil_test_full` is the fully sampled release of the test set.
FASTMRI_FOLDERS = {
  "train": "multicoil_train",
  "validation": "multicoil_val",
  "test": "multicoil_test_full",
}
# Splits without which there is nothing to train or select checkpoints on; an empty test split is
# only left out.
REQUIRED_SPLITS = ("train", "validation")
TEST_FILE_REASON = (
  "a test-release file with an undersampling mask and no fully sampled target: usable for "
  "reconstruction, not for building scored examples"
)
# How many skipped files an error message lists; `builder.skipped` holds them all.
_MAX_LISTED = 20

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
    num_workers: default processes for preprocessing volumes (ESPIRiT dominates the cost); the
      builder's `num_workers` argument overrides it without changing the config.
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
      raise ConfigError(
        f"config {self.name}: source must be 'fastmri' or 'synthetic', not {self.source!r}"
      )
    if self.norm not in ("fs_max", "r32", "none"):
      raise ConfigError(f"config {self.name}: norm must be fs_max, r32 or none, not {self.norm!r}")
    if self.maps not in ("espirit", "lowres"):
      raise ConfigError(f"config {self.name}: maps must be espirit or lowres, not {self.maps!r}")
    if self.resize not in ("image", "kspace"):
      raise ConfigError(f"config {self.name}: resize must be image or kspace, not {self.resize!r}")
    # R = 32 Cartesian masks need a whole number of lines: W/32 must be an integer.
    if self.crop < 64 or self.crop % 32:
      raise ConfigError(
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

  def __init__(self, *, num_workers: int | None = None, file_format="array_record", **kwargs):
    """See `tfds.core.GeneratorBasedBuilder`.

    Args:
      num_workers: processes for preprocessing volumes; None takes the config's `num_workers`. It is
        an argument here, not a changed copy of the config, because it does not change the data:
        TFDS refuses a custom config named like a registered one, and a new name would build a
        second dataset.
      file_format: TFDS file format.
      **kwargs: `data_dir`, `config`, `version`.
    """
    if num_workers is not None and num_workers < 1:
      raise ConfigError(f"num_workers must be at least 1, got {num_workers}")
    super().__init__(file_format=file_format, **kwargs)
    # TFDS re-creates an unpickled builder from these arguments.
    self._original_state["num_workers"] = num_workers
    self.num_workers = self.builder_config.num_workers if num_workers is None else int(num_workers)
    self.skipped: list[tuple[str, str]] = []

  def download_and_prepare(self, **kwargs):
    """TFDS's `download_and_prepare`, after removing what killed builds of this version left.

    TFDS writes into `incomplete.<random>_<version>/` beside the version folder and removes it when
    a build fails, but a killed process (kill -9, out of memory, a lost node) leaves it for good.
    Two builds of one config into one data dir at the same time are therefore not supported: each
    would remove the other's folder.
    """
    config_dir = self.data_path.parent
    if config_dir.exists():
      prefix = tfds.core.constants.INCOMPLETE_PREFIX
      for stale in sorted(config_dir.glob(f"{prefix}*_{self.version}")):
        if stale.is_dir():
          logging.warning("removing %s, left by an interrupted build of %s", stale, self.name)
          stale.rmtree()
    return super().download_and_prepare(**kwargs)

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
    """Selects and preprocesses every split's volumes, then returns generators of the usable ones.

    Preprocessing runs here, before TFDS writes anything, so that a split left with no usable
    volume is known in advance: it is dropped (test) or stops the build (train, validation)
    instead of TFDS failing at the end with "No examples were yielded".
    """
    cfg = self.builder_config
    if cfg.source == "synthetic":
      folders = self._write_synthetic(pathlib.Path(dl_manager.download_dir))
    else:
      root = pathlib.Path(dl_manager.manual_dir)
      folders = {
        s: root / FASTMRI_FOLDERS[s] for s in SPLITS if (root / FASTMRI_FOLDERS[s]).is_dir()
      }
      if "train" not in folders or "validation" not in folders:
        raise MissingInputError(
          f"{root}: expected the fastMRI folders multicoil_train/ and multicoil_val/.\n"
          + MANUAL_DOWNLOAD_INSTRUCTIONS
        )
    cache = pathlib.Path(dl_manager.download_dir) / "fastmri_brain_multiscale_cache"
    cache = cache / f"{cfg.name}-{cfg.preprocessing_key()}"

    skipped = {split: [] for split in folders}
    chosen = {
      split: self._select_files(split, folder, skipped[split]) for split, folder in folders.items()
    }
    # Nothing is preprocessed when a split the build needs has nothing to offer.
    for split in REQUIRED_SPLITS:
      if not chosen[split]:
        raise MissingInputError(self._no_usable_volume(split, folders[split], skipped[split]))

    entries = {split: [] for split in folders}
    for split, files in chosen.items():
      for path in files:
        try:
          entries[split].append((path, cache_entry(cache / split, path)))
        except OSError as e:
          self._skip(skipped[split], path, f"cannot be read ({e})")
    pending = [
      (path, entry)
      for split_entries in entries.values()
      for path, entry in split_entries
      if not _npz_file(entry).exists() and not _skip_file(entry).exists()
    ]
    if pending:
      _preprocess_all(pending, preprocessing_kwargs(cfg), self.num_workers)

    usable = {split: [] for split in folders}
    for split, split_entries in entries.items():
      for path, entry in split_entries:
        ok, reasons = _cached_outcome(entry)
        for why in reasons:
          self._skip(skipped[split], path, why)
        if ok:
          usable[split].append((path, entry))
    for split in REQUIRED_SPLITS:
      if not usable[split]:
        raise MissingInputError(self._no_usable_volume(split, folders[split], skipped[split]))

    gens = {}
    for split, volumes in usable.items():
      if not volumes:
        logging.warning(
          "leaving out the %s split, which the build can do without: %s",
          split,
          self._no_usable_volume(split, folders[split], skipped[split]),
        )
        continue
      eval_levels = split != "train" or cfg.store_train_levels
      gens[split] = self._generate_examples(volumes, eval_levels)
    return gens

  def _skip(self, split_skipped: list, path, why: str) -> None:
    logging.warning("skipping %s: %s", path, why)
    split_skipped.append((str(path), why))
    self.skipped.append((str(path), why))

  def _no_usable_volume(self, split: str, folder: pathlib.Path, skipped: list) -> str:
    """Why `folder` gives the `split` split nothing, and what it would need."""
    cfg = self.builder_config
    needs = (
      f"fully sampled multicoil brain .h5 files (k-space and an ISMRMRD header, no undersampling "
      f"mask) whose geometry gives a {cfg.crop}x{cfg.crop} crop"
    )
    if cfg.acquisitions is not None:
      needs += f" and whose acquisition is one of {', '.join(cfg.acquisitions)}"
    if split == "test" and cfg.source == "fastmri":
      needs += " (the fully sampled multicoil_test_full release, not the masked multicoil_test)"
    lines = [f"{folder} gives no usable volume; the {split} split needs {needs}."]
    if skipped:
      lines.append(f"{len(skipped)} skipped:")
      lines += [f"  {p}: {why}" for p, why in skipped[:_MAX_LISTED]]
      if len(skipped) > _MAX_LISTED:
        lines.append(f"  ... and {len(skipped) - _MAX_LISTED} more (builder.skipped lists all)")
    elif not any(folder.glob("*.h5")):
      lines.append("It holds no .h5 file.")
    else:
      lines.append("None of its files was selected.")
    return "\n".join(lines)

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

  def _select_files(self, split: str, folder: pathlib.Path, skipped: list) -> list[pathlib.Path]:
    """The files of `folder` that `split` uses; unusable ones are appended to `skipped`."""
    cfg = self.builder_config
    scan = fastmri.scan_directory(folder)
    for err in scan.errors:
      self._skip(skipped, err.path, err.problem)
    vols = []
    for v in scan.volumes:
      if cfg.acquisitions is not None and v.acquisition not in cfg.acquisitions:
        continue
      if v.is_test_file:
        self._skip(skipped, v.path, TEST_FILE_REASON)
        continue
      try:
        fastmri.contrast_group(v.acquisition)
      except ValueError as e:
        self._skip(skipped, v.path, str(e))
        continue
      vols.append(v)
    cap = (cfg.volumes_per_split or {}).get(split)
    if cap is not None and cap < len(vols):
      pick = np.random.default_rng([cfg.subset_seed, SPLITS.index(split)]).permutation(len(vols))
      vols = [vols[i] for i in sorted(pick[:cap])]
    return [v.path for v in vols]

  # ----------------------------------------------------------------------------------------------
  # Examples

  def _generate_examples(self, volumes, eval_levels: bool):
    """Examples of `volumes`, `(path, cache entry)` pairs already preprocessed."""
    for path, entry in volumes:
      with np.load(_npz_file(entry)) as z:
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


def cache_entry(cache: pathlib.Path, path: pathlib.Path) -> pathlib.Path:
  """Where the preprocessed `path` is cached: `cache/<stem>/<key>`, completed by a suffix.

  The key hashes what identifies the file's content and is cheap to read: its size, its mtime_ns,
  its first MiB (the HDF5 superblock, object headers and the start of the data) and the builder
  version. A replaced or repaired file gets a new key, so it is preprocessed again, whatever its
  old entry said (including "skipped").

  Raises:
    OSError: the file cannot be read.
  """
  st = path.stat()
  with open(path, "rb") as f:
    head = hashlib.sha256(f.read(1 << 20)).hexdigest()
  blob = json.dumps(
    {
      "size": st.st_size,
      "mtime_ns": st.st_mtime_ns,
      "head": head,
      "version": str(FastmriBrainMultiscale.VERSION),
    },
    sort_keys=True,
  )
  return cache / path.stem / hashlib.sha256(blob.encode()).hexdigest()[:16]


def _npz_file(entry: pathlib.Path) -> pathlib.Path:
  return entry.with_name(entry.name + ".npz")


def _skip_file(entry: pathlib.Path) -> pathlib.Path:
  return entry.with_name(entry.name + ".skipped")


def _write_skip(entry: pathlib.Path, reason: str) -> None:
  entry.parent.mkdir(parents=True, exist_ok=True)
  tmp = entry.with_name(entry.name + ".skipped.partial")
  tmp.write_text(reason)
  os.replace(tmp, _skip_file(entry))


def _cached_outcome(entry: pathlib.Path) -> tuple[bool, list[str]]:
  """`(usable, reasons)` of a preprocessed entry: why it, or some of its slices, was skipped."""
  skip = _skip_file(entry)
  if skip.exists():
    return False, [skip.read_text()]
  npz = _npz_file(entry)
  if not npz.exists():
    return False, [f"preprocessing left no cache entry {npz}"]
  with np.load(npz) as z:
    meta = json.loads(str(z["meta"]))
  return True, [
    f"slice {s} only (the volume's other slices are kept): {why}"
    for s, why in meta.get("skipped_slices", [])
  ]


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

  A slice that fails (e.g. an all-zero one, whose normalisation scale does not exist) is left out;
  `meta["skipped_slices"]` lists `[index, "Type: message"]` for each.

  Raises:
    FastMRIFileError: the file is unreadable.
    coils.SkipVolume: the geometry cannot give the crop (narrow FLAIR, a single coil, a header that
      disagrees with the k-space), or every selected slice failed.
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
  skipped_slices = []
  for s in central_slice_indices(vol.num_slices, central_slices):
    try:
      cs = coils.combine_slice(vol.kspace[s], vol.header, norm=norm, r32_mask=r32_mask, **kwargs)
    except Exception as e:  # one bad slice must not cost the volume its good ones
      skipped_slices.append([int(s), f"{type(e).__name__}: {e}"])
      continue
    out["image"].append(cs.image)
    out["maps"].append(cs.maps)
    out["scale"].append(cs.scale)
    out["retained_energy"].append(cs.retained_energy)
    out["slice_index"].append(s)
  if not out["slice_index"]:
    raise coils.SkipVolume(
      vol.path,
      "every selected slice failed: " + "; ".join(f"slice {s}: {why}" for s, why in skipped_slices),
    )
  arrays = {k: np.asarray(v) for k, v in out.items()}
  arrays["meta"] = np.asarray(
    json.dumps(
      {
        "acquisition": vol.acquisition,
        "patient_id": vol.patient_id,
        "skipped_slices": skipped_slices,
      }
    )
  )
  return arrays


def _preprocess_to_cache(path: pathlib.Path, entry: pathlib.Path, kwargs: dict) -> str | None:
  """Preprocesses one volume into its cache entry; returns why it was skipped, or None.

  Any exception from the volume skips it, with the reason in a `.skipped` marker: the problem for
  an unusable file or geometry, `Type: message` for anything else. Failing to write the cache is
  not the volume's fault and propagates.
  """
  entry.parent.mkdir(parents=True, exist_ok=True)
  # Entries of an earlier version of this file (another key) are of no further use.
  for old in entry.parent.iterdir():
    if not old.name.startswith(entry.name + "."):
      old.unlink(missing_ok=True)
  try:
    arrays = preprocess_volume(path, **kwargs)
  except fastmri.FastMRIFileError as e:
    reason = e.problem
  except coils.SkipVolume as e:
    reason = e.reason
  except Exception as e:  # one faulty volume must not end a build of thousands
    reason = f"{type(e).__name__}: {e}"
  else:
    tmp = entry.with_name(entry.name + ".partial.npz")
    np.savez(tmp, **arrays)
    # Atomic rename: a killed build never leaves a cache entry that looks complete.
    os.replace(tmp, _npz_file(entry))
    return None
  _write_skip(entry, reason)
  return reason


def _worker_died_reason(entry: pathlib.Path) -> str:
  return (
    "the preprocessing worker process died on this file twice, the second time with the file "
    "alone (BrokenProcessPool: a crash in HDF5 or numerical code, or the OS killing it for "
    f"memory); delete {_skip_file(entry)} to try again"
  )


def _preprocess_all(jobs, kwargs: dict, num_workers: int) -> None:
  """Preprocesses `(path, cache entry)` jobs, in `num_workers` processes when more than one.

  A worker that dies takes its pool down with it (BrokenProcessPool) without saying which file
  killed it. The files it was working on are then retried one at a time, each alone in a fresh
  process, and one that kills that process too is skipped; the rest go on in a fresh pool.
  """
  if num_workers <= 1:
    for path, entry in jobs:
      _preprocess_to_cache(path, entry, kwargs)
    return
  remaining = list(jobs)
  while remaining:
    suspects, remaining = _run_pool(remaining, kwargs, num_workers)
    if suspects:
      logging.warning(
        "a preprocessing worker process died; retrying the %d files it may have been working on "
        "one at a time, then the other %d in a fresh pool",
        len(suspects),
        len(remaining),
      )
    for path, entry in suspects:
      if _run_pool([(path, entry)], kwargs, 1)[0]:
        _write_skip(entry, _worker_died_reason(entry))


def _run_pool(jobs, kwargs: dict, num_workers: int) -> tuple[list, list]:
  """Runs jobs in a fresh process pool until they are done or the pool breaks.

  Only `num_workers` jobs are handed to the pool at a time, so that when a worker dies the jobs
  that may have killed it are known: they are the ones in flight.

  Returns:
    `(in_flight, not_started)`: both empty unless the pool broke.
  """
  queue = list(reversed(jobs))
  running = {}
  # Spawned, not forked: the parent may already run JAX threads, and forking those can deadlock.
  ctx = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=ctx) as pool:
    broken = False
    while (queue or running) and not broken:
      while queue and len(running) < num_workers:
        job = queue.pop()
        try:
          running[pool.submit(_preprocess_to_cache, *job, kwargs)] = job
        except BrokenProcessPool:
          queue.append(job)
          broken = True
          break
      if not running:
        break
      done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
      for future in done:
        if isinstance(future.exception(), BrokenProcessPool):
          broken = True
          continue
        running.pop(future)
        future.result()  # raises what the worker could not handle (writing the cache)
    # A broken pool fails every job in flight; the ones that finished first are done.
    concurrent.futures.wait(running)
    in_flight = [job for f, job in running.items() if f.exception() is not None]
  return in_flight, list(reversed(queue))


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
