"""Training curves from a metrics.jsonl: which panels a stage's names give, and the PNG."""

import json

import matplotlib.image

from nextaccel_jax.evaluation import curves


def _write(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 9, "spl')


def test_panels_follow_the_logged_names(tmp_path):
  rows = []
  for step in (10, 20, 30):
    rows.append(
      {
        "step": step,
        "split": "train",
        "loss": 3.0 / step,
        "ce": 2.0,
        "acc/scale_1": 0.1,
        "acc/scale_2": 0.2,
        "lr": 1e-3,
        "grad_norm": 1.5,
        "step_time_s": 2.0,
        "epoch": 1.0,
      }
    )
  rows.append(
    {
      "step": 30,
      "split": "validation",
      "recon/ssim": 0.5,
      "zero_filled/ssim": 0.3,
      "recon/cartesian_y/ssim": 0.4,
      "acc/scale_1": 0.15,
      "neg_ce": -2.0,
      "codebook/used": 0.9,
    }
  )
  path = tmp_path / "metrics.jsonl"
  _write(path, rows)
  read = curves.read_metrics(path)
  assert len(read) == 4  # the cut-off line is skipped
  panels = {p["title"]: p for p in curves.panels(read)}
  assert set(panels) == {
    "training losses",
    "acc per scale",
    "validation ssim",
    "validation codebook/used",
    "learning rate and gradient norm",
  }
  assert [line[0] for line in panels["training losses"]["lines"]] == ["loss", "ce"]
  assert [line[:2] for line in panels["acc per scale"]["lines"]] == [
    ("scale 1", "train"),
    ("scale 2", "train"),
    ("scale 1 (val)", "validation"),
  ]
  # Overall rows only: the per-family SSIM is in the report's tables, not in the curves.
  assert [line[0] for line in panels["validation ssim"]["lines"]] == ["recon", "zero_filled"]

  out = tmp_path / "figures" / "curves.png"
  assert curves.plot_training_curves(path, out, "student")
  assert matplotlib.image.imread(out).shape[0] > 200


def test_no_curves_no_file(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text("")
  assert not curves.plot_training_curves(path, tmp_path / "c.png", "empty")
  assert not (tmp_path / "c.png").exists()
