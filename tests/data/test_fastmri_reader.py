"""Tests for `nextaccel_jax.data.fastmri`: reading, validating and scanning fastMRI `.h5` files.

Every file is written into pytest's `tmp_path`, with `fastmri.write_volume` for well-formed volumes
and h5py directly for the damaged ones. Geometries are tiny (encoded 32×16, recon 16×16) except
where a quirk needs the real numbers (recon 384). Covers spec §1 (layout, header, quirks) and §1.4
(RSS).
"""

import pathlib

import h5py
import numpy as np
import pytest

from nextaccel_jax.data import fastmri

ENC = (32, 16)
RECON = (16, 16)


def random_kspace(shape, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)


def numpy_rss(kspace_SCHW, recon):
  """RSS target computed from scratch with numpy (spec §1.4), independent of the package."""
  k = np.asarray(kspace_SCHW, np.complex128)
  images = np.fft.fftshift(
    np.fft.ifft2(np.fft.ifftshift(k, axes=(-2, -1)), norm="ortho"), axes=(-2, -1)
  )
  h, w = recon
  top, left = (k.shape[-2] - h) // 2, (k.shape[-1] - w) // 2
  images = images[..., top : top + h, left : left + w]
  return np.sqrt(np.sum(np.abs(images) ** 2, axis=-3))


def write_good(path, *, num_slices=2, num_coils=4, enc=ENC, recon=RECON, seed=0, **header_kwargs):
  """A well-formed training-style volume; returns (path, kspace)."""
  kspace = random_kspace((num_slices, num_coils, *enc), seed)
  header = fastmri.make_ismrmrd_header(
    enc, recon, num_slices=num_slices, num_coils=num_coils, **header_kwargs
  )
  fastmri.write_volume(
    path,
    kspace,
    acquisition="AXT2",
    patient_id="abc123",
    header=header,
    reconstruction_rss=fastmri.rss_from_kspace(kspace, recon),
  )
  return pathlib.Path(path), kspace


def write_raw(path, *, kspace=None, header=None, attrs=None, mask=None, rss=None):
  """Writes whatever it is given with h5py, with no validation (for damaged files)."""
  with h5py.File(path, "w") as f:
    if kspace is not None:
      f.create_dataset("kspace", data=kspace)
    if header is not None:
      f.create_dataset("ismrmrd_header", data=np.bytes_(header))
    if mask is not None:
      f.create_dataset("mask", data=mask)
    if rss is not None:
      f.create_dataset("reconstruction_rss", data=rss)
    for key, value in (
      {"acquisition": "AXT1", "patient_id": "p"} if attrs is None else attrs
    ).items():
      f.attrs[key] = value
  return pathlib.Path(path)


def good_header(**kwargs):
  return fastmri.make_ismrmrd_header(ENC, RECON, num_slices=2, num_coils=4, **kwargs)


def assert_file_error(excinfo, path, *words):
  err = excinfo.value
  assert isinstance(err, fastmri.FastMRIFileError)
  assert err.path == str(path)
  assert str(path) in str(err)
  for word in words:
    assert word in err.problem, f"{word!r} not in {err.problem!r}"


# ------------------------------------------------------------------------------------------------
# Well-formed files


def test_good_file_round_trips(tmp_path):
  path, kspace = write_good(tmp_path / "file_brain_AXT2_999_0000001.h5")
  vol = fastmri.read_volume(path)
  assert vol.path == path
  assert vol.kspace_shape == (2, 4, *ENC)
  assert vol.num_slices == 2 and vol.num_coils == 4
  assert vol.kspace.dtype == np.complex64
  np.testing.assert_array_equal(vol.kspace, kspace)
  np.testing.assert_allclose(vol.reconstruction_rss, numpy_rss(kspace, RECON), rtol=1e-5)
  assert vol.header.encoded_size == (*ENC, 1)
  assert vol.header.recon_size == (*RECON, 1)
  assert vol.header.padding == (0, ENC[1])
  assert vol.acquisition == "AXT2" and vol.contrast == "T2"
  assert vol.patient_id == "abc123"
  assert vol.attrs["max"] == pytest.approx(float(vol.reconstruction_rss.max()))
  assert vol.attrs["norm"] == pytest.approx(float(np.linalg.norm(vol.reconstruction_rss)))
  assert vol.mask is None and not vol.is_test_file
  assert not list(tmp_path.glob("*.partial"))


def test_metadata_only_read(tmp_path):
  path, _ = write_good(tmp_path / "a.h5")
  vol = fastmri.read_volume(path, load_kspace=False)
  assert vol.kspace is None and vol.reconstruction_rss is None
  assert vol.kspace_shape == (2, 4, *ENC)
  assert vol.header.recon_size == (*RECON, 1)


def test_partial_phase_encode_window_gives_fastmri_padding(tmp_path):
  # fastMRI: left = enc_y // 2 - center, right = left + maximum + 1.
  path, _ = write_good(tmp_path / "a.h5", pe_center=6, pe_maximum=11)
  assert fastmri.read_volume(path).header.padding == (2, 14)
  # Real-size example: 396 encoded columns of which 372 were acquired, centred.
  header = fastmri.parse_ismrmrd_header(
    fastmri.make_ismrmrd_header((768, 396), (384, 384), pe_center=186, pe_maximum=371)
  )
  assert header.padding == (12, 384)


@pytest.mark.parametrize("acquisition", ["AXT1", "AXT1PRE", "AXT1POST", "AXT2", "AXFLAIR"])
def test_contrast_groups(acquisition):
  expected = {"AXT2": "T2", "AXFLAIR": "FLAIR"}.get(acquisition, "T1")
  assert fastmri.contrast_group(acquisition) == expected


def test_unknown_acquisition_names_the_value():
  with pytest.raises(ValueError, match="'AXPD'"):
    fastmri.contrast_group("AXPD")


def test_recon_384_header_is_read(tmp_path):
  path, kspace = write_good(
    tmp_path / "wide.h5", num_slices=1, num_coils=2, enc=(768, 396), recon=(384, 384)
  )
  vol = fastmri.read_volume(path)
  assert vol.header.encoded_size == (768, 396, 1)
  assert vol.header.recon_size == (384, 384, 1)
  assert vol.reconstruction_rss.shape == (1, 384, 384)
  np.testing.assert_allclose(vol.reconstruction_rss, numpy_rss(kspace, (384, 384)), rtol=1e-4)


def test_narrow_flair_kspace_is_read(tmp_path):
  # k-space narrower than the recon width: readable; coil combination decides to skip it later.
  kspace = random_kspace((2, 4, 32, 12))
  header = fastmri.make_ismrmrd_header((32, 12), (16, 16), protocol_name="AXFLAIR")
  path = fastmri.write_volume(
    tmp_path / "file_brain_AXFLAIR_999_0000003.h5",
    kspace,
    acquisition="AXFLAIR",
    patient_id="p",
    header=header,
  )
  vol = fastmri.read_volume(path)
  assert vol.kspace_shape[-1] == 12
  assert vol.header.recon_size[1] == 16
  assert vol.contrast == "FLAIR"


def test_few_coils_are_read(tmp_path):
  path, kspace = write_good(tmp_path / "two.h5", num_coils=2)
  vol = fastmri.read_volume(path)
  assert vol.num_coils == 2
  np.testing.assert_array_equal(vol.kspace, kspace)


def test_test_file_with_mask_and_no_target(tmp_path):
  mask = np.zeros(ENC[1], bool)
  mask[::4] = True
  mask[6:10] = True
  kspace = random_kspace((2, 4, *ENC)) * mask
  path = fastmri.write_volume(
    tmp_path / "test.h5",
    kspace,
    acquisition="AXT1POST",
    patient_id="p",
    header=good_header(),
    mask=mask,
    extra_attrs={"acceleration": 4, "num_low_frequency": 4},
  )
  vol = fastmri.read_volume(path)
  assert vol.is_test_file
  assert vol.reconstruction_rss is None
  assert vol.mask.dtype == bool
  np.testing.assert_array_equal(vol.mask, mask)
  assert vol.attrs["acceleration"] == 4
  assert "max" not in vol.attrs


def test_float_mask_and_acceleration_attr_alone(tmp_path):
  mask = np.ones(ENC[1], np.float32)
  path = write_raw(
    tmp_path / "m.h5", kspace=random_kspace((1, 2, *ENC)), header=good_header(), mask=mask
  )
  assert fastmri.read_volume(path).mask.dtype == bool
  path = write_raw(
    tmp_path / "acc.h5",
    kspace=random_kspace((1, 2, *ENC)),
    header=good_header(),
    attrs={"acquisition": "AXT1", "acceleration": 8},
  )
  vol = fastmri.read_volume(path)
  assert vol.mask is None and vol.is_test_file
  assert vol.patient_id == ""


def test_header_stored_as_variable_length_string(tmp_path):
  path = tmp_path / "vlen.h5"
  with h5py.File(path, "w") as f:
    f.create_dataset("kspace", data=random_kspace((1, 2, *ENC)))
    f.create_dataset("ismrmrd_header", data=good_header().decode())
    f.attrs["acquisition"] = np.bytes_(b"AXT1")
  vol = fastmri.read_volume(path)
  assert vol.header.recon_size == (*RECON, 1)
  assert vol.acquisition == "AXT1"


# ------------------------------------------------------------------------------------------------
# Damaged files: each raises FastMRIFileError naming the file and the problem


def test_missing_file(tmp_path):
  path = tmp_path / "absent.h5"
  with pytest.raises(fastmri.FastMRIFileError) as info:
    fastmri.read_volume(path)
  assert_file_error(info, path, "no such file")


def test_not_hdf5(tmp_path):
  path = tmp_path / "junk.h5"
  path.write_bytes(np.random.default_rng(0).bytes(4096))
  with pytest.raises(fastmri.FastMRIFileError) as info:
    fastmri.read_volume(path)
  assert_file_error(info, path, "HDF5")


def test_truncated_file(tmp_path):
  good, _ = write_good(tmp_path / "good.h5")
  data = good.read_bytes()
  path = tmp_path / "truncated.h5"
  path.write_bytes(data[: len(data) // 2])
  with pytest.raises(fastmri.FastMRIFileError) as info:
    fastmri.read_volume(path)
  assert_file_error(info, path)
  assert "HDF5" in info.value.problem or "truncated" in info.value.problem


def test_missing_kspace(tmp_path):
  path = write_raw(tmp_path / "nok.h5", header=good_header())
  with pytest.raises(fastmri.FastMRIFileError) as info:
    fastmri.read_volume(path)
  assert_file_error(info, path, "'kspace'", "missing")


def test_kspace_that_is_a_group(tmp_path):
  path = tmp_path / "group.h5"
  with h5py.File(path, "w") as f:
    f.create_group("kspace")
    f.create_dataset("ismrmrd_header", data=np.bytes_(good_header()))
    f.attrs["acquisition"] = "AXT1"
  with pytest.raises(fastmri.FastMRIFileError) as info:
    fastmri.read_volume(path)
  assert_file_error(info, path, "'kspace'")


def test_wrong_rank(tmp_path):
  path = write_raw(tmp_path / "rank3.h5", kspace=random_kspace((4, *ENC)), header=good_header())
  with pytest.raises(fastmri.FastMRIFileError) as info:
    fastmri.read_volume(path)
  assert_file_error(info, path, "rank 4", "(4, 32, 16)")


def test_wrong_dtype(tmp_path):
  kspace = np.ones((1, 2, *ENC), np.float32)
  path = write_raw(tmp_path / "float.h5", kspace=kspace, header=good_header())
  with pytest.raises(fastmri.FastMRIFileError) as info:
    fastmri.read_volume(path)
  assert_file_error(info, path, "complex", "float32")


def test_empty_kspace(tmp_path):
  path = write_raw(
    tmp_path / "empty.h5", kspace=np.zeros((0, 2, *ENC), np.complex64), header=good_header()
  )
  with pytest.raises(fastmri.FastMRIFileError) as info:
    fastmri.read_volume(path)
  assert_file_error(info, path, "empty")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, complex(0, np.nan)])
def test_non_finite_kspace(tmp_path, bad):
  kspace = random_kspace((2, 2, *ENC))
  kspace[1, 0, 3, 4] = bad
  path = write_raw(tmp_path / "nan.h5", kspace=kspace, header=good_header())
  with pytest.raises(fastmri.FastMRIFileError) as info:
    fastmri.read_volume(path)
  assert_file_error(info, path, "NaN or Inf")
  # A metadata-only read does not look at the values.
  assert fastmri.read_volume(path, load_kspace=False).kspace is None


def test_missing_header(tmp_path):
  path = write_raw(tmp_path / "nohdr.h5", kspace=random_kspace((1, 2, *ENC)))
  with pytest.raises(fastmri.FastMRIFileError) as info:
    fastmri.read_volume(path)
  assert_file_error(info, path, "ismrmrd_header", "missing")


def test_unparsable_header(tmp_path):
  path = write_raw(
    tmp_path / "badxml.h5", kspace=random_kspace((1, 2, *ENC)), header=b"<ismrmrdHeader><encoding>"
  )
  with pytest.raises(fastmri.FastMRIFileError) as info:
    fastmri.read_volume(path)
  assert_file_error(info, path, "not valid XML")


@pytest.mark.parametrize(
  ("tag", "field"),
  [
    ("reconSpace", "encoding/reconSpace/matrixSize/x"),
    ("kspace_encoding_step_1", "encodingLimits/kspace_encoding_step_1/center"),
  ],
)
def test_header_missing_required_field(tmp_path, tag, field):
  text = good_header().decode()
  start = text.index(f"<{tag}>")
  end = text.index(f"</{tag}>") + len(f"</{tag}>")
  path = write_raw(
    tmp_path / "nofield.h5",
    kspace=random_kspace((1, 2, *ENC)),
    header=(text[:start] + text[end:]).encode(),
  )
  with pytest.raises(fastmri.FastMRIFileError) as info:
    fastmri.read_volume(path)
  assert_file_error(info, path, field)


@pytest.mark.parametrize("value", ["abc", "nan", "inf"])
def test_header_field_not_a_number(tmp_path, value):
  text = good_header().decode().replace("<center>8</center>", f"<center>{value}</center>", 1)
  assert value in text
  path = write_raw(
    tmp_path / "nan_hdr.h5", kspace=random_kspace((1, 2, *ENC)), header=text.encode()
  )
  with pytest.raises(fastmri.FastMRIFileError) as info:
    fastmri.read_volume(path)
  assert_file_error(info, path, "kspace_encoding_step_1/center", "not a number")


def test_missing_acquisition_attribute(tmp_path):
  path = write_raw(
    tmp_path / "noacq.h5",
    kspace=random_kspace((1, 2, *ENC)),
    header=good_header(),
    attrs={"patient_id": "p"},
  )
  with pytest.raises(fastmri.FastMRIFileError) as info:
    fastmri.read_volume(path)
  assert_file_error(info, path, "acquisition")


def test_non_utf8_string_attributes_are_tolerated(tmp_path):
  # h5py decodes variable-length strings with "surrogateescape"; fixed-length byte strings must read
  # back the same way rather than escape as a UnicodeDecodeError.
  for name, value in [("vlen.h5", b"\xff\xfe"), ("fixed.h5", np.bytes_(b"\xff\xfe"))]:
    path = write_raw(
      tmp_path / name,
      kspace=random_kspace((1, 2, *ENC)),
      header=good_header(),
      attrs={"acquisition": "AXT1", "patient_id": value},
    )
    assert fastmri.read_volume(path).patient_id == "\udcff\udcfe", name


def test_mask_length_mismatch(tmp_path):
  path = write_raw(
    tmp_path / "mask.h5",
    kspace=random_kspace((1, 2, *ENC)),
    header=good_header(),
    mask=np.ones(ENC[1] + 3, bool),
  )
  with pytest.raises(fastmri.FastMRIFileError) as info:
    fastmri.read_volume(path)
  assert_file_error(info, path, "'mask'", str(ENC[1] + 3), str(ENC[1]))


def test_target_slice_count_mismatch(tmp_path):
  path = write_raw(
    tmp_path / "rss.h5",
    kspace=random_kspace((2, 2, *ENC)),
    header=good_header(),
    rss=np.zeros((3, *RECON), np.float32),
  )
  with pytest.raises(fastmri.FastMRIFileError) as info:
    fastmri.read_volume(path, load_kspace=False)
  assert_file_error(info, path, "reconstruction_rss", "2 slices")


# ------------------------------------------------------------------------------------------------
# Directory scans


def test_scan_directory_skips_and_reports_bad_files(tmp_path):
  good_a, _ = write_good(tmp_path / "file_brain_AXT2_999_0000001.h5", seed=1)
  good_b, _ = write_good(tmp_path / "file_brain_AXT2_999_0000002.h5", seed=2)
  junk = tmp_path / "file_brain_AXT1_999_0000003.h5"
  junk.write_bytes(b"\x00" * 100)
  no_kspace = write_raw(tmp_path / "file_brain_AXT1_999_0000004.h5", header=good_header())
  bad_xml = write_raw(
    tmp_path / "file_brain_AXT1_999_0000005.h5",
    kspace=random_kspace((1, 2, *ENC)),
    header=b"not xml",
  )
  (tmp_path / "notes.txt").write_text("not a volume")

  result = fastmri.scan_directory(tmp_path)
  assert [v.path for v in result.volumes] == [good_a, good_b]
  assert all(v.kspace is None for v in result.volumes)
  assert sorted(e.path for e in result.errors) == sorted(str(p) for p in (junk, no_kspace, bad_xml))
  report = result.report()
  assert report.splitlines()[0] == "2 readable volumes, 3 skipped"
  for bad in (junk, no_kspace, bad_xml):
    assert str(bad) in report
  assert "notes.txt" not in report


def test_scan_directory_check_kspace_catches_nan(tmp_path):
  write_good(tmp_path / "good.h5")
  kspace = random_kspace((1, 2, *ENC))
  kspace[0, 0, 0, 0] = np.nan
  nan_file = write_raw(tmp_path / "nan.h5", kspace=kspace, header=good_header())
  assert len(fastmri.scan_directory(tmp_path).volumes) == 2
  checked = fastmri.scan_directory(tmp_path, check_kspace=True)
  assert len(checked.volumes) == 1
  assert [e.path for e in checked.errors] == [str(nan_file)]


def test_scan_directory_needs_a_directory(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a directory"):
    fastmri.scan_directory(tmp_path / "missing")


def test_volume_files_sorted(tmp_path):
  for name in ("b.h5", "a.h5", "c.txt"):
    (tmp_path / name).write_bytes(b"")
  assert [p.name for p in fastmri.volume_files(tmp_path)] == ["a.h5", "b.h5"]


# ------------------------------------------------------------------------------------------------
# Slices, RSS and writing


def test_read_slice(tmp_path):
  path, kspace = write_good(tmp_path / "a.h5", num_slices=3)
  for index in range(3):
    np.testing.assert_array_equal(fastmri.read_slice(path, index), kspace[index])


@pytest.mark.parametrize("index", [-1, 3, 10])
def test_read_slice_bounds(tmp_path, index):
  path, _ = write_good(tmp_path / "a.h5", num_slices=3)
  with pytest.raises(fastmri.FastMRIFileError) as info:
    fastmri.read_slice(path, index)
  assert_file_error(info, path, f"slice {index} out of range [0, 3)")


def test_read_slice_bad_files(tmp_path):
  junk = tmp_path / "junk.h5"
  junk.write_bytes(b"garbage" * 10)
  with pytest.raises(fastmri.FastMRIFileError) as info:
    fastmri.read_slice(junk, 0)
  assert_file_error(info, junk, "HDF5")
  no_kspace = write_raw(tmp_path / "nok.h5", header=good_header())
  with pytest.raises(fastmri.FastMRIFileError) as info:
    fastmri.read_slice(no_kspace, 0)
  assert_file_error(info, no_kspace, "'kspace'")
  kspace = random_kspace((2, 2, *ENC))
  kspace[1, 1, 0, 0] = np.inf
  inf_file = write_raw(tmp_path / "inf.h5", kspace=kspace, header=good_header())
  np.testing.assert_array_equal(fastmri.read_slice(inf_file, 0), kspace[0])
  with pytest.raises(fastmri.FastMRIFileError) as info:
    fastmri.read_slice(inf_file, 1)
  assert_file_error(info, inf_file, "slice 1", "NaN or Inf")


def test_read_slice_rejects_wrong_rank_and_dtype(tmp_path):
  rank3 = write_raw(tmp_path / "rank3.h5", kspace=random_kspace((4, *ENC)), header=good_header())
  with pytest.raises(fastmri.FastMRIFileError) as info:
    fastmri.read_slice(rank3, 0)
  assert_file_error(info, rank3, "rank 4")
  real = write_raw(
    tmp_path / "float.h5", kspace=np.ones((1, 2, *ENC), np.float32), header=good_header()
  )
  with pytest.raises(fastmri.FastMRIFileError) as info:
    fastmri.read_slice(real, 0)
  assert_file_error(info, real, "complex")


def test_rss_from_kspace_matches_numpy():
  kspace = random_kspace((2, 3, 40, 18), seed=5)
  for recon in [(20, 18), (21, 17), (40, 18)]:
    np.testing.assert_allclose(
      fastmri.rss_from_kspace(kspace, recon), numpy_rss(kspace, recon), rtol=1e-5, atol=1e-6
    )
  assert fastmri.rss_from_kspace(kspace, (20, 18)).dtype == np.float32
  # A single slice [C, H, W] works too.
  np.testing.assert_allclose(
    fastmri.rss_from_kspace(kspace[0], (20, 18)),
    numpy_rss(kspace[:1], (20, 18))[0],
    rtol=1e-5,
    atol=1e-6,
  )


def test_make_header_defaults_and_parse():
  header = fastmri.parse_ismrmrd_header(fastmri.make_ismrmrd_header())
  assert header == fastmri.VolumeHeader((640, 320, 1), (320, 320, 1), (0, 320))
  assert fastmri.parse_ismrmrd_header(fastmri.make_ismrmrd_header().decode()) == header


def test_write_volume_default_header_and_bad_rank(tmp_path):
  kspace = random_kspace((1, 2, *ENC))
  path = fastmri.write_volume(tmp_path / "d.h5", kspace, acquisition="AXT1", patient_id="p")
  vol = fastmri.read_volume(path)
  assert vol.header.encoded_size == (*ENC, 1)
  assert vol.header.recon_size == (ENC[0] // 2, ENC[1], 1)
  with pytest.raises(ValueError, match="kspace_SCHW"):
    fastmri.write_volume(tmp_path / "e.h5", kspace[0], acquisition="AXT1", patient_id="p")
  assert not (tmp_path / "e.h5").exists()
