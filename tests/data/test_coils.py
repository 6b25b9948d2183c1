"""Tests for `nextaccel_jax.data.coils`: spec §4.2 coil combination on tiny analytic slices.

The test k-space is a smooth analytic head-like object times sigpy birdcage coils, zero-padded along
the readout for 2× oversampling, with a little complex noise. Sizes follow spec §5.2's reduced
geometry (encoded 128×64, recon 64×64) so ESPIRiT runs in a fraction of a second.
"""

import numpy as np
import pytest
import sigpy.mri

from nextaccel_jax.data import coils, fastmri, transforms

ENC = (128, 64)
RECON = (64, 64)
CROP = (48, 48)


def analytic_object(shape):
  """An ellipse with a soft edge, a bright and a dark blob, and a smooth phase."""
  h, w = shape
  y, x = np.mgrid[:h, :w]
  yy = (y - h / 2 + 0.5) / (h / 2)
  xx = (x - w / 2 + 0.5) / (w / 2)
  radius = np.sqrt((yy / 0.8) ** 2 + (xx / 0.65) ** 2)
  mag = 0.5 * (1 - np.tanh((radius - 1) / 0.05))
  mag *= 0.6 + 0.4 * np.exp(-((yy - 0.2) ** 2 + (xx + 0.1) ** 2) / 0.05)
  mag *= 1 - 0.3 * np.exp(-((yy + 0.3) ** 2 + (xx - 0.2) ** 2) / 0.02)
  phase = 0.8 * np.cos(np.pi * yy) * np.sin(0.5 * np.pi * xx)
  return (mag * np.exp(1j * phase)).astype(np.complex64)


def disc_object(shape, radius_frac):
  """A disc whose radius is a fixed fraction of the FOV width (to check that the FOV is kept)."""
  h, w = shape
  y, x = np.mgrid[:h, :w]
  r = np.hypot((y - h / 2 + 0.5) / w, (x - w / 2 + 0.5) / w)
  return (0.5 * (1 - np.tanh((r - radius_frac) * w / 1.5))).astype(np.complex64)


def pad_to(images_CHW, shape):
  """Zero-pads coil images to `shape`, placed where fastMRI's centre crop takes them back."""
  big_h, big_w = shape
  h, w = images_CHW.shape[-2:]
  top, left = (big_h - h) // 2, (big_w - w) // 2
  return np.pad(images_CHW, ((0, 0), (top, big_h - h - top), (left, big_w - w - left)))


def make_slice(num_coils=8, recon=RECON, enc=ENC, obj=None, noise=1e-3, seed=0):
  """Returns (object, true maps, k-space [C, H, W], header) for one simulated slice."""
  obj = analytic_object(recon) if obj is None else obj
  maps_CHW = sigpy.mri.birdcage_maps((num_coils, *recon), r=1.5).astype(np.complex64)
  kspace_CHW = transforms.fft2c_np(pad_to(maps_CHW * obj, enc))
  rng = np.random.default_rng(seed)
  kspace_CHW = kspace_CHW + noise * (
    rng.standard_normal(kspace_CHW.shape) + 1j * rng.standard_normal(kspace_CHW.shape)
  )
  header = fastmri.parse_ismrmrd_header(fastmri.make_ismrmrd_header(enc, recon))
  return obj, maps_CHW, kspace_CHW.astype(np.complex64), header


def make_volume(kspace_SCHW, enc, recon, path="file_brain_AXT2_999_0000001.h5"):
  header = fastmri.parse_ismrmrd_header(fastmri.make_ismrmrd_header(enc, recon))
  return fastmri.FastMRIVolume(
    path=path,
    kspace_shape=tuple(kspace_SCHW.shape),
    header=header,
    acquisition="AXT2",
    patient_id="p0",
    attrs={},
    kspace=kspace_SCHW,
  )


def support(obj_HW, frac=0.1):
  return np.abs(obj_HW) > frac * np.abs(obj_HW).max()


def rel_error_up_to_phase(x, ref):
  """min over a global phase φ of ‖x e^{iφ} − ref‖ / ‖ref‖."""
  inner = np.vdot(x, ref)
  phase = inner / abs(inner)
  return float(np.linalg.norm(x * phase - ref) / np.linalg.norm(ref))


@pytest.fixture(scope="module")
def sim8():
  return make_slice(num_coils=8)


@pytest.fixture(scope="module")
def espirit8(sim8):
  _, _, kspace_CHW, header = sim8
  return coils.combine_slice(kspace_CHW, header, crop=CROP, norm="none", num_virtual_coils=5)


# ------------------------------------------------------------------------------------------------
# Individual steps


def test_remove_oversampling_matches_fastmri_rss_recipe(sim8):
  _, _, kspace_CHW, header = sim8
  images_CHW = coils.remove_oversampling(kspace_CHW, header)
  assert images_CHW.shape == (8, *RECON)
  assert images_CHW.dtype == np.complex64
  np.testing.assert_allclose(
    transforms.rss(images_CHW), fastmri.rss_from_kspace(kspace_CHW, RECON), rtol=1e-5, atol=1e-6
  )


def test_remove_oversampling_recovers_coil_images():
  obj, maps_CHW, kspace_CHW, header = make_slice(num_coils=4, noise=0.0)
  images_CHW = coils.remove_oversampling(kspace_CHW, header)
  np.testing.assert_allclose(images_CHW, maps_CHW * obj, atol=1e-5)


def test_harmonise_384_recon_to_320_keeps_fov():
  enc, recon = (768, 396), (384, 384)
  disc = disc_object(recon, 0.3)
  _, _, kspace_CHW, header = make_slice(num_coils=2, recon=recon, enc=enc, obj=disc, noise=0.0)
  images_CHW = coils.remove_oversampling(kspace_CHW, header)
  assert images_CHW.shape == (2, 320, 320)
  assert coils.harmonised_grid(recon) == (320, 320)
  native_CHW = coils.remove_oversampling(kspace_CHW, header, harmonise_to=None)
  assert native_CHW.shape == (2, 384, 384)
  # Same FOV: the disc covers the same fraction of the image on both grids, and the intensity
  # inside it is unchanged.
  frac_native = np.mean(transforms.rss(native_CHW) > 0.25)
  frac_harmonised = np.mean(transforms.rss(images_CHW) > 0.25)
  assert frac_harmonised == pytest.approx(frac_native, rel=0.02)
  assert transforms.rss(images_CHW)[160, 160] == pytest.approx(1.0, rel=0.01)


def test_harmonise_keeps_320_and_narrower_grids():
  assert coils.harmonised_grid((320, 320)) == (320, 320)
  assert coils.harmonised_grid((64, 64), harmonise_to=48) == (48, 48)
  assert coils.harmonised_grid((80, 64), harmonise_to=48) == (60, 48)


def test_remove_oversampling_rejects_narrow_kspace():
  header = fastmri.VolumeHeader((128, 48, 1), (64, 64, 1), (0, 48))
  with pytest.raises(coils.SkipVolume, match="narrow"):
    coils.remove_oversampling(np.zeros((4, 128, 48), np.complex64), header)


def test_remove_oversampling_rejects_wrong_rank(sim8):
  _, _, kspace_CHW, header = sim8
  with pytest.raises(ValueError, match="kspace_CHW must be"):
    coils.remove_oversampling(kspace_CHW[0], header)


@pytest.mark.parametrize("num_coils", [8, 16])
def test_compression_keeps_energy_of_smooth_coils(num_coils):
  _, _, kspace_CHW, header = make_slice(num_coils=num_coils)
  images_CHW = coils.remove_oversampling(kspace_CHW, header)
  virtual_VHW, retained = coils.compress_coils(images_CHW, 5)
  assert virtual_VHW.shape == (5, *RECON)
  assert retained >= 0.95
  energy = np.sum(np.abs(virtual_VHW) ** 2) / np.sum(np.abs(images_CHW) ** 2)
  assert energy == pytest.approx(retained, rel=1e-4)
  # Virtual coils come out ordered by energy.
  per_coil = np.sum(np.abs(virtual_VHW) ** 2, axis=(1, 2))
  assert np.all(np.diff(per_coil) <= 1e-6 * per_coil[0])


def test_compression_with_few_coils_is_identity():
  _, _, kspace_CHW, header = make_slice(num_coils=3)
  images_CHW = coils.remove_oversampling(kspace_CHW, header)
  virtual_VHW, retained = coils.compress_coils(images_CHW, 5)
  np.testing.assert_array_equal(virtual_VHW, images_CHW)
  assert retained == 1.0


def test_compression_rejects_bad_count(sim8):
  with pytest.raises(ValueError, match="num_virtual"):
    coils.compress_coils(np.ones((4, 8, 8), np.complex64), 0)


def test_estimate_maps_validates_arguments():
  images_CHW = np.ones((4, 16, 16), np.complex64)
  with pytest.raises(ValueError, match="calib_width 24"):
    coils.estimate_maps(images_CHW, "espirit")
  with pytest.raises(ValueError, match="kernel_width"):
    coils.estimate_maps(images_CHW, "espirit", calib_width=8, kernel_width=8)
  with pytest.raises(ValueError, match="method"):
    coils.estimate_maps(images_CHW, "walsh", calib_width=8)


def test_combine_is_sense1_and_checks_shapes():
  rng = np.random.default_rng(1)
  images_CHW = (rng.standard_normal((3, 5, 6)) + 1j * rng.standard_normal((3, 5, 6))).astype(
    np.complex64
  )
  maps_CHW = (rng.standard_normal((3, 5, 6)) + 1j * rng.standard_normal((3, 5, 6))).astype(
    np.complex64
  )
  expected = sum(np.conj(maps_CHW[c]) * images_CHW[c] for c in range(3))
  np.testing.assert_allclose(coils.combine(images_CHW, maps_CHW), expected, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="same shape"):
    coils.combine(images_CHW, maps_CHW[:2])


# ------------------------------------------------------------------------------------------------
# Whole slice: ESPIRiT


def test_espirit_sense1_magnitude_matches_rss(sim8, espirit8):
  obj, _, kspace_CHW, header = sim8
  rss_HW = transforms.center_crop(
    transforms.rss(coils.remove_oversampling(kspace_CHW, header)), CROP
  )
  sup = support(transforms.center_crop(obj, CROP))
  assert espirit8.image.shape == CROP and espirit8.image.dtype == np.complex64
  corr = np.corrcoef(np.abs(espirit8.image)[sup], rss_HW[sup])[0, 1]
  assert corr >= 0.99
  np.testing.assert_allclose(np.abs(espirit8.image)[sup], rss_HW[sup], rtol=0.02, atol=0.01)


def test_espirit_maps_have_unit_norm_on_support(sim8, espirit8):
  obj, _, _, _ = sim8
  assert espirit8.maps.shape == (5, *CROP) and espirit8.maps.dtype == np.complex64
  sumsq_HW = np.sum(np.abs(espirit8.maps) ** 2, axis=0)
  sup = support(transforms.center_crop(obj, CROP))
  np.testing.assert_allclose(sumsq_HW[sup], 1.0, atol=1e-3)
  # Outside the support the maps are either unit-norm or cropped to zero by the eigenvalue mask.
  assert np.all((np.abs(sumsq_HW - 1) < 1e-3) | (sumsq_HW < 1e-6))


def test_espirit_maps_explain_the_virtual_coil_images(sim8, espirit8):
  # Phase-convention-free check that S and x are a consistent factorisation: S_v · x = m_v.
  obj, _, kspace_CHW, header = sim8
  images_VHW, _ = coils.compress_coils(coils.remove_oversampling(kspace_CHW, header), 5)
  images_VHW = transforms.center_crop(images_VHW, CROP)
  sup = support(transforms.center_crop(obj, CROP))
  resid = (espirit8.maps * espirit8.image - images_VHW)[:, sup]
  assert np.linalg.norm(resid) / np.linalg.norm(images_VHW[:, sup]) < 0.01


def test_espirit_sense1_reproduces_object_up_to_coil0_phase():
  # sigpy references the map phase to coil 0, so x = object · e^{i∠S_0} (not a global phase alone).
  # Five coils with five virtual coils leave coil 0 unrotated, so the reference phase is known.
  obj, maps_CHW, kspace_CHW, header = make_slice(num_coils=5)
  out = coils.combine_slice(kspace_CHW, header, crop=CROP, norm="none")
  assert out.retained_energy == 1.0
  obj_HW = transforms.center_crop(obj, CROP)
  ref_HW = obj_HW * np.exp(1j * np.angle(transforms.center_crop(maps_CHW[0], CROP)))
  sup = support(obj_HW)
  assert rel_error_up_to_phase(out.image[sup], ref_HW[sup]) < 0.01


def test_lowres_maps_path(sim8):
  obj, _, kspace_CHW, header = sim8
  out = coils.combine_slice(kspace_CHW, header, crop=CROP, maps="lowres", norm="none")
  assert out.image.shape == CROP and out.maps.shape == (5, *CROP)
  sumsq_HW = np.sum(np.abs(out.maps) ** 2, axis=0)
  np.testing.assert_allclose(sumsq_HW, 1.0, atol=1e-4)
  rss_HW = transforms.center_crop(
    transforms.rss(coils.remove_oversampling(kspace_CHW, header)), CROP
  )
  sup = support(transforms.center_crop(obj, CROP))
  assert np.corrcoef(np.abs(out.image)[sup], rss_HW[sup])[0, 1] >= 0.99


def test_fewer_coils_than_virtual_zero_pads_maps():
  obj, _, kspace_CHW, header = make_slice(num_coils=3)
  out = coils.combine_slice(kspace_CHW, header, crop=CROP, num_virtual_coils=5, norm="none")
  assert out.maps.shape == (5, *CROP)
  assert out.retained_energy == 1.0
  assert not np.any(out.maps[3:])
  sup = support(transforms.center_crop(obj, CROP))
  np.testing.assert_allclose(np.sum(np.abs(out.maps) ** 2, axis=0)[sup], 1.0, atol=1e-3)


def test_resize_kspace_keeps_fov(sim8):
  obj, _, kspace_CHW, header = sim8
  out = coils.combine_slice(kspace_CHW, header, crop=CROP, resize="kspace", norm="none")
  assert out.image.shape == CROP and out.maps.shape == (5, *CROP)
  # The whole 64-pixel FOV is now on the 48 grid: compare with the object brought to 48 by k-space,
  # at unchanged intensity.
  k_HW = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(obj.astype(np.complex128))))
  k_HW = transforms.center_crop(k_HW, CROP)
  obj_small = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k_HW))) * (CROP[0] * CROP[1]) / 64**2
  sup = support(obj_small)
  assert np.corrcoef(np.abs(out.image)[sup], np.abs(obj_small)[sup])[0, 1] >= 0.99
  np.testing.assert_allclose(np.abs(out.image)[sup], np.abs(obj_small)[sup], rtol=0.05, atol=0.02)
  # Maps estimated on the final grid keep Σ|S|² = 1 on the support.
  np.testing.assert_allclose(np.sum(np.abs(out.maps) ** 2, axis=0)[sup], 1.0, atol=1e-3)


def test_harmonised_volume_comes_out_on_the_crop_grid():
  # Scaled-down stand-in for recon 384 → 320: recon 80 harmonised to 64, then crop 48, with ESPIRiT.
  _, _, kspace_CHW, header = make_slice(num_coils=4, recon=(80, 80), enc=(160, 84))
  out = coils.combine_slice(kspace_CHW, header, crop=CROP, harmonise_to=64, norm="fs_max")
  assert out.image.shape == CROP and out.maps.shape == (5, *CROP)
  assert np.max(np.abs(out.image)) == pytest.approx(1.0, rel=1e-6)


def test_realistic_384_volume_gives_256_crop():
  # Full-size geometry of a wide AXT2 volume with the cheap map method and two coils.
  _, _, kspace_CHW, header = make_slice(num_coils=2, recon=(384, 384), enc=(768, 396))
  out = coils.combine_slice(kspace_CHW, header, maps="lowres", num_virtual_coils=5)
  assert out.image.shape == (256, 256) and out.maps.shape == (5, 256, 256)
  assert not np.any(out.maps[2:])


# ------------------------------------------------------------------------------------------------
# Normalisation


def r32_mask(shape):
  """Any fixed sparse mask will do; 72 points = 48²/32."""
  mask = np.zeros(shape, bool)
  top, left = shape[0] // 2 - 4, shape[1] // 2 - 4
  mask[top : top + 8, left : left + 9] = True
  return mask


def nested_masks(shape):
  """R = 32 ⊂ 16 ⊂ 8 ⊂ 4 ⊂ 2 built by growing a central block (exactness is not needed here)."""
  masks = []
  h, w = shape
  for r in (32, 16, 8, 4, 2):
    side = int(round(np.sqrt(h * w / r)))
    m = np.zeros(shape, bool)
    m[(h - side) // 2 : (h - side) // 2 + side, (w - side) // 2 : (w - side) // 2 + side] = True
    masks.append(m)
  return np.stack(masks)


def test_norm_fs_max(sim8, espirit8):
  _, _, kspace_CHW, header = sim8
  out = coils.combine_slice(kspace_CHW, header, crop=CROP, norm="fs_max")
  assert np.max(np.abs(out.image)) == pytest.approx(1.0, rel=1e-6)
  assert out.scale == pytest.approx(float(np.max(np.abs(espirit8.image))), rel=1e-6)
  np.testing.assert_allclose(out.image * out.scale, espirit8.image, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(out.maps, espirit8.maps)


def test_norm_none_has_unit_scale(espirit8):
  assert espirit8.scale == 1.0


def test_norm_r32_scale_is_max_of_zero_filled_r32_image(sim8, espirit8):
  _, _, kspace_CHW, header = sim8
  mask_HW = r32_mask(CROP)
  out = coils.combine_slice(kspace_CHW, header, crop=CROP, norm="r32", r32_mask=mask_HW)
  # Independent computation from the unnormalised image and maps, coil by coil.
  x_HW, maps_VHW = espirit8.image.astype(np.complex128), espirit8.maps.astype(np.complex128)
  zero_filled = np.zeros(CROP, np.complex128)
  for s_HW in maps_VHW:
    k_HW = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(s_HW * x_HW), norm="ortho"))
    coil_HW = np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(mask_HW * k_HW), norm="ortho"))
    zero_filled += np.conj(s_HW) * coil_HW
  assert out.scale == pytest.approx(float(np.max(np.abs(zero_filled))), rel=1e-4)
  np.testing.assert_allclose(out.image * out.scale, espirit8.image, rtol=1e-5, atol=1e-6)


def test_one_scale_for_every_level(sim8, espirit8):
  _, _, kspace_CHW, header = sim8
  masks_MHW = nested_masks(CROP)
  out = coils.combine_slice(kspace_CHW, header, crop=CROP, norm="r32", r32_mask=masks_MHW[0])
  levels = transforms.undersample_levels_np(out.image, out.maps, masks_MHW)
  levels_raw = transforms.undersample_levels_np(espirit8.image, espirit8.maps, masks_MHW)
  np.testing.assert_allclose(levels * out.scale, levels_raw, rtol=1e-4, atol=1e-5)
  magnitude = np.abs(transforms.channels_to_complex(levels))
  assert magnitude[0].max() == pytest.approx(1.0, rel=1e-4)
  fs = coils.combine_slice(kspace_CHW, header, crop=CROP, norm="fs_max")
  fs_levels = transforms.undersample_levels_np(fs.image, fs.maps, masks_MHW)
  np.testing.assert_allclose(fs_levels * fs.scale, levels_raw, rtol=1e-4, atol=1e-5)


def test_norm_r32_needs_a_matching_mask(sim8):
  _, _, kspace_CHW, header = sim8
  with pytest.raises(ValueError, match="needs r32_mask"):
    coils.combine_slice(kspace_CHW, header, crop=CROP, maps="lowres", norm="r32")
  with pytest.raises(ValueError, match="r32_mask has shape"):
    coils.combine_slice(
      kspace_CHW, header, crop=CROP, maps="lowres", norm="r32", r32_mask=np.ones((64, 64), bool)
    )


@pytest.mark.parametrize("maps", ["espirit", "lowres"])
def test_all_zero_slice_is_reported(maps):
  header = fastmri.parse_ismrmrd_header(fastmri.make_ismrmrd_header(ENC, RECON))
  with pytest.raises(ValueError, match="empty"):
    coils.combine_slice(np.zeros((4, *ENC), np.complex64), header, crop=CROP, maps=maps)


@pytest.mark.parametrize(
  ("kwargs", "match"),
  [
    ({"maps": "walsh"}, "maps must be"),
    ({"resize": "bicubic"}, "resize must be"),
    ({"norm": "p99"}, "norm must be"),
  ],
)
def test_combine_slice_rejects_unknown_options(sim8, kwargs, match):
  _, _, kspace_CHW, header = sim8
  with pytest.raises(ValueError, match=match):
    coils.combine_slice(kspace_CHW, header, crop=CROP, **kwargs)


# ------------------------------------------------------------------------------------------------
# Geometry and volumes


def test_skip_narrow_kspace_volume():
  vol = make_volume(np.zeros((2, 4, 128, 48), np.complex64), (128, 48), RECON)
  with pytest.raises(coils.SkipVolume, match="narrow") as info:
    coils.check_geometry(vol, CROP)
  assert info.value.path == "file_brain_AXT2_999_0000001.h5"
  assert "48" in info.value.reason and "64" in info.value.reason
  assert "file_brain_AXT2_999_0000001.h5" in str(info.value)
  with pytest.raises(coils.SkipVolume, match="narrow"):
    coils.combine_volume(vol, crop=CROP)


def test_skip_single_coil_volume():
  vol = make_volume(np.zeros((2, 1, *ENC), np.complex64), ENC, RECON)
  with pytest.raises(coils.SkipVolume, match="1 coil"):
    coils.check_geometry(vol, CROP)
  with pytest.raises(coils.SkipVolume, match="1 coil"):
    coils.combine_slice(vol.kspace[0], vol.header, crop=CROP)


def test_skip_crop_larger_than_recon_grid():
  vol = make_volume(np.zeros((2, 4, *ENC), np.complex64), ENC, RECON)
  with pytest.raises(coils.SkipVolume, match="larger than the 64x64"):
    coils.check_geometry(vol, (96, 96))
  coils.check_geometry(vol, CROP)


def test_check_geometry_uses_the_harmonised_grid():
  vol = make_volume(np.zeros((1, 2, 768, 396), np.complex64), (768, 396), (384, 384))
  coils.check_geometry(vol, (320, 320))
  with pytest.raises(coils.SkipVolume, match="320x320"):
    coils.check_geometry(vol, (352, 352))
  coils.check_geometry(vol, (352, 352), harmonise_to=None)


def test_combine_volume_selected_slices(sim8):
  _, _, kspace_CHW, _ = sim8
  kspace_SCHW = np.stack([kspace_CHW, 2 * kspace_CHW])
  vol = make_volume(kspace_SCHW, ENC, RECON)
  out = coils.combine_volume(vol, slices=[1], crop=CROP, maps="lowres", norm="none")
  assert len(out) == 1
  ref = coils.combine_slice(2 * kspace_CHW, vol.header, crop=CROP, maps="lowres", norm="none")
  np.testing.assert_allclose(out[0].image, ref.image, rtol=1e-6)
  with pytest.raises(ValueError, match="slice 2 out of range"):
    coils.combine_volume(vol, slices=[2], crop=CROP, maps="lowres")
  vol.kspace = None
  with pytest.raises(ValueError, match="k-space not loaded"):
    coils.combine_volume(vol, crop=CROP, maps="lowres")


def test_combine_volume_from_a_written_file(tmp_path, sim8):
  _, _, kspace_CHW, _ = sim8
  kspace_SCHW = np.stack([kspace_CHW, kspace_CHW[:, ::-1]])
  path = fastmri.write_volume(
    tmp_path / "file_brain_AXT1_999_0000002.h5",
    kspace_SCHW,
    acquisition="AXT1",
    patient_id="p1",
    header=fastmri.make_ismrmrd_header(ENC, RECON, num_slices=2, num_coils=8),
    reconstruction_rss=fastmri.rss_from_kspace(kspace_SCHW, RECON),
  )
  out = coils.combine_volume(fastmri.read_volume(path), crop=CROP, norm="fs_max")
  assert len(out) == 2
  for item in out:
    assert item.image.shape == CROP and item.maps.shape == (5, *CROP)
    assert np.max(np.abs(item.image)) == pytest.approx(1.0, rel=1e-6)
    assert 0.95 <= item.retained_energy <= 1.0


def test_map_options_reach_estimate_maps(sim8):
  _, _, kspace_CHW, header = sim8
  with pytest.raises(ValueError, match="calib_width 100"):
    coils.combine_slice(kspace_CHW, header, crop=CROP, map_options={"calib_width": 100})
  out = coils.combine_slice(
    kspace_CHW, header, crop=CROP, norm="none", map_options={"calib_width": 16, "kernel_width": 4}
  )
  assert out.maps.shape == (5, *CROP)
