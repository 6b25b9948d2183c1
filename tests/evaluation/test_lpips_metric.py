"""Tests for nextaccel_jax.evaluation.lpips_metric and its use in evaluators.score_slices."""

import jax
import numpy as np
import pytest

from nextaccel_jax.evaluation import evaluators, lpips_metric, metrics
from nextaccel_jax.models import lpips as lpips_model

SIZE = 40


def _volume(seed=0, slices=3, size=SIZE, scale=3e-4):
  """A smooth magnitude volume with zero background and a noisy, rescaled prediction."""
  rng = np.random.default_rng(seed)
  yy, xx = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
  head = np.hypot(xx / 0.75, yy / 0.9) < 0.85
  gt = np.stack([head * (1 + 0.3 * np.cos(2 * xx + s) * np.sin(1.5 * yy)) for s in range(slices)])
  gt = scale * gt
  pred = 1.3 * np.abs(gt + 0.1 * scale * rng.normal(size=gt.shape))
  return gt, pred


_DISTANCE = jax.jit(lpips_model.lpips_distance, static_argnames=("net", "scaling", "precision"))


def _module_lpips(gt_peak, pred_peak, gt, pred, net="alex"):
  """LPIPS straight from the model on images divided by the given peaks."""
  dist = _DISTANCE(
    (pred / pred_peak).astype(np.float32),
    (gt / gt_peak).astype(np.float32),
    lpips_model.load_pretrained(net),
    net=net,
    scaling="none",
    precision=jax.lax.Precision.HIGHEST,
  )
  return np.asarray(dist)


def test_paper_equals_the_module_on_max_normalised_images():
  gt, pred = _volume()
  values = lpips_metric.lpips(gt, pred)
  assert values.shape == (3,) and values.dtype == np.float64
  g_peak = gt.max(axis=(1, 2), keepdims=True)
  p_peak = pred.max(axis=(1, 2), keepdims=True)
  np.testing.assert_allclose(values, _module_lpips(g_peak, p_peak, gt, pred), rtol=1e-6)
  assert (values > 0).all()


def test_fastmri_uses_the_target_volume_maximum():
  gt, pred = _volume()
  values = lpips_metric.lpips(gt, pred, "fastmri")
  np.testing.assert_allclose(values, _module_lpips(gt.max(), gt.max(), gt, pred), rtol=1e-6)


def test_paper_ignores_prediction_scale_fastmri_does_not():
  gt, pred = _volume()
  np.testing.assert_allclose(lpips_metric.lpips(gt, 4 * pred), lpips_metric.lpips(gt, pred), 1e-5)
  fast = lpips_metric.lpips(gt, pred, "fastmri")
  assert (np.abs(lpips_metric.lpips(gt, 0.5 * pred, "fastmri") - fast) > 1e-3).all()


def test_batching_does_not_change_values():
  gt, pred = _volume()
  full = lpips_metric.lpips(gt, pred, batch_size=8)
  np.testing.assert_allclose(lpips_metric.lpips(gt, pred, batch_size=2), full, rtol=1e-6)
  single = lpips_metric.lpips(gt[1], pred[1])
  assert single.shape == (1,)
  np.testing.assert_allclose(single, full[1:2], rtol=1e-6)


def test_identical_images_score_zero():
  gt, _ = _volume()
  np.testing.assert_allclose(lpips_metric.lpips(gt, gt.copy()), 0.0, atol=1e-7)


def test_vgg():
  gt, pred = _volume(slices=2, size=32)
  values = lpips_metric.lpips(gt, pred, net="vgg")
  g_peak = gt.max(axis=(1, 2), keepdims=True)
  p_peak = pred.max(axis=(1, 2), keepdims=True)
  np.testing.assert_allclose(values, _module_lpips(g_peak, p_peak, gt, pred, "vgg"), rtol=1e-6)


def test_rejects_bad_arguments():
  gt, pred = _volume(slices=1)
  with pytest.raises(ValueError, match="net must be one of"):
    lpips_metric.lpips(gt, pred, net="squeeze")
  with pytest.raises(ValueError, match="batch_size must be positive"):
    lpips_metric.lpips(gt, pred, batch_size=0)
  with pytest.raises(ValueError, match=r"LPIPS-alex needs at least 31×31 pixels"):
    lpips_metric.lpips(gt[:, :30], pred[:, :30])
  with pytest.raises(ValueError, match="pred is complex"):
    lpips_metric.lpips(gt, pred * 1j)
  with pytest.raises(ValueError, match="protocol must be one of"):
    lpips_metric.lpips(gt, pred, "ssim")


def test_score_slices_without_lpips_is_evaluate_slices():
  gt, pred = _volume()
  assert set(metrics.evaluate_slices(gt, pred)) == {"psnr", "ssim", "nmse"}
  assert set(evaluators.score_slices(gt, pred, "fastmri", lpips=False)) == {"psnr", "ssim", "nmse"}
  for name, value in evaluators.score_slices(gt, pred).items():
    np.testing.assert_array_equal(value, metrics.evaluate_slices(gt, pred)[name])


def test_score_slices_with_lpips():
  gt, pred = _volume(slices=2, size=32)
  plain = metrics.evaluate_slices(gt, pred)
  result = evaluators.score_slices(gt, pred, lpips=True)
  assert set(result) == {"psnr", "ssim", "nmse", "lpips_alex"}
  for name in plain:
    np.testing.assert_array_equal(result[name], plain[name])
  np.testing.assert_array_equal(result["lpips_alex"], lpips_metric.lpips(gt, pred))

  both = evaluators.score_slices(gt, pred, "paper", lpips=("alex", "vgg"))
  assert both["lpips_vgg"].shape == (2,)
  np.testing.assert_array_equal(both["lpips_vgg"], lpips_metric.lpips(gt, pred, net="vgg"))

  fast = evaluators.score_slices(gt, pred, "fastmri", lpips="alex")
  assert isinstance(fast["lpips_alex"], float)
  assert fast["lpips_alex"] == pytest.approx(lpips_metric.lpips(gt, pred, "fastmri").mean())

  with pytest.raises(ValueError, match=r"lpips nets must be among .*got \['squeeze'\]"):
    evaluators.score_slices(gt, pred, lpips=("alex", "squeeze"))
