"""The evaluation stage on the smoke dataset with tiny random models: report files, their
agreement with the returned metrics, and the errors for bad settings."""

import csv
import json
import re

import jax
import numpy as np
import pytest
from PIL import Image

from configs import eval as eval_config
from nextaccel_jax import export, inference, testing
from nextaccel_jax.data import pipeline
from nextaccel_jax.evaluation import dists_metric, report
from nextaccel_jax.models import aqvae
from nextaccel_jax.models import dists as dists_model
from nextaccel_jax.models import transformer as T
from nextaccel_jax.stages import evaluate

TOKENIZER = dict(
  ch=16, ch_mult=(1, 1, 2), num_res_blocks=1, z_channels=8, vocab_size=64, norm_groups=8
)
TINY = dict(depth=2, width=32, num_heads=2, context_map=(0, 1))
IMAGE = 64
FAMILIES = ("cartesian_y", "cartesian_x", "gaussian_2d", "radial")
# Every preset reports LPIPS-alex, LPIPS-vgg and, where dists-pytorch is installed, DISTS.
PERCEPTUAL = ("lpips_alex", "lpips_vgg") + (("dists",) if dists_metric.available() else ())


@pytest.fixture(scope="module")
def models():
  """Two tiny random students sharing one tokenizer, keyed by source name."""
  tok = aqvae.AQVAE(label_features=16, **TOKENIZER)
  tok_vars = testing.random_tokenizer_variables(tok, IMAGE)
  model = T.NextAccelTransformer(**TINY, **T.context_encoder_fields(tok))
  shapes = jax.eval_shape(lambda: T.init_params(model, jax.random.key(1), IMAGE))
  return {
    src: inference.Reconstructor(tok, tok_vars, model, testing.random_like(shapes, seed))
    for seed, src in enumerate(("runs/student", "runs/distill"), start=1)
  } | {
    "runs/teacher": inference.Reconstructor(
      tok, tok_vars, model.clone(role="teacher"), testing.random_like(shapes, 9)
    )
  }


@pytest.fixture
def patched(monkeypatch, models):
  calls = []

  def load(source, tokenizer_from=""):
    calls.append((source, tokenizer_from))
    return models[source]

  monkeypatch.setattr(export, "load_reconstructor", load)
  return calls


def _config(data_dir, **overrides):
  config = eval_config.get_config("smoke")
  config.data.data_dir = data_dir
  config.models.base = "runs/student"
  config.models.distilled = "runs/distill"
  config.update_from_flattened_dict(overrides)
  return config


def test_smoke_run_writes_a_consistent_report(smoke_data_dir, patched, tmp_path):
  config = _config(smoke_data_dir, decoding=("argmax", "top_k"))
  metrics = evaluate.run(config, tmp_path)
  assert [s for s, _ in patched] == ["runs/student", "runs/distill"]

  for name in ("report.md", "per_slice.csv", "metrics.json", "final_metrics.json"):
    assert (tmp_path / name).is_file(), name
  assert json.loads((tmp_path / "metrics.json").read_text()) == pytest.approx(metrics)
  assert json.loads((tmp_path / "final_metrics.json").read_text()) == pytest.approx(metrics)

  for family in FAMILIES:
    for row in (
      "zero_filled",
      "base/argmax",
      "base/top_k",
      "distilled/argmax",
      "base+DC/argmax",
      "distilled+DC/top_k",
    ):
      keys = ("paper/psnr", "paper/ssim", "fastmri/psnr", "fastmri/ssim")
      keys += tuple(f"{p}/{m}" for p in ("paper", "fastmri") for m in PERCEPTUAL)
      for key in keys:
        assert np.isfinite(metrics[f"{row}/{family}/{key}"]), (row, family, key)
    # The smoke validation split is one T2 volume of two slices.
    assert metrics[f"base/argmax/{family}/paper/n"] == 2
    assert metrics[f"base/argmax/{family}/fastmri/n"] == 1
    assert (
      metrics[f"base/argmax/{family}/paper/T2/ssim"] == metrics[f"base/argmax/{family}/paper/ssim"]
    )

  with open(tmp_path / "per_slice.csv") as f:
    rows = list(csv.DictReader(f))
  # (zero-filled + 2 models × 2 decodings, with and without data consistency) × 4 families ×
  # 2 slices.
  assert len(rows) == 9 * 4 * 2
  assert {r["contrast"] for r in rows} == {"T2"}
  assert {r["slice_index"] for r in rows} == {"0", "1"}
  for model, decoding in (("distilled", "argmax"), ("base", "top_k"), ("zero_filled", "")):
    sel = [
      r for r in rows if (r["model"], r["decoding"], r["family"]) == (model, decoding, "radial")
    ]
    key = "zero_filled" if model == "zero_filled" else f"{model}/{decoding}"
    for col in ("paper_psnr", "paper_ssim", *(f"paper_{m}" for m in PERCEPTUAL)):
      mean = np.mean([float(r[col]) for r in sel])
      assert mean == pytest.approx(metrics[f"{key}/radial/{col.replace('_', '/', 1)}"])
    # The fastmri columns repeat the volume's value on each of its slices.
    assert len({r["fastmri_psnr"] for r in sel}) == 1
    assert float(sel[0]["fastmri_psnr"]) == pytest.approx(metrics[f"{key}/radial/fastmri/psnr"])

  text = (tmp_path / "report.md").read_text()
  assert "fastmri_brain_multiscale/smoke" in text
  assert "base ← `runs/student`" in text
  assert "rows `<model>+DC`: 10 steps on the R = 32 samples, input phase" in text
  assert "| distilled+DC |" in text
  for family in FAMILIES:
    assert text.count(f"### {family} (decoding: argmax)") == 2
  assert text.count("### Decoding variants") == 2
  perceptual = " | T2 LPIPS-alex ↓ | T2 LPIPS-vgg ↓"
  perceptual += " | T2 DISTS ↓" if "dists" in PERCEPTUAL else ""
  assert f"| Method | T2 PSNR ↑ | T2 SSIM ↑{perceptual} |\n" in text
  assert f"- **DISTS**: {dists_metric.status()}\n" in text
  assert "T1 PSNR" not in text and "all PSNR" not in text
  psnr = metrics["distilled/argmax/radial/paper/psnr"]
  assert f"{psnr:.2f} ± " in text

  # Columns: input, R = 32 mask, base, distilled, base+DC, distilled+DC (recon and error each),
  # target.
  written = set()
  for family in FAMILIES:
    with Image.open(tmp_path / "figures" / f"{family}.png") as im:
      assert im.format == "PNG" and im.size == report.grid_size(2, 11, error_bar=True)
    written.add(f"figures/{family}.png")
    for model in ("base", "distilled"):
      with Image.open(tmp_path / "figures" / f"{family}_{model}_levels.png") as im:
        assert im.size == report.grid_size(2, 8)
      # Input, the four diagnostic decodes (recon and error each), target.
      with Image.open(tmp_path / "figures" / f"{family}_{model}_diagnostics.png") as im:
        assert im.size == report.grid_size(2, 10, error_bar=True)
      written |= {f"figures/{family}_{model}_{kind}.png" for kind in ("levels", "diagnostics")}
  assert {f"figures/{p.name}" for p in (tmp_path / "figures").iterdir()} == written
  # report.md links every figure (relative paths), report.html embeds them all.
  figures = text.split("\n## Figures\n")[1]
  links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", figures)
  assert sorted(links) == sorted(written)
  assert all((tmp_path / link).is_file() for link in links)
  page = (tmp_path / "report.html").read_text()
  sources = re.findall(r'<img [^>]*src="([^"]*)"', page)
  assert len(sources) == len(written)
  assert all(src.startswith("data:image/png;base64,") for src in sources)
  assert not re.search(r"(src|href)=\"(?!data:)", page)

  # Diagnostics: the tokenizer's ceiling, teacher forcing and the free rollout of each model,
  # first protocol and LPIPS net; the rollout is the argmax row, scored the same way.
  assert "## Where quality is lost" in text
  for model in ("base", "distilled"):
    for diag in inference.DIAGNOSTICS:
      for m in ("psnr", "ssim", "lpips_alex"):
        assert np.isfinite(metrics[f"diagnostics/{model}/{diag}/radial/paper/{m}"])
      assert f"| {model}: {report.DIAGNOSTIC_LABELS[diag]} |" in text
    # Batches holding figure slices decode through the per-scale path (`return_intermediates`),
    # whose last level equals the plain decoding up to float32 rounding.
    assert metrics[f"diagnostics/{model}/rollout/radial/paper/ssim"] == pytest.approx(
      metrics[f"{model}/argmax/radial/paper/ssim"], rel=1e-5
    )
    assert "fastmri" not in "".join(k for k in metrics if k.startswith(f"diagnostics/{model}/"))
    for mode in ("teacher_forced", "rollout"):
      accuracy = [metrics[f"diagnostics/{model}/{mode}/accuracy/scale_{k}"] for k in range(1, 6)]
      assert all(0.0 <= a <= 1.0 for a in accuracy)
    # Scale 1 reads the true Q32 in both modes.
    assert metrics[f"diagnostics/{model}/rollout/accuracy/scale_1"] == pytest.approx(
      metrics[f"diagnostics/{model}/teacher_forced/accuracy/scale_1"]
    )
    assert f"- **{model}**: SSIM lost from the target to the rollout, mean over families" in text
  assert "| Token accuracy | Q16 | Q8 | Q4 | Q2 | QFS | all |" in text


def test_brain_mask_of_the_smoke_target(smoke_data_dir):
  source = pipeline.load_split("fastmri_brain_multiscale/smoke", "validation", smoke_data_dir)
  levels = source[0]["levels"]
  target = np.hypot(levels[0, -1, ..., 0], levels[0, -1, ..., 1])
  mask = report.brain_mask(target)
  n = target.shape[0]
  # Most of the bright tissue is brain (the rest is the thin scalp shell the mask leaves out).
  bright = target > 0.3 * target.max()
  assert (mask & bright).sum() >= 0.7 * bright.sum()
  assert mask[n // 2, n // 2] and 0.2 < mask.mean() < 0.8
  for corner in (mask[:8, :8], mask[:8, -8:], mask[-8:, :8], mask[-8:, -8:]):
    assert not corner.any()


def _slices(volumes):
  """A slices table of `{file_name: (contrast, number of slices)}`, records in that order."""
  out, record = {}, 0
  for name, (contrast, count) in volumes.items():
    for i in range(count):
      out[record] = {"file_name": name, "slice_index": i, "contrast": contrast}
      record += 1
  return out


def test_figure_records_spread_over_volumes_and_contrasts():
  slices = _slices(
    {"b_t2.h5": ("T2", 4), "a_t2.h5": ("T2", 4), "c_t1.h5": ("T1", 6), "d_flair.h5": ("FLAIR", 2)}
  )

  def picked(num, order=("T1", "T2", "FLAIR")):
    return [
      (slices[r]["file_name"], slices[r]["slice_index"])
      for r in evaluate.figure_records(slices, num, order)
    ]

  # One slice per contrast first, each its volume's middle one; then the second T2 volume.
  assert picked(3) == [("c_t1.h5", 3), ("a_t2.h5", 2), ("d_flair.h5", 1)]
  assert picked(4) == [("c_t1.h5", 3), ("a_t2.h5", 2), ("b_t2.h5", 2), ("d_flair.h5", 1)]
  # More slices: each volume gives evenly spaced ones.
  assert picked(8)[:3] == [("c_t1.h5", 1), ("c_t1.h5", 4), ("a_t2.h5", 1)]
  assert len({f for f, _ in picked(4)}) == 4
  assert len(evaluate.figure_records(slices, 100)) == len(slices)
  assert evaluate.figure_records(slices, 0) == []
  # Unknown contrasts come after the named ones; the result does not depend on record order.
  assert picked(2, order=("FLAIR",)) == [("d_flair.h5", 1), ("c_t1.h5", 3)]
  shuffled = dict(reversed(list(slices.items())))
  assert evaluate.figure_records(shuffled, 5, ("T1",)) == evaluate.figure_records(
    slices, 5, ("T1",)
  )


def test_dists_off_without_the_package_is_said(smoke_data_dir, patched, tmp_path, monkeypatch):
  monkeypatch.setattr(dists_model, "available", lambda: False)
  overrides = {"models.distilled": "", "data_consistency.enabled": False, "figures.num_slices": 0}
  config = _config(smoke_data_dir, families=("radial",), lpips_nets=(), **overrides)
  metrics = evaluate.run(config, tmp_path)
  assert metrics and not [k for k in metrics if "dists" in k]
  text = (tmp_path / "report.md").read_text()
  assert "- **DISTS**: off (dists-pytorch not installed: pip install dists-pytorch)\n" in text
  assert "DISTS ↓" not in text


def test_empty_models_are_explained(smoke_data_dir, tmp_path):
  config = eval_config.get_config("smoke")
  config.data.data_dir = smoke_data_dir
  with pytest.raises(ValueError, match="config.models has no model to evaluate"):
    evaluate.run(config, tmp_path)


def test_bad_settings_are_named(smoke_data_dir, patched, tmp_path):
  with pytest.raises(ValueError, match="config.batch_size=4 must be a positive multiple of the 8"):
    evaluate.run(_config(smoke_data_dir, batch_size=4), tmp_path)
  with pytest.raises(ValueError, match="config.decoding has unknown variant 'beam'"):
    evaluate.run(_config(smoke_data_dir, decoding=("argmax", "beam")), tmp_path)
  with pytest.raises(ValueError, match="config.families"):
    evaluate.run(_config(smoke_data_dir, families=("spiral",)), tmp_path)
  with pytest.raises(ValueError, match="config.models.base=runs/teacher is a teacher"):
    evaluate.run(_config(smoke_data_dir, **{"models.base": "runs/teacher"}), tmp_path)


def test_config_presets():
  for preset in ("paper", "demo", "smoke"):
    config = eval_config.get_config(preset)
    assert config.stage == "evaluate"
    assert list(config.models.keys()) == ["base", "distilled", "unet", "varnet"]
    assert config.batch_size % 8 == 0
    assert config.lpips_nets == ("alex", "vgg") and config.dists
  for preset in ("paper", "demo"):
    assert eval_config.get_config(preset).decoding == ("argmax", "top_k_top_p")
  paper = eval_config.get_config("paper").sampling
  assert (paper.top_k, paper.top_p) == (900, 0.96)
  # Each preset keeps top-k at the paper's share of its vocabulary (900 / 4096).
  for preset, vocab in (("demo", 512), ("smoke", 64)):
    assert eval_config.get_config(preset).sampling.top_k == round(900 / 4096 * vocab)


def test_training_runs_behind_the_rows(tmp_path):
  for name in ("aqvae", "student", "distill"):
    (tmp_path / name).mkdir()
    (tmp_path / name / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 1.0}\n')
  (tmp_path / "export").mkdir()
  models = [
    ("base", str(tmp_path / "student")),
    ("distilled", str(tmp_path / "export")),
    ("unet", str(tmp_path / "no_such_run")),
  ]
  exported = {
    "distilled": {
      "meta": {
        "transformer_from": str(tmp_path / "distill"),
        "tokenizer_from": str(tmp_path / "aqvae"),
      }
    }
  }
  # The export names its own workdirs; a row without metrics.jsonl has no curves.
  runs = evaluate.training_runs(models, "", exported)
  assert runs == {
    "tokenizer": str(tmp_path / "aqvae"),
    "base": str(tmp_path / "student"),
    "distilled": str(tmp_path / "distill"),
  }
  paths = evaluate._write_curves(tmp_path / "figures", runs)
  assert [rel for _, rel in paths] == [
    "figures/curves_tokenizer.png",
    "figures/curves_base.png",
    "figures/curves_distilled.png",
  ]
  assert all((tmp_path / rel).is_file() for _, rel in paths)
