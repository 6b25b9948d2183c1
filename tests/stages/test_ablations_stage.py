"""The Table 4 ablations: the table's layout, the combined top-k + top-p decoding, the smoke run
from the smoke pipeline's stage-1 workdir (every variant trained, evaluated, exported, reported)
and a re-run that skips every finished step."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import ablations as ablations_config
from configs import distill as distill_config
from nextaccel_jax import export, inference, sharding, testing
from nextaccel_jax.evaluation import report
from nextaccel_jax.stages import ablations, evaluate

FAMILIES = ("gaussian_2d", "cartesian_x", "cartesian_y", "radial")
PAPER_FAMILIES = ("Gaussian-VD", "ES Cartesian-X", "ES Cartesian-Y", "Radial")
METRICS = ("psnr", "ssim", "lpips_alex")
LABELS = (
  "w/o Cross-Attention",
  "w/o Token Hierarchy",
  "w/o Trainable Encoder",
  "Base (Multinomial Sampling)",
  "Base (Top-p = 0.96, Top-k = 14)",
  "Base (Argmax Decoding)",
)


def _header_line() -> str:
  cells = ["Variant"] + [
    f"{f} {h}" for f in PAPER_FAMILIES for h in ("PSNR ↑", "SSIM ↑", "LPIPS-alex ↓")
  ]
  return "| " + " | ".join(cells) + " |"


def _table_lines(text: str, protocol: str) -> list[str]:
  section = text.split(f"## Protocol `{protocol}`\n\n", 1)[1]
  return [line for line in section.split("\n\n", 1)[0].splitlines() if line.startswith("|")]


def test_ablation_table_layout_and_best_in_bold():
  rows = ["a/argmax", "b/argmax", "b/multinomial"]
  metrics = {}
  for i, row in enumerate(rows):
    for j, family in enumerate(FAMILIES):
      metrics[f"{row}/{family}/paper/psnr"] = 20.0 + i + j
      metrics[f"{row}/{family}/paper/ssim"] = 0.5 - 0.1 * i
      metrics[f"{row}/{family}/paper/lpips_alex"] = 0.2 + 0.01 * (i - 1) ** 2
  del metrics["b/argmax/radial/paper/ssim"]
  text = report.ablation_table(metrics, rows, ["A", "B", "B (sampled)"], FAMILIES, "paper", METRICS)
  lines = text.splitlines()
  assert lines[0] == _header_line()
  assert lines[1] == "| --- |" + " :-: |" * 12
  cells = [line.strip("| ").split(" | ") for line in lines[2:]]
  assert [c[0] for c in cells] == ["A", "B", "B (sampled)"]
  assert all(len(c) == 13 for c in cells)
  # PSNR: higher is better; SSIM: the first row; LPIPS: lower is better, the middle row.
  assert cells[2][1] == "**22.00**" and cells[0][1] == "20.00"
  assert cells[0][2] == "**0.5000**" and cells[1][3] == "**0.2000**" and cells[0][3] == "0.2100"
  assert cells[1][11] == "–"
  with pytest.raises(ValueError, match="labels"):
    report.ablation_table(metrics, rows, ["A"], FAMILIES, "paper", METRICS)


def test_top_k_top_p_decoding_keeps_both_filters():
  config = ablations_config.get_config("paper").evaluate
  config.decoding = ("top_k_top_p",)
  [(name, sampling)] = evaluate.sampling_variants(config)
  assert name == "top_k_top_p"
  assert sampling == inference.SamplingConfig(greedy=False, top_k=900, top_p=0.96)
  config.sampling.top_k = 0
  with pytest.raises(ValueError, match="top_k_top_p"):
    evaluate.sampling_variants(config)


def test_variant_overrides_must_name_fields():
  config = ablations_config.get_config("smoke")
  assert ablations.variant_config(config, "no_token_hierarchy").model.flat_tokens is True
  assert ablations.variant_config(config, "frozen_encoder").trainable_context_encoder is False
  config.variants.frozen_encoder.model.cross_atention = False
  with pytest.raises(ValueError, match="cross_atention"):
    ablations.variant_config(config, "frozen_encoder")


def test_distill_step_without_cross_attention_or_token_hierarchy():
  config = distill_config.get_config("smoke")
  for section in ("model", "teacher"):
    config[section].cross_attention = False
    config[section].flat_tokens = True
  step = testing.stage_step("distill", config, sharding.make_mesh(), total_steps=4)
  assert "context_encoder" not in step.state.params
  rng = np.random.default_rng(0)
  levels = rng.normal(size=(8, 6, 64, 64, 2)).astype(np.float32) * 0.3
  batch = {"levels": jnp.asarray(levels), "family": jnp.asarray(np.arange(8) % 4, jnp.int32)}
  _, m = step(step.state, batch)
  # Unrelated random student and teacher: the KL over the 5 × 16² rollout and its gradient live.
  assert np.isfinite(float(m["loss"])) and float(m["grad_norm"]) > 0


def test_smoke_ablations_from_one_stage1_run(smoke_pipeline, tmp_path, monkeypatch):
  pipeline_root, _, _ = smoke_pipeline
  monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
  config = ablations_config.get_config("smoke")
  config.tokenizer_from = str(pipeline_root / "aqvae")
  root = tmp_path / "ablations"
  metrics = ablations.run(config, root)

  variants = ("base", "no_cross_attention", "no_token_hierarchy", "frozen_encoder")
  state = json.loads((root / "ablations.json").read_text())
  # No stage-1 step: every variant reads the given tokenizer and the pipeline's dataset.
  assert list(state["stages"]) == [f"{s}/{v}" for v in variants for s in ("train", "evaluate")]
  for record in state["stages"].values():
    assert record["done"]
    assert record["config"]["tokenizer_from"] == str(pipeline_root / "aqvae")
    assert record["config"]["data"]["data_dir"] == str(pipeline_root / "tensorflow_datasets")
  assert not (root / "aqvae").exists() and not (root / "tensorflow_datasets").exists()

  for family in FAMILIES:
    for row in [f"{v}/argmax" for v in variants] + ["base/multinomial", "base/top_k_top_p"]:
      for metric in METRICS:
        assert np.isfinite(metrics[f"{row}/{family}/paper/{metric}"]), (row, family, metric)

  text = (root / "report.md").read_text()
  assert f"`{pipeline_root / 'aqvae'}` (one stage-1 run for every row)" in text
  for protocol in ("paper", "fastmri"):
    lines = _table_lines(text, protocol)
    assert lines[0] == _header_line() and len(lines) == 2 + len(LABELS)
    cells = [line.strip("| ").split(" | ") for line in lines[2:]]
    assert tuple(c[0] for c in cells) == LABELS
    for j in range(1, 13):
      column = [c[j] for c in cells]
      assert all(v != "–" for v in column) and any(v.startswith("**") for v in column)
  psnr = metrics["no_token_hierarchy/argmax/radial/paper/psnr"]
  assert f"{psnr:.2f}" in _table_lines(text, "paper")[3]

  # The ablated models load back, through a workdir and through an export.
  plain = export.load_reconstructor(root / "train" / "no_cross_attention")
  assert not plain.transformer.cross_attention
  paths = ["/".join(p) for p in traverse_util.flatten_dict(plain.transformer_variables["params"])]
  assert not any(p.startswith("context_encoder/") or "/cross_attn/" in p for p in paths)
  path = export.export_from_workdirs(
    tmp_path / "flat_export", transformer_from=root / "train" / "no_token_hierarchy"
  )
  flat = export.load_export(path)
  assert flat.transformer.flat_tokens and flat.transformer.patch_nums == (16,) * 6
  assert flat.tokenizer.patch_nums == (11, 12, 13, 14, 15, 16)

  # A second run finds every step done, trains and evaluates nothing, and reports the same.
  def boom(name):
    raise AssertionError(f"step {name} ran again")

  monkeypatch.setattr(ablations, "stage_function", boom)
  assert ablations.run(config, root) == pytest.approx(metrics, nan_ok=True)
  assert (root / "report.md").read_text() == text
  config.variants.frozen_encoder.model.stop_context_grad = False
  with pytest.raises(ValueError, match="finished with a different config"):
    ablations.run(config, root)
