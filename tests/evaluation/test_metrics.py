"""Tests for nextaccel_jax.evaluation.metrics against scikit-image (fastmri_spec.md §2.2, §2.3).

The references below call scikit-image the way the two protocols do: the author's MambaRecon code
for `paper` and fastMRI's evaluate.py for `fastmri`.
"""

import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from nextaccel_jax.evaluation import metrics

TOL = 1e-6
METRIC_FNS = {"psnr": metrics.psnr, "ssim": metrics.ssim, "nmse": metrics.nmse}


def _phantom_volume(rng, slices, h, w, scale=3e-4):
  """Smooth ellipses under a bias field, with Rician noise, at fastMRI's tiny absolute scale."""
  yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
  vol = []
  for s in range(slices):
    head = 0.5 * (1 + np.tanh(40 * (0.85 - np.hypot(xx / 0.75, yy / 0.9))))
    ventricle = 0.5 * (1 + np.tanh(30 * (0.2 - np.hypot((xx - 0.1 * s) / 0.5, yy / 0.8))))
    bias = 1 + 0.3 * np.cos(2 * xx + s) * np.sin(1.5 * yy)
    clean = bias * (head - 0.6 * ventricle)
    noise = 0.03 * (rng.normal(size=(h, w)) + 1j * rng.normal(size=(h, w)))
    vol.append(np.abs(clean + noise))
  return scale * np.stack(vol)


def _pair(kind, slices=3, h=48, w=56, seed=0):
  """A target volume and a degraded prediction with its own intensity scale."""
  rng = np.random.default_rng(seed)
  if kind == "random":
    gt = rng.random((slices, h, w))
  else:
    gt = _phantom_volume(rng, slices, h, w)
  pred = 1.3 * np.abs(gt + 0.15 * gt.max() * rng.normal(size=gt.shape))
  return gt, pred


def _ref_paper(gt_hw, pred_hw):
  """One slice as the author's code scores it, in float64."""
  gt_n = gt_hw / gt_hw.max()
  pred_n = pred_hw / pred_hw.max()
  psnr = peak_signal_noise_ratio(gt_n, pred_n, data_range=1.0)
  ssim = structural_similarity(
    gt_n, pred_n, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
  )
  nmse = np.sum((gt_n - pred_n) ** 2) / np.sum(gt_n**2)
  return psnr, ssim, nmse


def _ref_fastmri(gt_shw, pred_shw):
  """A volume as fastMRI's evaluate.py scores it."""
  peak = gt_shw.max()
  psnr = peak_signal_noise_ratio(gt_shw, pred_shw, data_range=peak)
  ssim = np.mean(
    [structural_similarity(g, p, data_range=peak) for g, p in zip(gt_shw, pred_shw, strict=True)]
  )
  nmse = np.linalg.norm(gt_shw - pred_shw) ** 2 / np.linalg.norm(gt_shw) ** 2
  return psnr, ssim, nmse


@pytest.mark.parametrize("kind", ["random", "phantom"])
def test_paper_slice_matches_skimage(kind):
  gt, pred = _pair(kind, slices=1)
  for name, ref in zip(("psnr", "ssim", "nmse"), _ref_paper(gt[0], pred[0]), strict=True):
    value = METRIC_FNS[name](gt[0], pred[0], "paper")
    assert isinstance(value, float)
    assert value == pytest.approx(ref, abs=TOL), name


@pytest.mark.parametrize("kind", ["random", "phantom"])
def test_paper_volume_matches_skimage_per_slice(kind):
  gt, pred = _pair(kind, slices=4)
  refs = np.array([_ref_paper(g, p) for g, p in zip(gt, pred, strict=True)])
  for col, name in enumerate(("psnr", "ssim", "nmse")):
    values = METRIC_FNS[name](gt, pred)
    assert isinstance(values, np.ndarray) and values.shape == (4,)
    np.testing.assert_allclose(values, refs[:, col], rtol=0, atol=TOL, err_msg=name)


@pytest.mark.parametrize("kind", ["random", "phantom"])
def test_fastmri_volume_matches_skimage(kind):
  gt, pred = _pair(kind, slices=4)
  for name, ref in zip(("psnr", "ssim", "nmse"), _ref_fastmri(gt, pred), strict=True):
    value = METRIC_FNS[name](gt, pred, "fastmri")
    assert isinstance(value, float)
    assert value == pytest.approx(ref, abs=TOL), name


@pytest.mark.parametrize("kind", ["random", "phantom"])
def test_fastmri_slice_is_a_one_slice_volume(kind):
  gt, pred = _pair(kind, slices=1)
  for name, ref in zip(("psnr", "ssim", "nmse"), _ref_fastmri(gt, pred), strict=True):
    value = METRIC_FNS[name](gt[0], pred[0], "fastmri")
    assert isinstance(value, float)
    assert value == pytest.approx(ref, abs=TOL), name


def test_fastmri_uses_the_volume_maximum_for_every_slice():
  gt, pred = _pair("phantom", slices=2)
  gt[1] *= 0.25
  pred[1] *= 0.25
  per_slice_range = np.mean(
    [structural_similarity(g, p, data_range=g.max()) for g, p in zip(gt, pred, strict=True)]
  )
  value = metrics.ssim(gt, pred, "fastmri")
  assert value == pytest.approx(_ref_fastmri(gt, pred)[1], abs=TOL)
  assert abs(value - per_slice_range) > 1e-4


@pytest.mark.parametrize("protocol", metrics.PROTOCOLS)
def test_full_size_slices_match_skimage(protocol):
  gt, pred = _pair("phantom", slices=2, h=256, w=256, seed=3)
  result = metrics.evaluate_slices(gt, pred, protocol)
  if protocol == "paper":
    refs = np.array([_ref_paper(g, p) for g, p in zip(gt, pred, strict=True)]).T
  else:
    refs = _ref_fastmri(gt, pred)
  for name, ref in zip(("psnr", "ssim", "nmse"), refs, strict=True):
    np.testing.assert_allclose(result[name], ref, rtol=0, atol=TOL, err_msg=name)


@pytest.mark.parametrize("protocol", metrics.PROTOCOLS)
def test_evaluate_slices_agrees_with_single_metrics(protocol):
  gt, pred = _pair("phantom", slices=3)
  result = metrics.evaluate_slices(gt, pred, protocol)
  assert set(result) == {"psnr", "ssim", "nmse"}
  for name, fn in METRIC_FNS.items():
    expected = fn(gt, pred, protocol)
    if protocol == "paper":
      assert result[name].shape == (3,)
      np.testing.assert_array_equal(result[name], expected)
    else:
      assert isinstance(result[name], float) and result[name] == expected


def test_evaluate_slices_keeps_arrays_for_a_paper_slice():
  gt, pred = _pair("random", slices=1)
  result = metrics.evaluate_slices(gt[0], pred[0], "paper")
  for name, fn in METRIC_FNS.items():
    assert result[name].shape == (1,)
    assert result[name][0] == fn(gt[0], pred[0])


def test_float32_input_is_scored_in_float64():
  gt, pred = _pair("phantom", slices=2)
  gt32, pred32 = gt.astype(np.float32), pred.astype(np.float32)
  gt_up, pred_up = gt32.astype(np.float64), pred32.astype(np.float64)
  for protocol in metrics.PROTOCOLS:
    for name, fn in METRIC_FNS.items():
      np.testing.assert_array_equal(fn(gt32, pred32, protocol), fn(gt_up, pred_up, protocol), name)


def test_close_to_the_authors_float32_pipeline():
  # The author's code casts to float32 and normalises in place before calling scikit-image, which
  # then computes in float32; the gap to float64 is rounding only.
  gt, pred = _pair("phantom", slices=2, h=96, w=96)
  for g, p, ours_psnr, ours_ssim in zip(
    gt, pred, metrics.psnr(gt, pred), metrics.ssim(gt, pred), strict=True
  ):
    g32 = g.astype(np.float32)
    g32 /= g32.max()
    p32 = p.astype(np.float32)
    p32 /= p32.max()
    ref_psnr = peak_signal_noise_ratio(g32, p32, data_range=1.0)
    ref_ssim = structural_similarity(
      g32, p32, sigma=1.5, gaussian_weights=True, use_sample_covariance=False, data_range=1.0
    )
    assert ours_psnr == pytest.approx(ref_psnr, abs=1e-4)
    assert ours_ssim == pytest.approx(ref_ssim, abs=1e-5)


def test_integer_and_jax_inputs():
  gt, pred = _pair("random", slices=2)
  gt_u16, pred_u16 = (gt * 4000).astype(np.uint16), (pred * 4000).astype(np.uint16)
  for protocol in metrics.PROTOCOLS:
    as_float = metrics.evaluate_slices(
      gt_u16.astype(np.float64), pred_u16.astype(np.float64), protocol
    )
    as_int = metrics.evaluate_slices(gt_u16, pred_u16, protocol)
    as_jax = metrics.evaluate_slices(jnp.asarray(gt_u16), jnp.asarray(pred_u16), protocol)
    for name in as_float:
      np.testing.assert_array_equal(as_int[name], as_float[name])
      np.testing.assert_allclose(as_jax[name], as_float[name], rtol=0, atol=TOL)


@pytest.mark.parametrize("protocol", metrics.PROTOCOLS)
def test_identical_images(protocol):
  gt, _ = _pair("phantom", slices=2)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    result = metrics.evaluate_slices(gt, gt.copy(), protocol)
  np.testing.assert_array_equal(result["psnr"], np.inf)
  np.testing.assert_allclose(result["ssim"], 1.0, rtol=0, atol=1e-12)
  np.testing.assert_array_equal(result["nmse"], 0.0)


def test_paper_ignores_a_global_scale_error_fastmri_does_not():
  gt, pred = _pair("phantom", slices=2)
  for name, fn in METRIC_FNS.items():
    np.testing.assert_allclose(fn(gt, 5 * pred), fn(gt, pred), rtol=1e-12, err_msg=name)
    assert fn(gt, 5 * pred, "fastmri") != pytest.approx(fn(gt, pred, "fastmri"), rel=1e-3), name


def test_paper_guards_all_zero_slices():
  gt, pred = _pair("random", slices=3)
  gt[0] = 0.0
  pred[0] = 0.0
  gt[1] = 0.0
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    result = metrics.evaluate_slices(gt, pred, "paper")
  assert result["psnr"][0] == np.inf and result["ssim"][0] == 1.0 and result["nmse"][0] == 0.0
  # A zero target against a real prediction: scored as is, with no target rescaling.
  zero_vs_pred = structural_similarity(
    gt[1],
    pred[1] / pred[1].max(),
    data_range=1.0,
    gaussian_weights=True,
    sigma=1.5,
    use_sample_covariance=False,
  )
  assert result["ssim"][1] == pytest.approx(zero_vs_pred, abs=TOL)
  assert result["psnr"][1] == pytest.approx(
    peak_signal_noise_ratio(gt[1], pred[1] / pred[1].max(), data_range=1.0), abs=TOL
  )
  assert result["nmse"][1] == np.inf
  np.testing.assert_allclose(result["ssim"][2], _ref_paper(gt[2], pred[2])[1], rtol=0, atol=TOL)


ALL_FNS = [metrics.psnr, metrics.ssim, metrics.nmse, metrics.evaluate_slices]


@pytest.mark.parametrize("fn", ALL_FNS, ids=lambda f: f.__name__)
def test_rejects_shape_mismatch(fn):
  with pytest.raises(ValueError, match=r"pred has shape \(2, 32, 32\) but gt has shape"):
    fn(np.ones((3, 32, 32)), np.ones((2, 32, 32)))


@pytest.mark.parametrize("fn", ALL_FNS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("shape", [(32,), (1, 2, 32, 32)])
def test_rejects_rank_1_and_4(fn, shape):
  with pytest.raises(
    ValueError, match=rf"gt must be \[H, W\] or \[S, H, W\], got rank {len(shape)}"
  ):
    fn(np.ones(shape), np.ones(shape))


@pytest.mark.parametrize("fn", ALL_FNS, ids=lambda f: f.__name__)
def test_rejects_unknown_protocol(fn):
  with pytest.raises(
    ValueError, match=r"protocol must be one of \('paper', 'fastmri'\), got 'ssim'"
  ):
    fn(np.ones((32, 32)), np.ones((32, 32)), "ssim")


@pytest.mark.parametrize("fn", ALL_FNS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("which", ["gt", "pred"])
def test_rejects_complex_input(fn, which):
  images = {"gt": np.ones((32, 32)), "pred": np.ones((32, 32))}
  images[which] = images[which] * (1 + 1j)
  with pytest.raises(ValueError, match=rf"{which} is complex.*magnitude.*np\.abs\({which}\)"):
    fn(images["gt"], images["pred"])


@pytest.mark.parametrize("fn", ALL_FNS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_rejects_non_finite_values(fn, bad):
  pred = np.ones((2, 32, 32))
  pred[1, 3, 4] = bad
  with pytest.raises(ValueError, match="pred contains non-finite values"):
    fn(np.ones((2, 32, 32)), pred)


def test_huge_finite_values_pass_validation():
  # Their sum overflows, so validation has to look at the entries themselves.
  gt = np.full((16, 16), 1e308)
  gt[0, 0] = 5e307
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert metrics.ssim(gt, gt) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("fn", ALL_FNS, ids=lambda f: f.__name__)
def test_rejects_non_numeric_input(fn):
  with pytest.raises(ValueError, match="gt must hold real numbers"):
    fn(np.full((16, 16), "a"), np.ones((16, 16)))


@pytest.mark.parametrize("protocol, size", [("paper", 10), ("fastmri", 6)])
def test_ssim_rejects_images_smaller_than_the_window(protocol, size):
  gt, pred = _pair("random", slices=1, h=size, w=32)
  for fn in (metrics.ssim, metrics.evaluate_slices):
    with pytest.raises(ValueError, match=r"gt has image size \(\d+, 32\), smaller than the"):
      fn(gt[0], pred[0], protocol)
  # PSNR and NMSE have no window.
  g, p = gt[0], pred[0]
  if protocol == "paper":
    g, p = g / g.max(), p / p.max()
  ref_psnr = peak_signal_noise_ratio(g, p, data_range=1.0 if protocol == "paper" else g.max())
  assert metrics.psnr(gt[0], pred[0], protocol) == pytest.approx(ref_psnr, abs=TOL)
  ref_nmse = np.sum((g - p) ** 2) / np.sum(g**2)
  assert metrics.nmse(gt[0], pred[0], protocol) == pytest.approx(ref_nmse, abs=TOL)


def test_rejects_empty_volume():
  with pytest.raises(ValueError, match="no slices"):
    metrics.psnr(np.ones((0, 32, 32)), np.ones((0, 32, 32)))


@pytest.mark.parametrize("fn", ALL_FNS, ids=lambda f: f.__name__)
def test_fastmri_rejects_an_all_zero_target(fn):
  with pytest.raises(ValueError, match="gt has maximum 0.0; the fastmri protocol"):
    fn(np.zeros((2, 16, 16)), np.ones((2, 16, 16)), "fastmri")


def test_summarize():
  mean, std = metrics.summarize([1.0, 2.0, 3.0, 4.0])
  assert (mean, std) == (2.5, pytest.approx(np.sqrt(1.25)))
  assert metrics.summarize(np.array([[0.5], [0.5]])) == (0.5, 0.0)
  assert metrics.summarize(7) == (7.0, 0.0)
  per_slice = metrics.psnr(*_pair("random", slices=3))
  assert metrics.summarize(per_slice) == (
    pytest.approx(per_slice.mean()),
    pytest.approx(per_slice.std()),
  )


@pytest.mark.parametrize(
  "values, message",
  [
    ([], "values is empty"),
    ([1.0, np.inf], "non-finite"),
    ([1.0, np.nan], "non-finite"),
    ([1 + 2j], "real numbers"),
    (["a"], "real numbers"),
  ],
)
def test_summarize_rejects_bad_values(values, message):
  with pytest.raises(ValueError, match=message):
    metrics.summarize(values)
