"""Tests for the synthetic fastMRI volume generator (fastmri_spec.md §1, §5.2).

Volumes use the "tiny" geometry (128×64 k-space, 64×64 recon) with 2 slices and 4 coils unless a
check needs more pixels; every file goes to a pytest temporary directory.
"""

import re

import numpy as np
import pytest

from nextaccel_jax.data import fastmri, synthetic
from nextaccel_jax.data import transforms as T

TINY = dict(num_slices=2, coils=4, geometry="tiny")


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
  out = tmp_path_factory.mktemp("synthetic_train")
  return synthetic.write_dataset(out, 3, seed=11, **TINY)


def test_written_files_follow_the_fastmri_layout(tiny_dataset):
  assert [p.name.split("_")[2] for p in tiny_dataset] == ["AXT2", "AXT1POST", "AXFLAIR"]
  for path in tiny_dataset:
    assert re.fullmatch(r"file_brain_(AXT1|AXT1PRE|AXT1POST|AXT2|AXFLAIR)_999_\d{7}\.h5", path.name)
    vol = fastmri.read_volume(path)
    assert vol.kspace.shape == (2, 4, 128, 64) and vol.kspace.dtype == np.complex64
    assert vol.reconstruction_rss.shape == (2, 64, 64)
    assert vol.reconstruction_rss.dtype == np.float32
    assert vol.header.encoded_size == (128, 64, 1)
    assert vol.header.recon_size == (64, 64, 1)
    assert vol.header.padding == (0, 64)
    assert vol.acquisition in path.name and not vol.is_test_file
    assert re.fullmatch(r"[0-9a-f]{64}", vol.patient_id)
    np.testing.assert_allclose(vol.attrs["max"], vol.reconstruction_rss.max())
    np.testing.assert_allclose(vol.attrs["norm"], np.linalg.norm(vol.reconstruction_rss), rtol=1e-6)
    recomputed = fastmri.rss_from_kspace(vol.kspace, (64, 64))
    np.testing.assert_allclose(recomputed, vol.reconstruction_rss, rtol=1e-5, atol=1e-9)
    # fastMRI's tiny absolute scale, with a noise floor in the background.
    assert 1e-4 < vol.reconstruction_rss.max() < 1e-2
    assert 1e-3 < np.median(vol.reconstruction_rss[:, :3, :3]) / vol.reconstruction_rss.max() < 0.1


def test_generation_is_deterministic_per_seed():
  a = synthetic.generate_volume(5, "AXT2", **TINY)
  b = synthetic.generate_volume(5, "AXT2", **TINY)
  c = synthetic.generate_volume(6, "AXT2", **TINY)
  np.testing.assert_array_equal(a.kspace_SCHW, b.kspace_SCHW)
  assert a.patient_id == b.patient_id != c.patient_id
  assert not np.allclose(a.reconstruction_rss, c.reconstruction_rss)
  # A seed is one subject: another contrast keeps the anatomy, coils and patient id.
  flair = synthetic.generate_volume(5, "AXFLAIR", **TINY)
  assert flair.patient_id == a.patient_id
  np.testing.assert_array_equal(flair.maps_SCHW, a.maps_SCHW)
  np.testing.assert_array_equal(flair.tissues["wm"], a.tissues["wm"])


def test_noise_free_target_equals_the_ground_truth_magnitude():
  vol = synthetic.generate_volume(2, "AXT1", noise_level=0.0, **TINY)
  assert vol.noise_std == 0.0
  assert vol.maps_SCHW.shape == (2, 4, 64, 64) and not vol.maps_SCHW.flags.writeable
  np.testing.assert_allclose(np.sum(np.abs(vol.maps_SCHW) ** 2, axis=1), 1.0, rtol=1e-5)
  peak = np.abs(vol.m_SHW).max()
  np.testing.assert_allclose(vol.reconstruction_rss, np.abs(vol.m_SHW), atol=1e-5 * peak)
  # The readout oversampling is empty: the coil images vanish outside the recon rows.
  coils_CHW = T.ifft2c_np(vol.kspace_SCHW[0])
  assert np.abs(coils_CHW[:, :32]).max() < 1e-5 * peak
  assert np.abs(coils_CHW[:, 96:]).max() < 1e-5 * peak


@pytest.mark.parametrize("acquisition", synthetic.ACQUISITIONS)
def test_tissue_contrast_matches_the_sequence(acquisition):
  # The "small" grid (1.7 mm pixels) keeps enough pure-tissue pixels on the ventricle slice.
  vol = synthetic.generate_volume(4, acquisition, num_slices=3, coils=4, geometry="small")
  mag_HW = np.abs(vol.m_SHW[1])
  mean = {}
  for name, frac_SHW in vol.tissues.items():
    pure = frac_SHW[1] > 0.8
    assert pure.sum() > 20, name
    mean[name] = mag_HW[pure].mean()
  group = fastmri.contrast_group(acquisition)
  if group == "T1":
    assert mean["wm"] > 1.05 * mean["gm"] > mean["csf"]
  elif group == "T2":
    assert mean["csf"] > mean["gm"] > 1.05 * mean["wm"]
  else:
    assert mean["gm"] > mean["wm"] > 2 * mean["csf"]
  assert mean["fat"] > 5 * mean["skull"]


def test_post_contrast_brightens_grey_matter():
  pre = synthetic.generate_volume(4, "AXT1PRE", num_slices=3, coils=4, geometry="small")
  post = synthetic.generate_volume(4, "AXT1POST", num_slices=3, coils=4, geometry="small")
  gm = pre.tissues["gm"][1] > 0.8
  wm = pre.tissues["wm"][1] > 0.8
  ratio = [np.abs(v.m_SHW[1])[gm].mean() / np.abs(v.m_SHW[1])[wm].mean() for v in (pre, post)]
  assert ratio[1] > ratio[0]


def test_test_style_files(tmp_path):
  paths = synthetic.write_dataset(tmp_path, 2, seed=3, test_style=True, **TINY)
  for path in paths:
    vol = fastmri.read_volume(path)
    assert vol.is_test_file and vol.reconstruction_rss is None
    assert "max" not in vol.attrs and "norm" not in vol.attrs
    assert vol.mask.shape == (64,)
    acceleration = int(vol.attrs["acceleration"])
    num_low = int(vol.attrs["num_low_frequency"])
    assert acceleration in synthetic.TEST_ACCELERATIONS
    assert num_low == round(64 * 0.32 / acceleration)
    assert vol.mask[32 - num_low // 2 : 32 + (num_low + 1) // 2].all()
    assert 64 // acceleration <= vol.mask.sum() <= 64 // acceleration + num_low + 1
    assert np.all(vol.kspace[..., ~vol.mask] == 0)
    assert np.all(np.abs(vol.kspace[..., vol.mask]) > 0)


def test_equispaced_mask():
  rng = np.random.default_rng(0)
  mask, num_low = synthetic.equispaced_mask(320, 4, rng)
  assert num_low == 26 and mask[147:173].all()
  offset = int(np.argmax(mask))
  assert offset < 4 and mask[offset::4].all()


def test_quirk_geometries(tmp_path):
  wide = synthetic.write_dataset(
    tmp_path / "wide", 1, num_slices=1, coils=2, geometry="recon384", acquisitions=["AXT2"]
  )
  vol = fastmri.read_volume(wide[0])
  assert vol.kspace.shape == (1, 2, 768, 396)
  assert vol.header.encoded_size == (768, 396, 1) and vol.header.recon_size == (384, 384, 1)
  np.testing.assert_allclose(
    fastmri.rss_from_kspace(vol.kspace, (384, 384)), vol.reconstruction_rss, rtol=1e-5, atol=1e-9
  )

  narrow = synthetic.write_dataset(
    tmp_path / "narrow", 1, num_slices=1, coils=2, geometry="narrow_flair", acquisitions="AXFLAIR"
  )
  vol = fastmri.read_volume(narrow[0])
  assert vol.kspace.shape == (1, 2, 640, 260)
  assert vol.header.encoded_size == (640, 260, 1) and vol.header.recon_size == (320, 320, 1)
  assert vol.header.padding == (0, 260)
  assert vol.reconstruction_rss.shape == (1, 320, 320)
  # The recipe's crop cannot widen 260 columns to 320; the target zero-pads the k-space first.
  with pytest.raises(ValueError):
    fastmri.rss_from_kspace(vol.kspace, (320, 320))
  np.testing.assert_allclose(
    synthetic.target_rss(vol.kspace, "narrow_flair"), vol.reconstruction_rss, rtol=1e-5
  )


def test_write_dataset_resumes_and_depends_only_on_seed_and_index(tmp_path):
  events = []

  def progress(path, action, seconds):
    events.append((path.name, action))

  first = synthetic.write_dataset(tmp_path, 2, seed=9, progress=progress, **TINY)
  stamps = [p.stat().st_mtime_ns for p in first]
  events.clear()
  both = synthetic.write_dataset(tmp_path, 3, seed=9, progress=progress, **TINY)
  assert both[:2] == first
  assert [a for _, a in events] == ["skipped", "skipped", "wrote"]
  assert [p.stat().st_mtime_ns for p in first] == stamps

  # Volume 1 alone, in another directory, is byte-for-byte the same volume.
  alone = synthetic.write_dataset(tmp_path / "alone", 1, seed=9, start_index=1, **TINY)
  assert alone[0].name == first[1].name
  np.testing.assert_array_equal(
    fastmri.read_volume(alone[0]).kspace, fastmri.read_volume(first[1]).kspace
  )

  # A damaged file is regenerated, a file made with other settings is refused.
  first[0].write_bytes(b"not hdf5")
  events.clear()
  synthetic.write_dataset(tmp_path, 1, seed=9, progress=progress, **TINY)
  assert events == [(first[0].name, "wrote")]
  fastmri.read_volume(first[0])
  with pytest.raises(ValueError, match="overwrite=True"):
    synthetic.write_dataset(tmp_path, 1, seed=9, num_slices=3, coils=4, geometry="tiny")
  events.clear()
  synthetic.write_dataset(tmp_path, 1, seed=9, overwrite=True, progress=progress, **TINY)
  assert events == [(first[0].name, "wrote")]
  with pytest.raises(ValueError, match="another acquisition"):
    synthetic.write_dataset(tmp_path, 1, seed=9, acquisitions=["AXT1"], **TINY)
  assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == sorted(p.name for p in both)


def test_default_mix_favours_axt2():
  counts = {a: synthetic.DEFAULT_MIX.count(a) for a in synthetic.ACQUISITIONS}
  assert set(synthetic.DEFAULT_MIX) == set(synthetic.ACQUISITIONS)
  assert counts["AXT2"] > counts["AXT1POST"] > counts["AXFLAIR"]
  assert counts["AXFLAIR"] >= counts["AXT1PRE"] and counts["AXFLAIR"] >= counts["AXT1"]


def test_cli(tmp_path, capsys):
  args = ["--out", str(tmp_path), "--volumes", "2", "--slices", "2", "--coils", "3", "5"]
  args += ["--geometry", "tiny", "--acquisitions", "AXT2,AXFLAIR", "--seed", "4"]
  assert synthetic.main(args) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines[0].startswith("wrote ") and "file_brain_AXT2_999_0000000.h5" in lines[0]
  assert "file_brain_AXFLAIR_999_0000001.h5" in lines[1]
  assert "2 written, 0 skipped" in lines[-1]
  for path in sorted(tmp_path.iterdir()):
    assert 3 <= fastmri.read_volume(path, load_kspace=False).num_coils <= 5
  assert synthetic.main(args) == 0
  assert "0 written, 2 skipped" in capsys.readouterr().out

  assert synthetic.main(args + ["--test-style", "--start-index", "2", "--volumes", "1"]) == 0
  assert fastmri.read_volume(tmp_path / "file_brain_AXT2_999_0000002.h5").is_test_file

  with pytest.raises(SystemExit):
    synthetic.main(["--out", str(tmp_path), "--volumes", "1", "--acquisitions", "AXT9"])
  assert "AXT1, AXT1PRE, AXT1POST, AXT2, AXFLAIR" in capsys.readouterr().err


def test_phantom_fallback(tmp_path, monkeypatch):
  vol = synthetic.generate_volume(1, "AXT2", anatomy="phantom", **TINY)
  assert vol.anatomy == "phantom" and vol.tissues == {}
  assert vol.kspace_SCHW.shape == (2, 4, 128, 64)
  assert 1e-4 < vol.reconstruction_rss.max() < 1e-2
  assert vol.patient_id != synthetic.generate_volume(1, "AXT2", anatomy="mni152", **TINY).patient_id

  monkeypatch.setattr(synthetic, "_mni152_available", lambda: False)
  auto = synthetic.generate_volume(1, "AXT2", **TINY)
  assert auto.anatomy == "phantom"
  np.testing.assert_array_equal(auto.kspace_SCHW, vol.kspace_SCHW)
  paths = synthetic.write_dataset(tmp_path, 1, seed=2, acquisitions="AXFLAIR", **TINY)
  flair = fastmri.read_volume(paths[0])
  np.testing.assert_allclose(
    fastmri.rss_from_kspace(flair.kspace, (64, 64)), flair.reconstruction_rss, rtol=1e-5, atol=1e-9
  )


def test_birdcage_maps_are_isotropic_with_unit_rss():
  square = synthetic.birdcage_maps(6, (32, 32), angle=0.3)
  tall = synthetic.birdcage_maps(6, (64, 32), angle=0.3)
  assert tall.shape == (6, 64, 32) and tall.dtype == np.complex64
  np.testing.assert_allclose(np.sum(np.abs(tall) ** 2, axis=0), 1.0, rtol=1e-5)
  # Both axes share the half-width, so the square grid is the central part of the tall one.
  np.testing.assert_allclose(tall[:, 16:48], square, rtol=1e-5, atol=1e-6)


def test_geometry_validation():
  assert synthetic.get_geometry("fastmri") == synthetic.Geometry((640, 320), (320, 320))
  assert synthetic.GEOMETRIES["tiny"].pixel_mm == pytest.approx(220 / 64)
  with pytest.raises(ValueError, match="even"):
    synthetic.Geometry((641, 320), (320, 320))
  with pytest.raises(ValueError, match="height"):
    synthetic.Geometry((300, 320), (320, 320))
  with pytest.raises(ValueError, match="narrow_kspace=True"):
    synthetic.Geometry((640, 260), (320, 320))
  with pytest.raises(ValueError, match="narrow_kspace"):
    synthetic.Geometry((640, 320), (320, 320), narrow_kspace=True)


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(acquisition="AXT9"), "AXT1, AXT1PRE, AXT1POST, AXT2, AXFLAIR"),
    (dict(geometry="huge"), "fastmri, demo, small, tiny, recon384, narrow_flair, tiny_narrow"),
    (dict(anatomy="brainweb"), "auto, mni152, phantom"),
    (dict(coils=(0, 4)), "coils"),
    (dict(coils=(6, 4)), "coils"),
    (dict(num_slices=0), "num_slices"),
    (dict(noise_level=-0.1), "noise_level"),
    (dict(seed=-1), "seed"),
  ],
)
def test_bad_arguments_name_the_problem(kwargs, match):
  call = dict(seed=0, acquisition="AXT2", **TINY)
  call.update(kwargs)
  with pytest.raises(ValueError, match=re.escape(match)):
    synthetic.generate_volume(call.pop("seed"), call.pop("acquisition"), **call)


def test_bad_dataset_arguments(tmp_path):
  with pytest.raises(ValueError, match="num_volumes"):
    synthetic.write_dataset(tmp_path, -1, **TINY)
  with pytest.raises(ValueError, match="AXFLAIR"):
    synthetic.write_dataset(tmp_path, 1, acquisitions=["AXT2", "T2"], **TINY)
  with pytest.raises(ValueError, match="accelerations"):
    synthetic.write_dataset(tmp_path, 1, test_style=True, accelerations=(1,), **TINY)
  assert not any(tmp_path.iterdir())
