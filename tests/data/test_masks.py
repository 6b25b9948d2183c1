"""Tests of `nextaccel_jax.data.masks`: nested undersampling masks (fastmri_spec.md §3.2–3.4)."""

import math
import timeit
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from skimage.data import shepp_logan_phantom
from skimage.filters import gaussian
from skimage.metrics import peak_signal_noise_ratio
from skimage.transform import resize

from nextaccel_jax.data import masks, transforms

ACCELS = transforms.ACCELERATIONS
SHAPES = [(64, 64), (256, 256), (320, 320), (320, 256)]


def _stack(masks_by_r, accels=ACCELS):
  return np.stack([masks_by_r[r] for r in accels])


def test_family_names_ids_and_aliases():
  assert masks.FAMILIES == ("cartesian_y", "cartesian_x", "gaussian_2d", "radial")
  assert [masks.family_id(f) for f in masks.FAMILIES] == [0, 1, 2, 3]
  assert masks.canonical_family("cartesian_pe") == "cartesian_y"
  assert masks.canonical_family("cartesian_ro") == "cartesian_x"
  assert masks.family_id("cartesian_ro") == 1
  with pytest.raises(ValueError, match="cartesian_y, cartesian_x, gaussian_2d, radial"):
    masks.canonical_family("spiral")
  with pytest.raises(ValueError, match="family must be one of"):
    masks.family_id(3)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("family", masks.FAMILIES)
def test_exact_counts_strict_nesting_and_dc(family, shape, train):
  height, width = shape
  out = masks.nested_masks(family, shape, seed=11, train=train)
  assert list(out) == list(ACCELS)
  for r, mask in out.items():
    assert mask.dtype == np.bool_ and mask.shape == shape
    assert np.count_nonzero(mask) == height * width // r
    assert mask[height // 2, width // 2]
  for coarse, fine in zip(ACCELS, ACCELS[1:], strict=False):
    assert np.all(out[fine][out[coarse]]), f"M_{coarse} is not inside M_{fine}"
    assert np.count_nonzero(out[fine]) > np.count_nonzero(out[coarse])
  if family.startswith("cartesian"):
    line_axis = 0 if family == "cartesian_y" else 1  # the axis each sampled line runs along
    lines = {r: m.any(axis=line_axis) for r, m in out.items()}
    for r, mask in out.items():
      np.testing.assert_array_equal(mask.all(axis=line_axis), lines[r])
      num_lines = (width if family == "cartesian_y" else height) // r
      assert np.count_nonzero(lines[r]) == num_lines
      assert lines[r][(width if family == "cartesian_y" else height) // 2]  # the DC line


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("shape", [(256, 256), (320, 256), (64, 320)])
def test_cartesian_x_is_transposed_cartesian_y(shape, train):
  height, width = shape
  opts = dict(seed=5, train=train, center_fraction_times_r=0.24)
  cart_x = masks.nested_masks("cartesian_x", (height, width), **opts)
  cart_y = masks.nested_masks("cartesian_y", (width, height), **opts)
  for r in ACCELS:
    np.testing.assert_array_equal(cart_x[r], cart_y[r].T)
  if height == width:
    cart_y_same = masks.nested_masks("cartesian_pe", shape, **opts)
    for r in ACCELS:
      np.testing.assert_array_equal(cart_x[r], cart_y_same[r].T)


def test_cartesian_eval_lines_follow_the_spec_example():
  out = masks.nested_masks("cartesian_y", (256, 256))
  cols = {r: set(np.flatnonzero(out[r][0]).tolist()) for r in ACCELS}
  assert cols[32] == {0, 32, 64, 127, 128, 129, 160, 192}
  assert cols[16] - cols[32] == {16, 80, 96, 126, 130, 144, 208, 224}
  # Centre widths max(1, round(256 * 0.32 / R)) starting at fastMRI's pad (256 - c + 1) // 2.
  for r, width in {32: 3, 16: 5, 8: 10, 4: 20, 2: 41}.items():
    pad = (256 - width + 1) // 2
    assert set(range(pad, pad + width)) <= cols[r]


def test_cartesian_without_centre_block_is_a_dc_aligned_lattice():
  # With a one-line centre every power-of-two prefix of the van der Corput order is the lattice
  # 0::R, which passes through DC (spec §3.3a).
  out = masks.nested_masks("cartesian_y", (64, 256), center_fraction_times_r=0.0)
  for r in ACCELS:
    np.testing.assert_array_equal(np.flatnonzero(out[r][0]), np.arange(0, 256, r))


def test_cartesian_train_varies_the_lattice_and_keeps_the_centre():
  rng = np.random.default_rng(0)
  draws = [masks.nested_masks("cartesian_x", (256, 256), rng, train=True) for _ in range(32)]
  coarse_rows = {tuple(np.flatnonzero(d[32][:, 0])) for d in draws}
  assert len(coarse_rows) > 16
  # The DC-centred block is kept whatever the offset: rows 127..129 at R = 32.
  for d in draws:
    assert d[32][127:130].all()


def test_cartesian_eval_does_not_depend_on_seed():
  a = masks.nested_masks("cartesian_y", seed=1)
  b = masks.nested_masks("cartesian_y", seed=None)
  for r in ACCELS:
    np.testing.assert_array_equal(a[r], b[r])


@pytest.mark.parametrize("family", masks.FAMILIES)
def test_deterministic_for_every_seed_kind(family):
  def draw(seed):
    return _stack(masks.nested_masks(family, (128, 96), seed, train=True))

  np.testing.assert_array_equal(draw(3), draw(3))
  name = "file_brain_AXT2_200_2000019.h5"
  np.testing.assert_array_equal(
    draw(masks.eval_seed(name, family)), draw(masks.eval_seed(name, family))
  )
  np.testing.assert_array_equal(draw(np.random.default_rng(9)), draw(np.random.default_rng(9)))
  # A Generator advances, so the next draw from the same generator is a new mask.
  gen = np.random.default_rng(9)
  assert not np.array_equal(draw(gen), draw(gen))


@pytest.mark.parametrize("family", ["gaussian_2d", "radial"])
@pytest.mark.parametrize("train", [False, True])
def test_fresh_draws_without_seed(family, train):
  a = masks.nested_masks(family, train=train)
  b = masks.nested_masks(family, train=train)
  assert not np.array_equal(_stack(a), _stack(b))


@pytest.mark.parametrize("family", ["cartesian_y", "cartesian_x"])
def test_cartesian_train_fresh_draws_without_seed(family):
  draws = {_stack(masks.nested_masks(family, train=True)).tobytes() for _ in range(8)}
  assert len(draws) > 1


def test_eval_seed_is_crc32_of_the_file_name_and_family_id():
  name = "file_brain_AXFLAIR_210_6001505.h5"
  seq = masks.eval_seed(name, "gaussian_2d")
  assert isinstance(seq, np.random.SeedSequence)
  assert seq.entropy == [zlib.crc32(name.encode()), 2]
  assert masks.eval_seed(f"/data/brain/val/{name}", "gaussian_2d").entropy == seq.entropy
  assert masks.eval_seed(name, "cartesian_pe").entropy == [zlib.crc32(name.encode()), 0]
  a = masks.nested_masks("radial", seed=masks.eval_seed(name, "radial"))
  b = masks.nested_masks("radial", seed=masks.eval_seed("file_brain_AXT1_201_6002836.h5", "radial"))
  assert not np.array_equal(_stack(a), _stack(b))
  with pytest.raises(ValueError, match="file_name"):
    masks.eval_seed(17, "radial")
  with pytest.raises(ValueError, match="family must be one of"):
    masks.eval_seed(name, "poisson")


def test_gaussian_calibration_disc_comes_first_and_density_is_centred():
  out = masks.nested_masks("gaussian_2d", (256, 256), seed=2)
  dy, dx = np.ogrid[-128:128, -128:128]
  disc = dy**2 + dx**2 <= 16
  assert np.count_nonzero(disc) == 49
  assert out[32][disc].all()
  centre = np.hypot(dy, dx) < 32
  assert out[32][centre].mean() > 10 * out[32][~centre].mean()
  only_dc = masks.nested_masks("gaussian_2d", (64, 64), seed=2, calib_radius=0)
  assert only_dc[32][32, 32]


class _ConstantExponential(np.random.Generator):
  """Gumbel noise of exactly 0, so the keys are the symmetric log-density with many exact ties."""

  def standard_exponential(self, size=None, dtype=np.float64, method="zig", out=None):
    return np.ones(size, dtype)


def test_gaussian_ties_go_to_the_smaller_flat_index():
  shape = (64, 64)
  out = masks.nested_masks("gaussian_2d", shape, _ConstantExponential(np.random.PCG64(0)))
  dy, dx = np.ogrid[-32:32, -32:32]
  keys = -((dy / 8.0) ** 2 + (dx / 8.0) ** 2).astype(np.float32) / 2
  keys[dy**2 + dx**2 <= 16] = np.inf
  order = np.argsort(-keys.ravel(), kind="stable")
  for r in ACCELS:
    expected = np.zeros(64 * 64, bool)
    expected[order[: 64 * 64 // r]] = True
    np.testing.assert_array_equal(out[r].ravel(), expected)


def test_radial_spokes_and_random_points_match_the_spec_at_theta0_zero():
  counts = [256 * 256 // r for r in ACCELS]
  for seed in range(2):
    _, stats = masks._radial_levels((256, 256), counts, np.random.default_rng(seed), 0.0)
    assert stats["spokes"] == [6, 12, 25, 53, 120]
    assert stats["random_points"] == [220, 311, 413, 558, 478]


def test_radial_first_spoke_is_the_dc_row_at_theta0_zero():
  out = masks.nested_masks("radial", (64, 64), seed=0, theta0=0.0)
  assert out[32][32].all()


def test_radial_rasterises_more_spokes_when_the_first_estimate_is_short(monkeypatch):
  reference = _stack(masks.nested_masks("radial", (128, 128), seed=4))
  monkeypatch.setattr(masks, "_initial_spoke_count", lambda shape, count: 1)
  np.testing.assert_array_equal(_stack(masks.nested_masks("radial", (128, 128), seed=4)), reference)


def test_radial_keeps_dc_when_no_spoke_fits_the_coarsest_budget():
  # 64 points at R = 64 cannot hold a diagonal spoke of ~90 pixels on a 64² grid.
  out = masks.nested_masks("radial", (64, 64), seed=1, accelerations=(64, 32), theta0=math.pi / 4)
  assert out[64][32, 32]
  assert np.count_nonzero(out[64]) == 64 and np.count_nonzero(out[32]) == 128
  assert np.all(out[32][out[64]])


def test_custom_accelerations():
  out = masks.nested_masks("gaussian_2d", (96, 64), seed=0, accelerations=(12, 6, 3))
  assert {r: np.count_nonzero(m) for r, m in out.items()} == {12: 512, 6: 1024, 3: 2048}
  out = masks.nested_masks("cartesian_x", (96, 64), accelerations=(8, 3))
  assert np.count_nonzero(out[8].all(axis=1)) == 12 and np.count_nonzero(out[3].all(axis=1)) == 32


@pytest.mark.parametrize(
  ("kwargs", "match"),
  [
    (dict(family="poisson"), "family must be one of"),
    (dict(accelerations=(32, 16, 1)), "integers > 1"),
    (dict(accelerations=(16, 32)), "strictly decreasing"),
    (dict(accelerations=(8, 8)), "strictly decreasing"),
    (dict(accelerations=(8, 2.5)), "integers > 1"),
    (dict(accelerations=()), "at least one"),
    (dict(accelerations=(12, 6)), "W/R must be an integer"),
    (dict(family="gaussian_2d", accelerations=(3,)), "H\\*W/R must be an integer"),
    (dict(shape=(255, 256)), "even sizes >= 64"),
    (dict(shape=(32, 32)), "even sizes >= 64"),
    (dict(shape=(256,)), "pair of integers"),
    (dict(seed="abc"), "seed must be None"),
    (dict(sigma=0.1), "valid options are"),
    (dict(sigma_frac=0.0), "sigma_frac"),
    (dict(center_fraction_times_r=1.5), "center_fraction_times_r"),
    (dict(calib_radius=-1), "calib_radius"),
    (dict(theta0="north"), "theta0"),
    (dict(theta0=math.inf), "theta0"),
    (dict(family="gaussian_2d", shape=(64, 64), calib_radius=10), "calibration disc"),
  ],
)
def test_bad_input_raises_value_error(kwargs, match):
  kwargs = {"family": "cartesian_y", **kwargs}
  with pytest.raises(ValueError, match=match):
    masks.nested_masks(**kwargs)


@pytest.mark.parametrize("family", masks.FAMILIES)
def test_level_map_round_trip(family):
  out = masks.nested_masks(family, (128, 128), seed=8, train=True)
  level_HW = masks.level_map(out)
  assert level_HW.dtype == np.uint8 and level_HW.shape == (128, 128)
  assert set(np.unique(level_HW).tolist()) <= {0, 1, 2, 3, 4, masks.NEVER}
  assert np.all((level_HW == 0) == out[32])
  assert np.all((level_HW == masks.NEVER) == ~out[2])
  back_LHW = masks.masks_from_level_map(level_HW)
  assert isinstance(back_LHW, np.ndarray) and back_LHW.dtype == np.bool_
  np.testing.assert_array_equal(back_LHW, _stack(out))


def test_masks_from_level_map_on_jax_arrays_and_batches():
  level_HW = masks.level_map(masks.nested_masks("radial", (64, 64), seed=0))
  expected_LHW = masks.masks_from_level_map(level_HW)
  fn = jax.jit(masks.masks_from_level_map, static_argnums=1)
  got_LHW = fn(jnp.asarray(level_HW), 5)
  assert isinstance(got_LHW, jax.Array) and got_LHW.dtype == jnp.bool_
  np.testing.assert_array_equal(np.asarray(got_LHW), expected_LHW)
  batch_BLHW = masks.masks_from_level_map(jnp.stack([level_HW, level_HW]))
  assert batch_BLHW.shape == (2, 5, 64, 64)
  np.testing.assert_array_equal(masks.masks_from_level_map(level_HW, 2), expected_LHW[:2])


def test_level_map_and_expansion_reject_bad_input():
  out = masks.nested_masks("gaussian_2d", (64, 64), seed=0)
  with pytest.raises(ValueError, match="lacks the levels"):
    masks.level_map({r: out[r] for r in (32, 16)})
  with pytest.raises(ValueError, match="must nest"):
    masks.level_map({**out, 32: out[32] | ~out[16]})
  with pytest.raises(ValueError, match="one shape"):
    masks.level_map({**out, 2: np.ones((64, 32), bool)})
  with pytest.raises(ValueError, match="num_levels"):
    masks.masks_from_level_map(np.zeros((4, 4), np.uint8), 0)
  with pytest.raises(ValueError, match="at least 2 dims"):
    masks.masks_from_level_map(np.zeros(4, np.uint8))


@pytest.fixture(scope="module")
def smooth_phantom():
  image = resize(shepp_logan_phantom(), (256, 256), anti_aliasing=True)
  return gaussian(image, sigma=1.0).astype(np.float32)


@pytest.mark.parametrize("family", masks.FAMILIES)
def test_zero_filled_psnr_rises_from_r32_to_r2(family, smooth_phantom):
  out = masks.nested_masks(family, (256, 256), seed=0)
  levels = transforms.undersample_levels_np(smooth_phantom, None, _stack(out))
  magnitude = np.hypot(levels[..., 0], levels[..., 1])
  target = smooth_phantom / smooth_phantom.max()
  psnr = [
    peak_signal_noise_ratio(target, m / m.max(), data_range=1.0) for m in magnitude[: len(ACCELS)]
  ]
  assert np.all(np.diff(psnr) > 0.5), psnr


@pytest.mark.parametrize("family", masks.FAMILIES)
def test_training_draws_are_fast(family):
  # Loose bound (the target is < 3 ms at 256² on an idle core); it catches per-pixel Python loops.
  rng = np.random.default_rng(0)
  masks.nested_masks(family, seed=rng, train=True)
  seconds = timeit.timeit(lambda: masks.nested_masks(family, seed=rng, train=True), number=20) / 20
  assert seconds < 0.03
