"""Tests for nextaccel_jax.losses: SSIM parity with scikit-image and the evaluation metrics, and
gradients that stay finite where the naive formulas break."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from nextaccel_jax import losses
from nextaccel_jax.evaluation import metrics

TOL = 1e-5


def _pair(seed=0, b=3, h=40, w=48, scale=3e-4):
  """A smooth target at MRI's tiny absolute scale and a noisy, rescaled prediction."""
  rng = np.random.default_rng(seed)
  yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
  gt = []
  for i in range(b):
    blob = np.exp(-((xx - 0.2 * i) ** 2 + yy**2) / 0.3)
    gt.append(blob + 0.05 * rng.random((h, w)))
  gt = scale * np.stack(gt)
  pred = np.abs(1.1 * gt + 0.05 * scale * rng.normal(size=gt.shape))
  return gt, pred


def test_ssim_matches_paper_protocol():
  gt, pred = _pair()
  ref = metrics.ssim(gt, pred, protocol="paper")
  gt_n = gt / gt.max(axis=(1, 2), keepdims=True)
  pred_n = pred / pred.max(axis=(1, 2), keepdims=True)
  out = losses.ssim(jnp.asarray(pred_n, jnp.float32), jnp.asarray(gt_n, jnp.float32), 1.0)
  assert out.dtype == jnp.float32 and out.shape == (3,)
  np.testing.assert_allclose(np.asarray(out), ref, atol=TOL, rtol=0)


def test_ssim_matches_skimage_uniform_window_with_per_sample_range():
  gt, pred = _pair(seed=1)
  data_range = gt.max(axis=(1, 2))
  ref = [
    structural_similarity(g, p, data_range=dr)
    for g, p, dr in zip(gt, pred, data_range, strict=True)
  ]
  out = losses.ssim(
    jnp.asarray(gt, jnp.float32), jnp.asarray(pred, jnp.float32), data_range, gaussian=False
  )
  np.testing.assert_allclose(np.asarray(out), ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("gaussian", [True, False])
def test_valid_map_equals_reflect_padded_map_after_crop(gaussian):
  """scikit-image pads with 'reflect' before filtering; after its crop, no padded pixel is left."""
  gt, pred = _pair(seed=2, b=1, h=30, w=26, scale=1.0)
  kw = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False) if gaussian else {}
  _, full_map = structural_similarity(gt[0], pred[0], data_range=1.0, full=True, **kw)
  crop = 5 if gaussian else 3
  ours = losses._ssim_map(jnp.asarray(gt), jnp.asarray(pred), 1.0, gaussian=gaussian)[0]
  np.testing.assert_allclose(np.asarray(ours), full_map[crop:-crop, crop:-crop], atol=TOL, rtol=0)
  # A different padding mode changes the border of the map but not the cropped part.
  size = 11 if gaussian else 7
  other = ndimage.uniform_filter(gt[0], size, mode="constant", cval=7.0)
  ref = ndimage.uniform_filter(gt[0], size, mode="reflect")
  assert not np.allclose(other, ref)
  np.testing.assert_allclose(
    other[crop:-crop, crop:-crop], ref[crop:-crop, crop:-crop], rtol=1e-12, atol=1e-12
  )


def test_uncropped_ssim_matches_skimage_full_map_mean():
  gt, pred = _pair(seed=3, b=1, h=24, w=20, scale=1.0)
  _, full_map = structural_similarity(gt[0], pred[0], data_range=1.0, full=True)
  out = losses.ssim(gt, pred, 1.0, gaussian=False, crop_border=False)
  np.testing.assert_allclose(float(out[0]), full_map.mean(), atol=TOL, rtol=0)


def test_ssim_rejects_bad_windows_and_ranges():
  x = jnp.zeros((2, 16, 16))
  with pytest.raises(ValueError, match="win_size"):
    losses.ssim(x, x, 1.0, gaussian=True, win_size=7)
  with pytest.raises(ValueError, match="odd"):
    losses.ssim(x, x, 1.0, gaussian=False, win_size=4)
  with pytest.raises(ValueError, match="data_range"):
    losses.ssim(x, x, jnp.ones(3))
  with pytest.raises(ValueError, match="smaller"):
    losses.ssim(jnp.zeros((1, 8, 8)), jnp.zeros((1, 8, 8)), 1.0)


def test_ssim_loss_zero_for_identical_images_and_sees_scale_errors():
  gt, _ = _pair(seed=4)
  gt = jnp.asarray(gt, jnp.float32)
  assert abs(float(losses.ssim_loss(gt, gt))) < 1e-6
  # The paper metric would score a uniformly scaled prediction as perfect; the loss must not.
  assert float(losses.ssim_loss(0.5 * gt, gt)) > 1e-3


def test_ssim_gradient_matches_finite_differences():
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.random((1, 9, 9)), jnp.float32)
  y = jnp.asarray(rng.random((1, 9, 9)), jnp.float32)
  direction = jnp.asarray(rng.normal(size=(1, 9, 9)), jnp.float32)

  @jax.jit
  def f(a):
    return losses.ssim(a, y, 1.0, gaussian=False).sum()

  analytic = float(jnp.vdot(jax.grad(f)(x), direction))
  eps = 3e-3
  numeric = float((f(x + eps * direction) - f(x - eps * direction)) / (2 * eps))
  np.testing.assert_allclose(analytic, numeric, rtol=2e-3)


def test_gradients_finite_at_all_zero_input():
  zeros = jnp.zeros((2, 12, 12), jnp.float32)
  g_ssim = jax.jit(jax.grad(lambda a: losses.ssim(a, zeros, 1.0).sum()))(zeros)
  g_loss = jax.jit(jax.grad(losses.ssim_loss))(zeros, zeros)
  assert bool(jnp.all(jnp.isfinite(g_ssim))) and bool(jnp.all(jnp.isfinite(g_loss)))
  assert float(losses.ssim_loss(zeros, zeros)) == pytest.approx(0.0, abs=1e-6)


def test_magnitude_value_and_gradient_at_zero():
  x = jnp.asarray([[[[3.0, 4.0], [0.0, 0.0]]]], jnp.bfloat16)
  mag = losses.magnitude(x)
  assert mag.dtype == jnp.float32 and mag.shape == (1, 1, 2)
  np.testing.assert_allclose(np.asarray(mag), [[[5.0, 0.0]]])
  grad = jax.grad(lambda a: losses.magnitude(a).sum())(jnp.zeros((1, 2, 2, 2)))
  assert bool(jnp.all(jnp.isfinite(grad)))
  np.testing.assert_array_equal(np.asarray(grad), 0.0)


def test_psnr_matches_skimage():
  gt, pred = _pair(seed=6)
  data_range = gt.max(axis=(1, 2))
  ref = [
    peak_signal_noise_ratio(g, p, data_range=dr)
    for g, p, dr in zip(gt, pred, data_range, strict=True)
  ]
  out = losses.psnr(pred, gt, data_range)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5)
  assert bool(jnp.isinf(losses.psnr(gt, gt, 1.0)).all())


def test_l1_magnitude():
  pred = jnp.zeros((2, 4, 4, 2)).at[..., 0].set(3.0).at[..., 1].set(4.0)
  target = jnp.zeros((2, 4, 4, 2)).at[..., 0].set(1.0)
  assert float(losses.l1_magnitude(pred, target)) == pytest.approx(4.0)
  g = jax.grad(lambda p: losses.l1_magnitude(p, target))(jnp.zeros((2, 4, 4, 2)))
  assert bool(jnp.all(jnp.isfinite(g)))
