"""The evaluation stage on the smoke dataset with tiny random models: report files, their
agreement with the returned metrics, and the errors for bad settings."""

import csv
import json

import jax
import numpy as np
import pytest
from PIL import Image

from configs import eval as eval_config
from nextaccel_jax import export, inference, testing
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

  # Columns: input, base, distilled, base+DC, distilled+DC (recon and error each), target.
  for family in FAMILIES:
    with Image.open(tmp_path / "figures" / f"{family}.png") as im:
      assert im.format == "PNG" and im.size == report.grid_size(2, 10)
    with Image.open(tmp_path / "figures" / f"{family}_levels.png") as im:
      assert im.size == report.grid_size(2, 8)
    # Input, the four diagnostic decodes (recon and error each), target.
    with Image.open(tmp_path / "figures" / f"{family}_diagnostics.png") as im:
      assert im.size == report.grid_size(2, 10)

  # Diagnostics: the tokenizer's ceiling, teacher forcing and the free rollout of each model,
  # first protocol and LPIPS net; the rollout is the argmax row, scored the same way.
  assert "## Where quality is lost" in text
  for model in ("base", "distilled"):
    for diag in inference.DIAGNOSTICS:
      for m in ("psnr", "ssim", "lpips_alex"):
        assert np.isfinite(metrics[f"diagnostics/{model}/{diag}/radial/paper/{m}"])
      assert f"| {model}: {report.DIAGNOSTIC_LABELS[diag]} |" in text
    assert metrics[f"diagnostics/{model}/rollout/radial/paper/ssim"] == pytest.approx(
      metrics[f"{model}/argmax/radial/paper/ssim"]
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
