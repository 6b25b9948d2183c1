"""Faults of the real-data build path: each must skip what it concerns, say why, and go on.

The fastMRI-style files are written here with h5py, in the real quirk geometries where those
matter (640 × 320 with recon 320, 768 × 396 with recon 384, a narrow FLAIR, masked test files).
"""

import dataclasses
import logging
import os
import pathlib
import shutil
import textwrap

import h5py
import numpy as np
import pytest

from nextaccel_jax.data import build, fastmri
from nextaccel_jax.data import fastmri_brain_multiscale as fbm

SMOKE = next(c for c in fbm.BUILDER_CONFIGS if c.name == "smoke")
# Custom configs need names of their own: TFDS refuses one named like a registered config.
CFG = fbm.MultiscaleConfig(
  name="faults",
  crop=64,
  maps="lowres",
  central_slices=2,
  num_virtual_coils=2,
  num_workers=1,
)
TINY = (2, 4, 128, 64)  # slices, coils, H, W with a 64 x 64 recon grid


def kspace(shape=TINY, seed=0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)


def write_h5(
  path: pathlib.Path,
  kspace_SCHW: np.ndarray,
  *,
  acquisition: str = "AXT2",
  recon: tuple[int, int] | None = None,
  encoded: tuple[int, int] | None = None,
  mask: np.ndarray | None = None,
) -> pathlib.Path:
  """A fastMRI multicoil file: `kspace`, `ismrmrd_header`, attributes, and `mask` if given."""
  s, c, h, w = kspace_SCHW.shape
  recon = recon or (h // 2, h // 2)
  header = fastmri.make_ismrmrd_header(
    encoded or (h, w), recon, num_slices=s, num_coils=c, protocol_name=acquisition
  )
  path.parent.mkdir(parents=True, exist_ok=True)
  with h5py.File(path, "w") as f:
    f.create_dataset("kspace", data=kspace_SCHW)
    f.create_dataset("ismrmrd_header", data=np.bytes_(header))
    if mask is not None:
      f.create_dataset("mask", data=mask)
      f.attrs["acceleration"] = 4
      f.attrs["num_low_frequency"] = 8
    f.attrs["acquisition"] = acquisition
    f.attrs["patient_id"] = path.stem
  return path


def write_masked(path: pathlib.Path, shape=TINY) -> pathlib.Path:
  mask = np.zeros(shape[-1], bool)
  mask[::4] = True
  return write_h5(path, kspace(shape) * mask, mask=mask)


def name(acquisition: str, index: int) -> str:
  return f"file_brain_{acquisition}_200_{index:07d}.h5"


def skipped_reason(builder, file_id: int) -> str:
  reasons = [why for p, why in builder.skipped if str(file_id) in p]
  assert reasons, f"{file_id} not among the skipped files {builder.skipped}"
  return " | ".join(reasons)


class _Messages(logging.Handler):
  def __init__(self):
    super().__init__(logging.WARNING)
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
  """One build over a manual dir holding every per-file fault next to usable volumes."""
  root = tmp_path_factory.mktemp("fastmri")
  train, val, test = (root / f for f in ("multicoil_train", "multicoil_val", "multicoil_test_full"))
  write_h5(train / name("AXT2", 1000001), kspace((2, 4, 640, 320), 1), recon=(320, 320))
  write_h5(train / name("AXT2", 1000002), kspace((2, 4, 768, 396), 2), recon=(384, 384))
  k = kspace(seed=3)
  k[0] = 0  # an all-zero slice: its fs_max scale does not exist
  write_h5(train / name("AXT1", 1000003), k)
  write_h5(train / name("AXT1PRE_FS", 1000004), kspace(seed=4), acquisition="AXT1PRE_FS")
  write_h5(train / name("AXT2_FS", 1000005), kspace(seed=5), acquisition="AXT2_FS")
  write_h5(train / name("AXPD", 1000006), kspace(seed=6), acquisition="AXPD")
  narrow = kspace((2, 4, 640, 260), 7)
  write_h5(train / name("AXFLAIR", 1000007), narrow, acquisition="AXFLAIR", recon=(320, 320))
  # A header written for a 640 x 320 scan over k-space of a 768 x 396 one.
  bad_header = kspace((2, 4, 768, 396), 8)
  write_h5(train / name("AXT2", 1000008), bad_header, encoded=(640, 320), recon=(320, 320))
  write_h5(val / name("AXT2", 2000001), kspace(seed=9))
  write_masked(val / name("AXT2", 2000002))
  write_masked(test / name("AXT2", 3000001))
  write_masked(test / name("AXT2", 3000002))

  data_dir = tmp_path_factory.mktemp("tfds")
  config_dir = data_dir / "fastmri_brain_multiscale" / CFG.name
  stale = config_dir / f"incomplete.ABC123_{fbm.FastmriBrainMultiscale.VERSION}"
  stale.mkdir(parents=True)
  (stale / "fastmri_brain_multiscale-train.array_record-00000-of-00001").write_bytes(b"half")
  other_version = config_dir / "incomplete.XYZ789_0.9.0"
  other_version.mkdir()

  handler = _Messages()
  logging.getLogger("absl").addHandler(handler)
  try:
    builder = build.build(CFG, data_dir=data_dir, manual_dir=root)
  finally:
    logging.getLogger("absl").removeHandler(handler)
  return dict(
    builder=builder,
    sources=builder.as_data_source(),
    root=root,
    messages=handler.messages,
    stale=stale,
    other_version=other_version,
  )


# ------------------------------------------------------------------------------------------------
# 1. num_workers


def test_num_workers_does_not_change_the_config(tmp_path):
  one = build.build("smoke", data_dir=tmp_path / "one", num_workers=1)
  two = build.build("smoke", data_dir=tmp_path / "two", num_workers=2)
  for builder, workers in ((one, 1), (two, 2)):
    assert builder.builder_config is SMOKE
    assert builder.num_workers == workers
  assert {s: i.num_examples for s, i in one.info.splits.items()} == {
    s: i.num_examples for s, i in two.info.splits.items()
  }
  a, b = one.as_data_source()["validation"], two.as_data_source()["validation"]
  np.testing.assert_array_equal(a[0]["image"], b[0]["image"])
  assert build.main(["--config=smoke", f"--data_dir={tmp_path / 'cli'}", "--num_workers=2"]) == 0
  assert (tmp_path / "cli" / "fastmri_brain_multiscale" / "smoke" / "1.1.0").is_dir()
  with pytest.raises(ValueError, match="num_workers must be at least 1"):
    build.build("smoke", data_dir=tmp_path / "zero", num_workers=0)


# ------------------------------------------------------------------------------------------------
# 2. Masked test files and empty splits


def test_masked_files_are_skipped_and_an_empty_test_split_left_out(faulty):
  builder = faulty["builder"]
  for file_id in (2000002, 3000001, 3000002):
    assert skipped_reason(builder, file_id) == fbm.TEST_FILE_REASON
  assert set(builder.info.splits) == {"train", "validation"}
  assert builder.info.splits["validation"].num_examples == 2
  left_out = [m for m in faulty["messages"] if m.startswith("leaving out the test split")]
  assert len(left_out) == 1
  assert str(faulty["root"] / "multicoil_test_full") in left_out[0]
  assert "multicoil_test_full release, not the masked multicoil_test" in left_out[0]


def _assert_nothing_written(data_dir: pathlib.Path):
  config_dir = data_dir / "fastmri_brain_multiscale" / CFG.name
  assert not config_dir.exists() or not any(config_dir.iterdir())


def test_empty_validation_split_stops_the_build_before_writing(tmp_path):
  root = tmp_path / "fastmri"
  write_h5(root / "multicoil_train" / name("AXT2", 1), kspace())
  write_masked(root / "multicoil_val" / name("AXT2", 2))
  data_dir = tmp_path / "tfds"
  with pytest.raises(FileNotFoundError) as info:
    build.build(CFG, data_dir=data_dir, manual_dir=root)
  message = str(info.value)
  assert message.startswith(f"{root / 'multicoil_val'} gives no usable volume; the validation")
  assert f"{name('AXT2', 2)}: {fbm.TEST_FILE_REASON}" in message
  _assert_nothing_written(data_dir)
  assert not list(data_dir.rglob("*.npz")), "nothing is preprocessed before the error"


def test_validation_split_emptied_by_preprocessing_stops_the_build(tmp_path):
  root = tmp_path / "fastmri"
  write_h5(root / "multicoil_train" / name("AXT2", 1), kspace())
  narrow = kspace((2, 4, 128, 52))
  write_h5(root / "multicoil_val" / name("AXFLAIR", 2), narrow, acquisition="AXFLAIR")
  data_dir = tmp_path / "tfds"
  with pytest.raises(FileNotFoundError, match="narrow k-space") as info:
    build.build(CFG, data_dir=data_dir, manual_dir=root)
  assert str(root / "multicoil_val") in str(info.value)
  _assert_nothing_written(data_dir)


# ------------------------------------------------------------------------------------------------
# 3. Failures while preprocessing one volume


def test_all_zero_slice_is_skipped_and_the_others_kept(faulty):
  reason = skipped_reason(faulty["builder"], 1000003)
  assert reason.startswith("slice 0 only (the volume's other slices are kept): ValueError: ")
  assert "the reference image is empty" in reason
  train = faulty["sources"]["train"]
  kept = [train[i] for i in range(len(train)) if b"1000003" in train[i]["file_name"]]
  assert [int(ex["slice_index"]) for ex in kept] == [1]


def test_acquisition_variants_get_a_contrast_group_and_unknown_ones_are_skipped(faulty):
  assert fastmri.contrast_group("AXT1PRE_FS") == "T1"
  assert fastmri.contrast_group("AXT2_FS") == "T2"
  assert fastmri.contrast_group("AXFLAIR_FS") == "FLAIR"
  train = faulty["sources"]["train"]
  groups = {
    train[i]["acquisition"].decode(): fastmri.CONTRAST_GROUPS[train[i]["contrast"]]
    for i in range(len(train))
  }
  assert groups["AXT1PRE_FS"] == "T1" and groups["AXT2_FS"] == "T2"
  assert "AXPD" not in groups
  assert "unknown acquisition 'AXPD'" in skipped_reason(faulty["builder"], 1000006)


def test_real_geometries_build_and_narrow_flair_is_skipped(faulty):
  train = faulty["sources"]["train"]
  files = {train[i]["file_name"].decode() for i in range(len(train))}
  assert {name("AXT2", 1000001), name("AXT2", 1000002)} <= files
  assert "narrow k-space (narrow FLAIR)" in skipped_reason(faulty["builder"], 1000007)
  # 640x320, 768x396, AXT1 with one good slice, AXT1PRE_FS, AXT2_FS.
  assert len(train) == 2 + 2 + 1 + 2 + 2


CRASHY = """
import os

from nextaccel_jax.data import fastmri_brain_multiscale as fbm


def preprocess_or_crash(path, entry, kwargs):
  if "6666666" in path.name:
    os._exit(1)
  return fbm._preprocess_to_cache(path, entry, kwargs)
"""


def test_a_worker_that_dies_costs_only_its_file(tmp_path, monkeypatch):
  # The pool's processes are spawned, so the crashing worker must live in a module they import.
  (tmp_path / "crashy_build_worker.py").write_text(textwrap.dedent(CRASHY))
  monkeypatch.syspath_prepend(os.fspath(tmp_path))
  import crashy_build_worker

  monkeypatch.setattr(fbm, "_preprocess_to_cache", crashy_build_worker.preprocess_or_crash)
  root = tmp_path / "fastmri"
  for i, file_id in enumerate((1000001, 6666666, 7777777)):
    write_h5(root / "multicoil_train" / name("AXT2", file_id), kspace(seed=i))
  write_h5(root / "multicoil_val" / name("AXT2", 2000001), kspace(seed=5))
  builder = build.build(CFG, data_dir=tmp_path / "tfds", manual_dir=root, num_workers=2)
  # The files that shared a pool with the crashing one are built (on a retry if they were in
  # flight when it died).
  assert builder.info.splits["train"].num_examples == 4
  reason = skipped_reason(builder, 6666666)
  assert "worker process died on this file twice" in reason and "BrokenProcessPool" in reason
  assert [p for p, _ in builder.skipped] == [str(root / "multicoil_train" / name("AXT2", 6666666))]


# ------------------------------------------------------------------------------------------------
# 4. The per-volume cache follows the file's content


def test_cache_key_follows_the_content(tmp_path):
  path = write_h5(tmp_path / name("AXT2", 1), kspace())
  cache = tmp_path / "cache"
  key = fbm.cache_entry(cache, path)
  assert key == fbm.cache_entry(cache, path)
  assert key.parent == cache / path.stem
  # Same size and mtime, different bytes: a copy that kept the old time stamp.
  st = path.stat()
  data = bytearray(path.read_bytes())
  data[-1] ^= 0xFF
  path.write_bytes(bytes(data))
  os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
  assert fbm.cache_entry(cache, path) != key


def test_replaced_file_is_preprocessed_again(tmp_path):
  root = tmp_path / "fastmri"
  write_h5(root / "multicoil_train" / name("AXT2", 1), kspace(seed=1))
  bad = write_h5(root / "multicoil_train" / name("AXT2", 2), np.zeros(TINY, np.complex64))
  write_h5(root / "multicoil_val" / name("AXT2", 3), kspace(seed=3))
  cfg = dataclasses.replace(CFG, name="faults_cache")
  builder = build.build(cfg, data_dir=tmp_path / "tfds", manual_dir=root)
  assert "every selected slice failed" in skipped_reason(builder, 2)
  assert builder.info.splits["train"].num_examples == 2
  # The repaired file replaces the old one; the built dataset is removed to build again.
  write_h5(bad, kspace(seed=2))
  shutil.rmtree(tmp_path / "tfds" / "fastmri_brain_multiscale" / cfg.name)
  builder = build.build(cfg, data_dir=tmp_path / "tfds", manual_dir=root)
  assert builder.skipped == []
  assert builder.info.splits["train"].num_examples == 4
  entries = list((tmp_path / "tfds").rglob(f"{bad.stem}/*"))
  assert len(entries) == 1 and entries[0].suffix == ".npz", "the old entry is removed"


# ------------------------------------------------------------------------------------------------
# 5. A header that disagrees with the k-space


def test_header_disagreeing_with_kspace_is_skipped(faulty):
  reason = skipped_reason(faulty["builder"], 1000008)
  assert reason.startswith("header encodedSpace 640x320 disagrees with k-space 768x396")


# ------------------------------------------------------------------------------------------------
# 6. Folders left by killed builds


def test_stale_incomplete_folder_is_removed(faulty):
  assert not faulty["stale"].exists()
  assert faulty["other_version"].is_dir(), "another version's folder is not this build's"
  assert (faulty["builder"].data_path / "dataset_info.json").exists()
