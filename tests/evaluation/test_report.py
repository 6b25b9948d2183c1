"""Evaluation report writers: aggregation, markdown tables, per-slice CSV, figure grids, the brain
mask of the error maps and the self-contained HTML page."""

import base64
import csv
import re

import numpy as np
import pytest
from PIL import Image

from nextaccel_jax.evaluation import report

# Three records: two slices of a T1 volume, one slice of a T2 volume.
SLICES = {
  0: {"file_name": "file_brain_AXT1_1.h5", "slice_index": 0, "contrast": "T1"},
  1: {"file_name": "file_brain_AXT1_1.h5", "slice_index": 1, "contrast": "T1"},
  2: {"file_name": "file_brain_AXT2_2.h5", "slice_index": 0, "contrast": "T2"},
}


def _cols(paper_psnr, fastmri_psnr, ssim=(0.5, 0.6, 0.7), lpips=(0.3, 0.2, 0.1), records=(0, 1, 2)):
  return {
    "record": np.array(records),
    "paper/psnr": np.array(paper_psnr, float),
    "paper/ssim": np.array(ssim, float),
    "paper/lpips_alex": np.array(lpips, float),
    "fastmri/psnr": np.array(fastmri_psnr, float),
  }


@pytest.fixture
def scores():
  return {
    "zero_filled": {"radial": _cols([20, 22, 24], [21, 21, 30], lpips=(0.5, 0.5, 0.5))},
    "base/argmax": {"radial": _cols([30, 32, 34], [31, 31, 33])},
    "base/top_k": {"radial": _cols([29, 31, 40], [30, 30, 35])},
  }


def test_summarize_paper_per_slice_fastmri_per_volume(scores):
  m = report.summarize(scores, SLICES)
  assert m["base/argmax/radial/paper/psnr"] == pytest.approx(32.0)
  assert m["base/argmax/radial/paper/psnr_std"] == pytest.approx(np.std([30, 32, 34]))
  assert m["base/argmax/radial/paper/n"] == 3
  assert m["base/argmax/radial/paper/T1/psnr"] == pytest.approx(31.0)
  assert m["base/argmax/radial/paper/T2/psnr"] == pytest.approx(34.0)
  # fastmri: one value per volume, so the T1 volume counts once.
  assert m["base/argmax/radial/fastmri/psnr"] == pytest.approx(32.0)
  assert m["base/argmax/radial/fastmri/n"] == 2
  assert m["base/argmax/radial/fastmri/T1/n"] == 1
  assert m["zero_filled/radial/paper/lpips_alex"] == pytest.approx(0.5)


def test_summarize_leaves_out_and_counts_non_finite(scores):
  scores["base/argmax"]["radial"]["paper/psnr"] = np.array([30.0, np.inf, 34.0])
  m = report.summarize(scores, SLICES)
  assert m["base/argmax/radial/paper/psnr"] == pytest.approx(32.0)
  assert m["base/argmax/radial/paper/psnr_nonfinite"] == 1


def test_summarize_names_bad_input(scores):
  scores["base/argmax"]["radial"]["paper/psnr"] = np.array([1.0, 2.0])
  with pytest.raises(ValueError, match=r"scores\['base/argmax'\]\['radial'\]\['paper/psnr'\]"):
    report.summarize(scores, SLICES)
  with pytest.raises(ValueError, match="slices has no entry for record 7"):
    report.summarize({"zero_filled": {"radial": _cols([1], [1], (1,), (1,), (7,))}}, SLICES)


def test_family_table_layout_and_bold_best(scores):
  m = report.summarize(scores, SLICES)
  text = report.family_table(
    m,
    ["zero_filled", "base/argmax", "base/top_k"],
    "radial",
    "paper",
    ["T1", "T2"],
    ["psnr", "ssim", "lpips_alex"],
  )
  lines = text.splitlines()
  header = [c.strip() for c in lines[0].strip("|").split("|")]
  assert header[0] == "Method"
  assert header[1:4] == ["T1 PSNR ↑", "T1 SSIM ↑", "T1 LPIPS-alex ↓"]
  assert header[-3:] == ["all PSNR ↑", "all SSIM ↑", "all LPIPS-alex ↓"]
  assert len(header) == 1 + 3 * 3
  assert lines[1].count(":-:") == 9
  body = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
  assert [r[0] for r in body] == ["Zero-filled (R = 32)", "base", "base"]
  # T1 PSNR: base/argmax (31) beats top_k (30) and zero-filled (21).
  assert body[1][1] == "**31.00 ± 1.00**"
  assert body[2][1] == "30.00 ± 1.00"
  # T2 PSNR: top_k wins; LPIPS is lower-is-better and ties are bold together.
  assert body[2][4] == "**40.00 ± 0.00**"
  assert body[1][6].startswith("**") and body[2][6].startswith("**")
  assert not body[0][6].startswith("**")


def test_missing_contrast_shows_a_dash(scores):
  # The distilled model was only run on the T1 volume.
  scores["distilled/argmax"] = {"radial": _cols([35, 36], [36, 36], (0.8, 0.9), (0.1, 0.1), (0, 1))}
  m = report.summarize(scores, SLICES)
  assert "distilled/argmax/radial/paper/T2/psnr" not in m
  text = report.family_table(
    m, ["zero_filled", "distilled/argmax"], "radial", "paper", ["T1", "T2"], ["psnr"]
  )
  last = [c.strip() for c in text.splitlines()[-1].strip("|").split("|")]
  assert last == ["distilled", "**35.50 ± 0.50**", "–", "**35.50 ± 0.50**"]


def test_render_report_sections(scores):
  m = report.summarize(scores, SLICES)
  text = report.render_report(
    m,
    header={"Dataset": "demo", "Split": "validation"},
    models=["base"],
    decodings=["argmax", "top_k"],
    families=["radial"],
    protocols=["paper", "fastmri"],
    contrasts=["T1", "T2"],
    metric_names=["psnr", "ssim", "lpips_alex"],
  )
  assert "- **Dataset**: demo" in text
  assert text.count("### radial (decoding: argmax)") == 2
  assert "### Decoding variants (`paper`, all contrasts)" in text
  assert "| base (top_k) |" in text
  # fastmri only has PSNR here: the other columns are dashes, not errors.
  fastmri = text.split("## Protocol `fastmri`")[1]
  assert "| Zero-filled (R = 32) | 21.00 ± 0.00 | – |" in fastmri


def test_csv_rows_and_columns(scores, tmp_path):
  path = tmp_path / "per_slice.csv"
  n = report.write_csv(path, scores, SLICES)
  with open(path) as f:
    rows = list(csv.DictReader(f))
  assert n == len(rows) == 3 * 3
  assert list(rows[0]) == list(report.CSV_META) + [
    "fastmri_psnr",
    "paper_lpips_alex",
    "paper_psnr",
    "paper_ssim",
  ]
  base = [r for r in rows if (r["model"], r["decoding"]) == ("base", "argmax")]
  assert [float(r["paper_psnr"]) for r in base] == [30, 32, 34]
  assert base[2]["file_name"] == "file_brain_AXT2_2.h5" and base[2]["contrast"] == "T2"
  zf = [r for r in rows if r["model"] == "zero_filled"]
  assert {r["decoding"] for r in zf} == {""}
  mean = np.mean([float(r["paper_psnr"]) for r in base])
  assert mean == pytest.approx(report.summarize(scores, SLICES)["base/argmax/radial/paper/psnr"])


def _stack(seed, s=3, n=32):
  return np.random.default_rng(seed).random((s, n, n))


def test_family_figure_is_a_png_of_the_grid(tmp_path):
  path = tmp_path / "radial.png"
  target = _stack(0)
  size = report.family_figure(
    path,
    _stack(1),
    {"base": _stack(2), "distilled": _stack(3)},
    target,
    row_labels=["a", "b", "c"],
    title="radial",
  )
  # Columns: input, 2 × (recon, error), target; the error maps' colour bar beside the rows'.
  assert size == report.grid_size(3, 6, error_bar=True)
  with Image.open(path) as im:
    assert im.format == "PNG"
    assert im.size == size


def test_family_figure_with_mask_and_the_stage_scores(tmp_path):
  path = tmp_path / "radial.png"
  psnr, ssim = np.array([20.0, np.inf, np.nan]), np.array([0.5, 1.0, np.nan])
  size = report.family_figure(
    path,
    _stack(1),
    {"base": _stack(2)},
    _stack(0),
    scores={"zero_filled": (psnr, ssim), "base": (psnr, ssim)},
    mask_SHW=_stack(4) > 0.9,
  )
  # Columns: input, R = 32 mask, recon, error, target.
  assert size == report.grid_size(3, 5, error_bar=True)
  with Image.open(path) as im:
    assert im.size == size
  with pytest.raises(ValueError, match=r"scores\['base'\] must be \(psnr \[3\], ssim \[3\]\)"):
    report.family_figure(path, _stack(1), {"base": _stack(2)}, _stack(0), scores={"base": (psnr,)})
  with pytest.raises(ValueError, match="mask_SHW has shape"):
    report.family_figure(path, _stack(1), {}, _stack(0), mask_SHW=np.ones((3, 8, 8)))


def _head(n=64, shell=1.0):
  """A synthetic head: a textured brain disk, a dark skull gap, a thin bright scalp shell."""
  y, x = np.mgrid[:n, :n] - (n - 1) / 2
  r = np.hypot(x, y)
  brain = r < 0.3 * n
  image = np.where(brain, 0.5 + 0.2 * np.sin(x / 2) * np.cos(y / 3), 0.0)
  # A dark ventricle: a hole the mask fills.
  image[np.hypot(x, y - 3) < 3] = 0.02
  image[(r > 0.34 * n) & (r < 0.37 * n)] = shell
  return image + 0.01 * np.random.default_rng(0).random((n, n)), brain


def test_brain_mask_keeps_the_brain_without_the_shell_or_corners():
  for n in (64, 256):
    image, brain = _head(n)
    mask = report.brain_mask(image)
    assert mask.dtype == bool and mask.shape == (n, n)
    assert (mask & brain).sum() >= 0.95 * brain.sum()
    assert (mask & ~brain).sum() <= 0.03 * brain.sum()
    assert not mask[: n // 8, : n // 8].any() and not mask[-n // 8 :, -n // 8 :].any()
  assert not report.brain_mask(np.zeros((32, 32))).any()
  with pytest.raises(ValueError, match=r"target_HW must be \[H, W\]"):
    report.brain_mask(np.zeros((2, 32, 32)))


def test_error_maps_read_inside_the_brain(tmp_path):
  target, brain = _head()
  # An error of 0.1 inside the brain and a large one on the shell only.
  recon = np.where(brain, target + 0.1, target)
  recon = np.where(~brain & (target > 0.9), 0.0, recon)
  mask = report.brain_mask(target)
  inside = report._nrmse(recon, target, mask)
  overall = report._nrmse(recon, target, np.ones_like(mask))
  assert inside == pytest.approx(0.1 / np.sqrt(np.mean(target[mask] ** 2)), rel=0.05)
  assert overall > 2 * inside
  size = report.family_figure(tmp_path / "f.png", target[None], {"m": recon[None]}, target[None])
  assert size == report.grid_size(1, 4, error_bar=True)


def test_slice_scores_follow_the_records(scores):
  psnr, ssim = report.slice_scores(scores, "base/argmax", "radial", [2, 0, 7])
  np.testing.assert_array_equal(psnr[:2], [34.0, 30.0])
  np.testing.assert_array_equal(ssim[:2], [0.7, 0.5])
  assert np.isnan(psnr[2]) and np.isnan(ssim[2])
  psnr, _ = report.slice_scores(scores, "base/argmax", "radial", [1], protocol="fastmri")
  assert psnr[0] == 31.0
  assert np.isnan(report.slice_scores(scores, "nope/argmax", "radial", [0])[0]).all()


def test_levels_figure_and_shape_errors(tmp_path):
  path = tmp_path / "radial_levels.png"
  levels = np.random.default_rng(0).random((2, 6, 32, 32))
  size = report.levels_figure(path, _stack(1, 2), levels, _stack(0, 2))
  with Image.open(path) as im:
    assert im.size == size == report.grid_size(2, 8)
  with pytest.raises(ValueError, match=r"recons\['base'\] has shape"):
    report.family_figure(tmp_path / "x.png", _stack(1), {"base": _stack(2, 2)}, _stack(0))
  with pytest.raises(ValueError, match="levels_SKHW has shape"):
    report.levels_figure(tmp_path / "y.png", _stack(1), levels, _stack(0))
  with pytest.raises(ValueError, match="row_labels has 1 entries for 2 slices"):
    report.levels_figure(path, _stack(1, 2), levels, _stack(0, 2), row_labels=["a"])


def test_a_single_contrast_has_no_separate_all_columns(scores):
  m = report.summarize(scores, SLICES)
  text = report.family_table(m, ["zero_filled"], "radial", "paper", ["T1"], ["psnr"])
  assert text.splitlines()[0] == "| Method | T1 PSNR ↑ |"


def test_diagnostics_section_names_where_quality_is_lost():
  families = ("radial", "cartesian_y")
  ssim = {"tokenizer_all": 0.9, "tokenizer_fs": 0.7, "teacher_forced": 0.5, "rollout": 0.45}
  metrics = {}
  for diag, value in ssim.items():
    for family in families:
      metrics[f"m/{diag}/{family}/paper/ssim"] = value
      metrics[f"m/{diag}/{family}/paper/psnr"] = 20 * value
  for mode, acc in (("teacher_forced", 0.4), ("rollout", 0.3)):
    metrics[f"m/{mode}/accuracy"] = acc
    for k in range(1, 6):
      metrics[f"m/{mode}/accuracy/scale_{k}"] = acc
  text = report.diagnostics_section(
    metrics, ["m"], families, "paper", ("psnr", "ssim"), ("Q16", "Q8", "Q4", "Q2", "QFS")
  )
  label = report.DIAGNOSTIC_LABELS["tokenizer_all"]
  assert "| Decoded from | Radial PSNR ↑ | Radial SSIM ↑ |" in text
  assert f"| m: {label} | **18.00** | **0.9000** | **18.00** | **0.9000** |" in text
  # 1 → 0.9 → 0.5 → 0.45: the per-scale prediction loses the most (0.4 of 0.55).
  assert "mean over families: 0.550, most of it to the per-scale prediction (" in text
  assert (
    "(target → ceiling) 0.100; the per-scale prediction (ceiling → teacher-forced) 0.400" in text
  )
  assert "| m: free rollout | 0.300 | 0.300 | 0.300 | 0.300 | 0.300 | 0.300 |" in text


def test_report_links_its_figures_and_the_html_embeds_them(scores, tmp_path):
  (tmp_path / "figures").mkdir()
  for name in ("radial.png", "radial_base_levels.png"):
    report.levels_figure(
      tmp_path / "figures" / name, _stack(1, 1), _stack(2, 1)[:, None], _stack(0, 1)
    )
  figures = report.figures_section(
    {
      "radial": [
        ("Reconstructions", "figures/radial.png"),
        ("base: cumulative token scales", "figures/radial_base_levels.png"),
      ]
    }
  )
  text = report.render_report(
    report.summarize(scores, SLICES),
    header={"Dataset": "demo", "Models": "base ← `runs/<student>`"},
    models=["base"],
    decodings=["argmax"],
    families=["radial"],
    protocols=["paper"],
    contrasts=["T1", "T2"],
    metric_names=["psnr"],
    figures=figures,
  )
  assert text.rstrip().split("\n## ")[-1].startswith("Figures\n")
  links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
  assert links == ["figures/radial.png", "figures/radial_base_levels.png"]
  assert all((tmp_path / link).is_file() for link in links)

  page = report.write_html(tmp_path / "report.html", text).read_text()
  assert page.startswith("<!DOCTYPE html>") and "<title>Evaluation</title>" in page
  sources = re.findall(r'src="([^"]*)"', page)
  assert len(sources) == 2 and all(s.startswith("data:image/png;base64,") for s in sources)
  for src, link in zip(sources, links, strict=True):
    assert base64.b64decode(src.split(",", 1)[1]) == (tmp_path / link).read_bytes()
  assert not re.search(r"(src|href)=\"(?!data:)", page)
  # The Markdown subset: headings, bullets with bold and code, pipe tables with alignment.
  assert "<h1>Evaluation</h1>" in page and "<h2>Winners</h2>" in page
  assert "<li><strong>Models</strong>: base ← <code>runs/&lt;student&gt;</code></li>" in page
  assert '<th style="text-align:center">T1 PSNR ↑</th>' in page
  assert "<td>Zero-filled (R = 32)</td>" in page
  assert "<strong>" in page.split("<h3>radial (decoding: argmax)</h3>")[1]
  assert not [line for line in page.splitlines() if line.startswith("|")]


def test_markdown_html_escapes_and_names_a_missing_image(tmp_path):
  body = report.markdown_html("a <b> & `x|y`\n\n![gone](figures/gone.png)", tmp_path)
  assert body == (
    "<p>a &lt;b&gt; &amp; <code>x|y</code></p>\n<p><em>[missing figure: figures/gone.png]</em></p>"
  )
