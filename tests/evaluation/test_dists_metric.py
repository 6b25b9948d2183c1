"""Tests for nextaccel_jax.evaluation.dists_metric, its use in evaluators and the report.

The parity values come from `DISTS_pytorch.DISTS` on the fixture's magnitude volume, prepared the
way `dists_metric` prepares it (tests/fixtures/make_dists_fixture.py). Tests that need the
trained weights skip when dists-pytorch is not installed.
"""

from pathlib import Path

import numpy as np
import pytest

from nextaccel_jax.evaluation import dists_metric, evaluators, report
from nextaccel_jax.models import dists as dists_model

FIXTURE = Path(__file__).parents[1] / "fixtures" / "dists_parity.npz"
RTOL = 1e-4


@pytest.fixture(scope="module")
def volume():
  if not dists_metric.available():
    pytest.skip(f"dists-pytorch is not installed ({dists_model.INSTALL_HINT})")
  with np.load(FIXTURE) as data:
    return {k: data[k] for k in data.files}


@pytest.fixture
def unavailable(monkeypatch):
  monkeypatch.setattr(dists_model, "available", lambda: False)


@pytest.mark.parametrize("protocol", ["paper", "fastmri"])
def test_parity_with_the_reference(volume, protocol):
  values = dists_metric.dists(volume["mag_target_SHW"], volume["mag_pred_SHW"], protocol)
  assert values.shape == (2,) and values.dtype == np.float64
  np.testing.assert_allclose(values, volume[f"mag_{protocol}_dist_S"], rtol=RTOL, atol=0)


def test_batching_scale_and_identity(volume):
  gt, pred = volume["mag_target_SHW"], volume["mag_pred_SHW"]
  full = dists_metric.dists(gt, pred)
  np.testing.assert_allclose(dists_metric.dists(gt, pred, batch_size=1), full, rtol=1e-6)
  # `paper` divides each image by its own maximum, so the prediction's scale is invisible.
  np.testing.assert_allclose(dists_metric.dists(gt, 3 * pred), full, rtol=1e-5)
  np.testing.assert_allclose(dists_metric.dists(gt, gt.copy()), 0.0, atol=1e-6)
  with pytest.raises(ValueError, match="batch_size must be positive"):
    dists_metric.dists(gt, pred, batch_size=0)


def test_score_slices_and_image_scores(volume):
  gt, pred = volume["mag_target_SHW"], volume["mag_pred_SHW"]
  paper = evaluators.score_slices(gt, pred, "paper", lpips=(), dists=True)
  assert set(paper) == {"psnr", "ssim", "nmse", "dists"}
  np.testing.assert_array_equal(paper["dists"], dists_metric.dists(gt, pred))
  fast = evaluators.score_slices(gt, pred, "fastmri", dists=True)
  assert isinstance(fast["dists"], float)
  assert fast["dists"] == pytest.approx(volume["mag_fastmri_dist_S"].mean(), rel=RTOL)

  scores = evaluators.ImageScores(("paper",), lpips=(), dists=True)
  scores.add("m", pred, gt, ["radial", "radial"])
  means = scores.means(("ssim",))
  assert set(means) == {"m/ssim", "m/dists", "m/radial/ssim", "m/radial/dists"}
  assert means["m/dists"] == pytest.approx(paper["dists"].mean())
  assert "paper/dists" in scores.scores()["m"]["radial"]


def test_off_without_the_package(unavailable):
  assert not dists_metric.available()
  assert dists_metric.status() == "off (dists-pytorch not installed: pip install dists-pytorch)"
  with pytest.raises(FileNotFoundError, match="pip install dists-pytorch"):
    evaluators.ImageScores(("paper",), lpips=(), dists=True)
  assert not evaluators.ImageScores(("paper",), lpips=()).dists


def test_report_marks_the_lowest_dists_best():
  metrics = {
    "zero_filled/radial/paper/T2/dists": 0.31,
    "zero_filled/radial/paper/T2/dists_std": 0.02,
    "a/argmax/radial/paper/T2/dists": 0.12,
    "a/argmax/radial/paper/T2/dists_std": 0.01,
  }
  table = report.family_table(
    metrics, ["zero_filled", "a/argmax"], "radial", "paper", ["T2"], ["dists"]
  )
  assert "| Method | T2 DISTS ↓ |" in table
  assert "| a | **0.1200 ± 0.0100** |" in table
  assert "| Zero-filled (R = 32) | 0.3100 ± 0.0200 |" in table
