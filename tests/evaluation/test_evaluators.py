"""Tests for nextaccel_jax.evaluation.evaluators: the accumulators every stage validates with."""

import numpy as np
import pytest

from nextaccel_jax.evaluation import evaluators, metrics


def _slices(seed=0, n=6, size=32):
  rng = np.random.default_rng(seed)
  gt = rng.uniform(0.1, 1.0, (n, size, size))
  pred = np.clip(gt + 0.1 * rng.standard_normal(gt.shape), 0, None)
  return gt, pred


def test_batch_mode_means_overall_and_per_family():
  gt, pred = _slices()
  family = np.array([0, 3, 0, 1, 3, 0])
  scores = evaluators.ImageScores(("paper",), lpips=())
  # Two batches, as a validation loop adds them.
  scores.add("recon", pred[:4], gt[:4], family[:4])
  scores.add("recon", pred[4:], gt[4:], family[4:])
  scores.add("zero_filled", gt[:4] * 0.5, gt[:4], family[:4])
  means = scores.means(("psnr", "ssim"))

  per_slice = metrics.evaluate_slices(gt, pred, "paper")
  assert means["recon/psnr"] == float(np.mean(per_slice["psnr"]))
  assert means["recon/ssim"] == float(np.mean(per_slice["ssim"]))
  for fam_id, name in ((0, "cartesian_y"), (1, "cartesian_x"), (3, "radial")):
    assert means[f"recon/{name}/psnr"] == float(np.mean(per_slice["psnr"][family == fam_id]))
  assert "recon/gaussian_2d/psnr" not in means and "recon/nmse" not in means
  assert set(k.split("/")[0] for k in means) == {"recon", "zero_filled"}
  table = scores.scores()
  assert set(table["recon"]) == {"cartesian_y", "cartesian_x", "radial"}
  np.testing.assert_array_equal(
    table["recon"]["cartesian_y"]["paper/ssim"], per_slice["ssim"][[0, 2, 5]]
  )


def test_batch_mode_with_lpips_and_a_volume_protocol():
  gt, pred = _slices(size=40)
  scores = evaluators.ImageScores(("paper", "fastmri"), lpips=("alex",))
  scores.add("m", pred, gt, ["radial"] * len(gt))
  means = scores.means(("ssim",))
  assert set(means) == {"m/ssim", "m/lpips_alex", "m/radial/ssim", "m/radial/lpips_alex"}
  table = scores.scores()["m"]["radial"]
  # Under fastmri the whole group is one unit: every slice carries its value.
  fast = evaluators.score_slices(gt, pred, "fastmri", ("alex",))
  np.testing.assert_array_equal(table["fastmri/psnr"], np.full(len(gt), fast["psnr"]))
  assert scores.means(("psnr",), protocol="fastmri")["m/psnr"] == pytest.approx(fast["psnr"])


def test_volume_mode_scores_each_volume_once_complete():
  gt, pred = _slices(n=5)
  slices = {
    10: {"file_name": "a.h5", "slice_index": 1},
    11: {"file_name": "a.h5", "slice_index": 0},
    12: {"file_name": "b.h5", "slice_index": 0},
    13: {"file_name": "b.h5", "slice_index": 1},
    14: {"file_name": "b.h5", "slice_index": 2},
  }
  scores = evaluators.ImageScores(("fastmri",), lpips=(), slices=slices)
  # Slices arrive out of order and across batches; a volume is scored when its last one is in.
  scores.add("m", pred[[0, 2]], gt[[0, 2]], [0, 0], records=[10, 12])
  with pytest.raises(RuntimeError, match="never received all its slices"):
    scores.scores()
  scores.add("m", pred[[1, 3, 4]], gt[[1, 3, 4]], [0, 0, 0], records=[11, 13, 14])
  table = scores.scores()["m"]["cartesian_y"]
  # Volume a (records 11, 10 by slice index), then b.
  np.testing.assert_array_equal(table["record"], [11, 10, 12, 13, 14])
  vol_a = metrics.evaluate_slices(gt[[1, 0]], pred[[1, 0]], "fastmri")
  vol_b = metrics.evaluate_slices(gt[2:], pred[2:], "fastmri")
  np.testing.assert_array_equal(table["fastmri/ssim"], [vol_a["ssim"]] * 2 + [vol_b["ssim"]] * 3)
  with pytest.raises(ValueError, match="needs the records"):
    scores.add("m", pred[:1], gt[:1], [0])


def test_errors_name_the_row_and_the_volume():
  gt, pred = _slices(n=1, size=8)
  scores = evaluators.ImageScores(
    ("paper",), lpips=(), slices={0: {"file_name": "v.h5", "slice_index": 0}}
  )
  with pytest.raises(ValueError, match="window") as info:
    scores.add("base", pred, gt, [2], records=[0])
  assert "while scoring base on v.h5" in " ".join(info.value.__notes__)
  with pytest.raises(ValueError, match="protocols"):
    evaluators.ImageScores(("ssim",))
  with pytest.raises(ValueError, match="lpips nets"):
    evaluators.ImageScores(lpips=("squeeze",))


def test_scale_means_weighted_and_per_scale():
  layout = ((0, 1), (1, 4))
  values = np.array([[1.0, 2.0, 2.0, 2.0], [3.0, 4.0, 4.0, 4.0], [9.0, 9.0, 9.0, 9.0]])
  valid = np.array([True, True, False])
  means = evaluators.ScaleMeans(layout)
  means.add("ce", values, valid)
  weighted = means.result("ce")
  assert weighted["ce/scale_1"] == 2.0 and weighted["ce/scale_2"] == 3.0
  assert weighted["ce"] == pytest.approx((2.0 * 1 + 3.0 * 3) / 4)
  assert means.result("ce", weighted=False)["ce"] == pytest.approx(2.5)
