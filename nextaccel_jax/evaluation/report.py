"""Tables, per-slice CSV, figure grids and the HTML page of the evaluation stage, as pure
functions of scores and images.

Shape legend: S slices, K decoded levels, H×W image grid.

Inputs (the evaluation stage builds them; tests can write them by hand):

- `scores`: `{row: {family: {"record": int [N], "<protocol>/<metric>": float [N]}}}`. A row is
  `"zero_filled"` or `"<model>/<decoding>"` (`row_name`). Under a per-volume protocol
  (`VOLUME_PROTOCOLS`, i.e. `fastmri`) every slice carries the value of its volume.
- `slices`: `{record: {"file_name": str, "slice_index": int, "contrast": str}}` for every
  record that appears in `scores`.

`summarize` turns them into the flat metrics dict that `metrics.json` holds and the tables read:
`<row>/<family>/<protocol>/<metric>` (mean over all contrasts), with `_std` for the population
standard deviation, `/n` for the number of slices (volumes under `fastmri`) and the same keys with
a contrast inserted before the metric (`base/argmax/radial/paper/T1/ssim`). Non-finite values
(PSNR is +inf for an exact reconstruction) are left out of means; `_nonfinite` keys count them.

`family_figure` and `levels_figure` draw the PNG grids (error maps read inside `brain_mask`),
`figures_section` links them from the report, and `write_html` turns the report's Markdown into
one self-contained page with the figures embedded.
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import html
import mimetypes
import os
import pathlib
import re
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib import cm, colormaps, colors
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from scipy import ndimage

from nextaccel_jax.evaluation import metrics

ZERO_FILLED = "zero_filled"
# Protocols whose unit is the volume: means and standard deviations run over volumes.
VOLUME_PROTOCOLS = metrics.VOLUME_PROTOCOLS
ALL = "all"


def _metric_info(metric: str) -> tuple[str, bool, int]:
  """`(label, higher_is_better, decimals)` of a metric name."""
  if metric == "psnr":
    return "PSNR", True, 2
  if metric == "ssim":
    return "SSIM", True, 4
  if metric == "nmse":
    return "NMSE", False, 4
  if metric.startswith("lpips_"):
    return f"LPIPS-{metric.removeprefix('lpips_')}", False, 4
  if metric == "dists":
    return "DISTS", False, 4
  raise ValueError(f"unknown metric {metric!r}; expected psnr, ssim, nmse, lpips_<net> or dists")


def row_name(model: str, decoding: str) -> str:
  return f"{model}/{decoding}"


def split_row(row: str) -> tuple[str, str]:
  """`(model, decoding)` of a row name; the zero-filled row has decoding ""."""
  if row == ZERO_FILLED:
    return ZERO_FILLED, ""
  model, _, decoding = row.partition("/")
  return model, decoding


def row_label(row: str, with_decoding: bool = False) -> str:
  if row == ZERO_FILLED:
    return "Zero-filled (R = 32)"
  model, decoding = split_row(row)
  return f"{model} ({decoding})" if with_decoding else model


# ------------------------------------------------------------------------------------------------
# Aggregation


def _check_columns(row: str, family: str, cols: Mapping) -> np.ndarray:
  if "record" not in cols:
    raise ValueError(f"scores[{row!r}][{family!r}] has no 'record' column")
  records = np.asarray(cols["record"]).astype(np.int64)
  for key, values in cols.items():
    if key == "record":
      continue
    if key.count("/") != 1:
      raise ValueError(f"scores[{row!r}][{family!r}]: column {key!r} is not '<protocol>/<metric>'")
    if np.shape(values) != records.shape:
      raise ValueError(
        f"scores[{row!r}][{family!r}][{key!r}] has shape {np.shape(values)}, but 'record' has "
        f"{records.shape}"
      )
  return records


def _slice_field(slices: Mapping, records: np.ndarray, field: str) -> np.ndarray:
  out = []
  for r in records:
    info = slices.get(int(r))
    if info is None:
      raise ValueError(f"slices has no entry for record {int(r)}")
    if field not in info:
      raise ValueError(f"slices[{int(r)}] has no {field!r} field")
    out.append(info[field])
  return np.array(out, dtype=object)


def _stats(values: np.ndarray) -> tuple[float, float, int]:
  """Mean and population std of the finite values, and how many values were not finite."""
  values = np.asarray(values, np.float64)
  finite = values[np.isfinite(values)]
  if finite.size == 0:
    return float("nan"), float("nan"), int(values.size)
  return float(finite.mean()), float(finite.std()), int(values.size - finite.size)


def _per_volume(values: np.ndarray, volumes: np.ndarray) -> np.ndarray:
  """One value per volume: the mean of its slices' (identical) values."""
  names = sorted(set(volumes))
  return np.array([np.mean(values[volumes == v]) for v in names])


def summarize(scores: Mapping, slices: Mapping) -> dict[str, float]:
  """The flat metrics dict (see the module docstring) of per-slice scores.

  Args:
    scores: `{row: {family: {"record": [N], "<protocol>/<metric>": [N]}}}`.
    slices: `{record: {"file_name", "slice_index", "contrast"}}`.

  Returns:
    `{key: float}` with means, `_std`, `/n` and, where any, `_nonfinite` counts.

  Raises:
    ValueError: For a column that is not `<protocol>/<metric>`, a length mismatch or a record
      missing from `slices`.
  """
  out: dict[str, float] = {}
  for row, by_family in scores.items():
    for family, cols in by_family.items():
      records = _check_columns(row, family, cols)
      contrast = _slice_field(slices, records, "contrast")
      volume = _slice_field(slices, records, "file_name")
      groups = [(None, np.ones(records.shape, bool))]
      groups += [(c, contrast == c) for c in sorted(set(contrast))]
      for key, values in cols.items():
        if key == "record":
          continue
        protocol, metric = key.split("/")
        values = np.asarray(values, np.float64)
        for c, sel in groups:
          prefix = f"{row}/{family}/{protocol}" + (f"/{c}" if c is not None else "")
          v = values[sel]
          if protocol in VOLUME_PROTOCOLS:
            v = _per_volume(v, volume[sel])
          mean, std, bad = _stats(v)
          out[f"{prefix}/{metric}"] = mean
          out[f"{prefix}/{metric}_std"] = std
          out[f"{prefix}/n"] = int(v.size)
          if bad:
            out[f"{prefix}/{metric}_nonfinite"] = bad
  return out


# ------------------------------------------------------------------------------------------------
# Markdown


def _cells(
  metrics: Mapping, rows: Sequence[str], columns: Sequence[tuple[str, str]]
) -> list[list[str]]:
  """Formatted `mean ± std` cells (rows × columns) with the best value per column in bold.

  A column is `(key prefix after the row, metric)`; missing entries show as "–". Best is judged
  on the displayed (rounded) means, so equal-looking values are bold together.
  """
  table = [["–"] * len(columns) for _ in rows]
  for j, (prefix, metric) in enumerate(columns):
    _, higher, decimals = _metric_info(metric)
    means = {}
    for i, row in enumerate(rows):
      mean = metrics.get(f"{row}/{prefix}/{metric}")
      if mean is None or not np.isfinite(mean):
        continue
      std = metrics.get(f"{row}/{prefix}/{metric}_std", float("nan"))
      means[i] = round(float(mean), decimals)
      table[i][j] = f"{mean:.{decimals}f} ± {std:.{decimals}f}"
    if means:
      best = (max if higher else min)(means.values())
      for i, m in means.items():
        if m == best:
          table[i][j] = f"**{table[i][j]}**"
  return table


def _markdown(header: Sequence[str], labels: Sequence[str], cells: list[list[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "| --- |" + " :-: |" * (len(header) - 1)]
  for label, row in zip(labels, cells, strict=True):
    lines.append("| " + " | ".join([label, *row]) + " |")
  return "\n".join(lines)


def _metric_header(metric: str) -> str:
  label, higher, _ = _metric_info(metric)
  return f"{label} {'↑' if higher else '↓'}"


def family_table(
  metrics: Mapping,
  rows: Sequence[str],
  family: str,
  protocol: str,
  contrasts: Sequence[str],
  metric_names: Sequence[str],
) -> str:
  """One markdown table like the paper's: rows = methods, columns = contrast × metric + "all".

  Args:
    metrics: the flat dict of `summarize`.
    rows: row names, top to bottom (normally the zero-filled row, then the models).
    family: the mask family.
    protocol: the metric protocol.
    contrasts: contrast names (columns), in order; "all" is appended when there are several.
    metric_names: metrics per contrast, e.g. `("psnr", "ssim", "lpips_alex")`.
  """
  columns, header = [], ["Method"]
  # With one contrast its columns already are the "all" columns.
  groups = (*contrasts, ALL) if len(contrasts) != 1 else tuple(contrasts)
  for c in groups:
    prefix = f"{family}/{protocol}" + ("" if c == ALL else f"/{c}")
    for m in metric_names:
      columns.append((prefix, m))
      header.append(f"{c} {_metric_header(m)}")
  labels = [row_label(r) for r in rows]
  return _markdown(header, labels, _cells(metrics, rows, columns))


def decoding_table(
  metrics: Mapping,
  rows: Sequence[str],
  families: Sequence[str],
  protocol: str,
  metric_names: Sequence[str],
) -> str:
  """Markdown table of decoding variants: rows = model × decoding, columns = family × metric
  over all contrasts."""
  columns, header = [], ["Model (decoding)"]
  for f in families:
    for m in metric_names:
      columns.append((f"{f}/{protocol}", m))
      header.append(f"{f} {_metric_header(m)}")
  labels = [row_label(r, with_decoding=True) for r in rows]
  return _markdown(header, labels, _cells(metrics, rows, columns))


# Mask families under the names the paper's tables print.
PAPER_FAMILY_NAMES = {
  "gaussian_2d": "Gaussian-VD",
  "cartesian_x": "ES Cartesian-X",
  "cartesian_y": "ES Cartesian-Y",
  "radial": "Radial",
}


def ablation_table(
  metrics: Mapping,
  rows: Sequence[str],
  labels: Sequence[str],
  families: Sequence[str],
  protocol: str,
  metric_names: Sequence[str],
  first_header: str = "Variant",
) -> str:
  """The paper's Table 4 layout: rows = variants, one column group per mask family with each
  metric's mean over all contrasts (the `summarize` keys without a contrast), means only, the
  best value per column in bold (judged on the displayed rounding, so ties are bold together).

  Args:
    metrics: the flat dict of `summarize`; rows of several evaluations may be merged into it.
    rows: row names (`row_name(model, decoding)`), top to bottom.
    labels: what the first column shows for each row, e.g. "w/o Cross-Attention".
    families: mask families, one column group each, in order.
    protocol: the metric protocol.
    metric_names: the metrics of every group, e.g. `("psnr", "ssim", "lpips_alex")`.
    first_header: the first column's heading.
  """
  if len(labels) != len(rows):
    raise ValueError(f"{len(rows)} rows but {len(labels)} labels")
  header = [first_header]
  cells = [[] for _ in rows]
  for family in families:
    for metric in metric_names:
      header.append(f"{PAPER_FAMILY_NAMES.get(family, family)} {_metric_header(metric)}")
      _, higher, decimals = _metric_info(metric)
      shown = {}
      for i, row in enumerate(rows):
        mean = metrics.get(f"{row}/{family}/{protocol}/{metric}")
        if mean is not None and np.isfinite(mean):
          shown[i] = round(float(mean), decimals)
      best = (max if higher else min)(shown.values()) if shown else None
      for i in range(len(rows)):
        text = f"{shown[i]:.{decimals}f}" if i in shown else "–"
        cells[i].append(f"**{text}**" if i in shown and shown[i] == best else text)
  return _markdown(header, labels, cells)


def winners(
  metrics: Mapping, rows: Sequence[str], family: str, protocol: str, metric: str
) -> tuple[list[str], float | None]:
  """`(rows, value)`: the rows with the best mean of `metric` over all contrasts, judged on the
  displayed rounding as the tables' bold is (so ties are all listed); `([], None)` when no row
  has a finite value."""
  _, higher, decimals = _metric_info(metric)
  means = {}
  for row in rows:
    value = metrics.get(f"{row}/{family}/{protocol}/{metric}")
    if value is not None and np.isfinite(value):
      means[row] = round(float(value), decimals)
  if not means:
    return [], None
  best = (max if higher else min)(means.values())
  return [r for r, m in means.items() if m == best], best


def winners_table(
  metrics: Mapping,
  rows: Sequence[str],
  families: Sequence[str],
  protocols: Sequence[str],
  metric_names: Sequence[str],
) -> str:
  """Markdown table of which row wins each metric: one line per mask family × protocol, one
  column per metric, each cell the winning row(s) and the value (`winners`)."""
  header = ["Mask", "Protocol", *(_metric_header(m) for m in metric_names)]
  labels, cells = [], []
  for family in families:
    for protocol in protocols:
      line = [f"`{protocol}`"]
      for metric in metric_names:
        best_rows, value = winners(metrics, rows, family, protocol, metric)
        decimals = _metric_info(metric)[2]
        names = ", ".join(row_label(r) for r in best_rows)
        line.append(f"{names} ({value:.{decimals}f})" if best_rows else "–")
      labels.append(family)
      cells.append(line)
  return _markdown(header, labels, cells)


# What each diagnostic row decodes (`inference.DIAGNOSTICS`), as the report labels it.
DIAGNOSTIC_LABELS = {
  "tokenizer_all": "tokenizer: true tokens, all six levels",
  "tokenizer_fs": "tokenizer: true tokens, FS level alone",
  "teacher_forced": "teacher-forced: argmax over the true prefix",
  "rollout": "free rollout (argmax)",
}
# The steps from the target down to the rollout: (from row, to row, what loses the SSIM between,
# the two ends).
_LOSS_STEPS = (
  (None, "tokenizer_all", "the tokenizer", "target → ceiling"),
  ("tokenizer_all", "teacher_forced", "the per-scale prediction", "ceiling → teacher-forced"),
  ("teacher_forced", "rollout", "reading its own tokens", "teacher-forced → rollout"),
)


def _family_mean(metrics: Mapping, row: str, families: Sequence[str], protocol: str, metric: str):
  values = [metrics.get(f"{row}/{f}/{protocol}/{metric}") for f in families]
  values = [v for v in values if v is not None and np.isfinite(v)]
  return float(np.mean(values)) if values else None


def diagnostics_section(
  metrics: Mapping,
  models: Sequence[str],
  families: Sequence[str],
  protocol: str,
  metric_names: Sequence[str],
  scale_names: Sequence[str],
) -> str:
  """Markdown of where each model loses quality: its diagnostic rows (`<model>/<diagnostic>`,
  `DIAGNOSTIC_LABELS`) per family, the token accuracy per scale of the teacher-forced and free
  predictions (`<model>/<mode>/accuracy/scale_<k>` in `metrics`, k from 1) and a line naming the
  step that loses the most SSIM (family means).

  Args:
    metrics: the flat dict of `summarize` for the diagnostic rows, plus the accuracy keys.
    models: the transformer models diagnosed.
    families, protocol, metric_names: as in `ablation_table`.
    scale_names: names of the predicted scales, e.g. `("Q16", "Q8", "Q4", "Q2", "QFS")`.
  """
  lines = [
    "Each model's decoder fed ever less true information (the `diagnostics` rows of "
    "`metrics.json`): the tokenizer's ceiling, one teacher-forced pass, the free rollout. The "
    "largest drop in a column is where quality is lost.",
  ]
  rows = [f"{m}/{d}" for m in models for d in DIAGNOSTIC_LABELS]
  labels = [f"{m}: {DIAGNOSTIC_LABELS[d]}" for m in models for d in DIAGNOSTIC_LABELS]
  table = ablation_table(metrics, rows, labels, families, protocol, metric_names, "Decoded from")
  lines += ["", table]
  if "ssim" in metric_names:
    lines.append("")
    for m in models:
      ssim = {
        d: _family_mean(metrics, f"{m}/{d}", families, protocol, "ssim") for d in DIAGNOSTIC_LABELS
      }
      if any(v is None for v in ssim.values()):
        continue
      drops = [(1.0 if a is None else ssim[a]) - ssim[b] for a, b, _, _ in _LOSS_STEPS]
      worst = int(np.argmax(drops))
      steps = "; ".join(
        f"{what} ({ends}) {d:.3f}" for (_, _, what, ends), d in zip(_LOSS_STEPS, drops, strict=True)
      )
      lines.append(
        f"- **{m}**: SSIM lost from the target to the rollout, mean over families: "
        f"{1.0 - ssim['rollout']:.3f}, most of it to {_LOSS_STEPS[worst][2]} ({steps})."
      )
  header = ["Token accuracy", *scale_names, "all"]
  acc_labels, cells = [], []
  for m in models:
    for mode, label in (("teacher_forced", "teacher-forced"), ("rollout", "free rollout")):
      key = f"{m}/{mode}/accuracy"
      if key not in metrics:
        continue
      acc_labels.append(f"{m}: {label}")
      per = [metrics.get(f"{key}/scale_{k + 1}") for k in range(len(scale_names))]
      cells.append([f"{v:.3f}" if v is not None else "–" for v in per] + [f"{metrics[key]:.3f}"])
  if cells:
    lines += ["", _markdown(header, acc_labels, cells)]
  return "\n".join(lines)


def render_report(
  metrics: Mapping,
  *,
  header: Mapping[str, str],
  models: Sequence[str],
  decodings: Sequence[str],
  families: Sequence[str],
  protocols: Sequence[str],
  contrasts: Sequence[str],
  metric_names: Sequence[str],
  title: str = "Evaluation",
  single_decoding: Sequence[str] = (),
  diagnostics: str = "",
  figures: str = "",
) -> str:
  """The whole `report.md`.

  Args:
    metrics: the flat dict of `summarize`.
    header: `{field: text}` lines of the header, in order (dataset, split, models, ...).
    models: model names in row order.
    decodings: decoding variants; the first fills the per-family tables.
    families, protocols: what was evaluated.
    contrasts: contrast names present, in dataset order.
    metric_names: metrics of the tables, e.g. `("psnr", "ssim", "lpips_alex")`.
    title: the level-1 heading.
    single_decoding: models scored under the first decoding only (the baselines, which sample
      no tokens); they are left out of the decoding-variant tables.
    diagnostics: `diagnostics_section`'s markdown, shown after the winners ("" for none).
    figures: `figures_section`'s markdown, the last section ("" for none).
  """
  lines = [f"# {title}", ""]
  lines += [f"- **{k}**: {v}" for k, v in header.items()]
  lines.append("")
  lines.append(
    "Mean ± std (population). The `paper` protocol scores each slice with both images over their "
    "own maximum; `fastmri` scores whole volumes (data range = target volume maximum), so its "
    "mean and std run over volumes. Best value per column in bold."
  )
  main_rows = [ZERO_FILLED] + [row_name(m, decodings[0]) for m in models]
  all_rows = [row_name(m, d) for m in models if m not in single_decoding for d in decodings]
  lines += ["", "## Winners", ""]
  lines.append(
    f"The best row of each mask family's table (all contrasts, decoding: {decodings[0]}) per "
    "metric and protocol; ties list every row."
  )
  lines += ["", winners_table(metrics, main_rows, families, protocols, metric_names)]
  if diagnostics:
    lines += ["", "## Where quality is lost", "", diagnostics]
  for protocol in protocols:
    lines += ["", f"## Protocol `{protocol}`"]
    for family in families:
      lines += ["", f"### {family} (decoding: {decodings[0]})", ""]
      lines.append(family_table(metrics, main_rows, family, protocol, contrasts, metric_names))
    if len(decodings) > 1 and all_rows:
      lines += ["", f"### Decoding variants (`{protocol}`, all contrasts)", ""]
      lines.append(decoding_table(metrics, all_rows, families, protocol, metric_names))
  bad = sorted(k for k in metrics if k.endswith("_nonfinite"))
  if bad:
    lines += ["", "Non-finite values left out of the means:"]
    lines += [f"- `{k.removesuffix('_nonfinite')}`: {int(metrics[k])}" for k in bad]
  if figures:
    lines += ["", "## Figures", "", figures]
  return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# CSV

CSV_META = ("model", "decoding", "family", "record", "file_name", "slice_index", "contrast")


def csv_rows(scores: Mapping, slices: Mapping) -> tuple[list[str], list[dict]]:
  """`(columns, rows)` of the per-slice table: one row per row-name × family × slice.

  Score columns are `<protocol>_<metric>`, sorted; a score a row lacks is left empty.
  """
  score_keys = sorted(
    {k for by_family in scores.values() for cols in by_family.values() for k in cols} - {"record"}
  )
  columns = list(CSV_META) + [k.replace("/", "_") for k in score_keys]
  out = []
  for row, by_family in scores.items():
    model, decoding = split_row(row)
    for family, cols in by_family.items():
      records = _check_columns(row, family, cols)
      for i, r in enumerate(records):
        info = slices.get(int(r))
        if info is None:
          raise ValueError(f"slices has no entry for record {int(r)}")
        line = {
          "model": model,
          "decoding": decoding,
          "family": family,
          "record": int(r),
          "file_name": info["file_name"],
          "slice_index": int(info["slice_index"]),
          "contrast": info["contrast"],
        }
        for k in score_keys:
          line[k.replace("/", "_")] = repr(float(cols[k][i])) if k in cols else ""
        out.append(line)
  return columns, out


def write_csv(path: str | os.PathLike, scores: Mapping, slices: Mapping) -> int:
  """Writes `per_slice.csv`; returns the number of data rows."""
  columns, rows = csv_rows(scores, slices)
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
  return len(rows)


# ------------------------------------------------------------------------------------------------
# Figures

# Pixel layout of the grids: square panels, each over a strip for its caption, under a strip of
# titles (the figure's title, a note on its scales, the column titles), one grey colour bar beside
# each row and, with error maps, one colour bar for all of them.
PANEL_PX = 160
CAPTION_PX = 14
TITLE_PX = 52
BAR_PX = 56
ERROR_BAR_PX = 64
_DPI = 100
# Brain-mask outline (a bright blue that stands out on grey and on inferno's yellows) and the
# text drawn on panels.
_OUTLINE = "#00b4ff"
_FONT = 6.5
# The error maps' colour range: this percentile of the in-brain errors of the whole figure, so
# the brain's errors fill the scale and the edges of the head saturate instead of setting it.
ERROR_PERCENTILE = 99.0


def grid_size(rows: int, cols: int, error_bar: bool = False) -> tuple[int, int]:
  """`(width, height)` in pixels of a figure grid with `rows` × `cols` panels (`error_bar`: with
  the error maps' colour bar)."""
  width = cols * PANEL_PX + BAR_PX + (ERROR_BAR_PX if error_bar else 0)
  return width, rows * (PANEL_PX + CAPTION_PX) + TITLE_PX


def _disk(radius: int) -> np.ndarray:
  y, x = np.mgrid[-radius : radius + 1, -radius : radius + 1]
  return x * x + y * y <= radius * radius


def brain_mask(target_HW, threshold: float = 0.1, opening: float = 0.04) -> np.ndarray:
  """The brain of a fully sampled magnitude image, without the scalp and skull around it.

  The rule: keep the pixels above `threshold` × the image's maximum; open that set with a disk
  of radius `max(1, round(opening · min(H, W)))` pixels (3 at 64², 10 at 256²), which removes the
  thin bright shell of scalp fat and any thin bridge between it and the brain; keep the largest
  connected component and fill its holes (dark ventricles, CSF). If the opening leaves nothing
  (an object thinner than the disk) the largest component of the thresholded set is used.

  Args:
    target_HW: fully sampled magnitudes `[H, W]`.
    threshold: the fraction of the maximum a brain pixel exceeds.
    opening: the disk radius as a fraction of the shorter image side.

  Returns:
    bool `[H, W]`; all False for an image without a positive value.
  """
  target = np.asarray(target_HW, np.float64)
  if target.ndim != 2:
    raise ValueError(f"target_HW must be [H, W], got shape {target.shape}")
  peak = target.max(initial=0.0)
  if not peak > 0:
    return np.zeros(target.shape, bool)
  above = target > threshold * peak
  radius = max(1, round(opening * min(target.shape)))
  labels, count = ndimage.label(ndimage.binary_opening(above, structure=_disk(radius)))
  if count == 0:
    labels, count = ndimage.label(above)
  sizes = ndimage.sum_labels(np.ones(target.shape), labels, index=np.arange(1, count + 1))
  return ndimage.binary_fill_holes(labels == 1 + int(np.argmax(sizes)))


def _nrmse(pred_HW: np.ndarray, target_HW: np.ndarray, where: np.ndarray) -> float:
  """`‖pred − target‖ / ‖target‖` over the pixels of `where` (NaN without target energy)."""
  energy = float(np.sum(target_HW[where] ** 2))
  if not energy > 0:
    return float("nan")
  return float(np.sqrt(np.sum((pred_HW[where] - target_HW[where]) ** 2) / energy))


def slice_scores(
  scores: Mapping, row: str, family: str, records: Sequence[int], protocol: str = "paper"
) -> tuple[np.ndarray, np.ndarray]:
  """`(psnr [S], ssim [S])` of `records` from the stage's per-slice `scores` (see the module
  docstring) under `protocol`; NaN where a record or the row has no score."""
  out = np.full((2, len(records)), np.nan)
  cols = scores.get(row, {}).get(family)
  if cols is None or "record" not in cols:
    return out[0], out[1]
  where = {int(r): i for i, r in enumerate(np.asarray(cols["record"]))}
  for j, metric in enumerate(("psnr", "ssim")):
    values = cols.get(f"{protocol}/{metric}")
    if values is None:
      continue
    for s, r in enumerate(records):
      if int(r) in where:
        out[j, s] = float(values[where[int(r)]])
  return out[0], out[1]


def _number(value: float, decimals: int) -> str:
  if np.isnan(value):
    return "–"
  return "∞" if np.isinf(value) else f"{value:.{decimals}f}"


def _score_caption(pair, s: int) -> str:
  if pair is None:
    return ""
  return f"PSNR {_number(pair[0][s], 2)} · SSIM {_number(pair[1][s], 3)}"


def _computed_scores(target: np.ndarray, images: Mapping[str, np.ndarray]) -> dict:
  """Per-slice `paper` PSNR / SSIM of each stack against `target`, for figures drawn without the
  stage's scores; none where the images are too small for the SSIM window."""
  out = {}
  for name, x in images.items():
    try:
      s = metrics.evaluate_slices(target, x, "paper")
    except ValueError:
      return {}
    out[name] = (s["psnr"], s["ssim"])
  return out


def _check_stack(name: str, x, shape=None) -> np.ndarray:
  x = np.asarray(x, np.float64)
  if x.ndim != 3:
    raise ValueError(f"{name} must be [S, H, W] magnitudes, got shape {x.shape}")
  if shape is not None and x.shape != shape:
    raise ValueError(f"{name} has shape {x.shape}, expected {shape} like the target")
  return x


@dataclasses.dataclass
class _Panel:
  """One image of a grid, drawn over `[0, vmax]`."""

  image: np.ndarray
  cmap: str = "gray"
  vmax: float = 1.0
  caption: str = ""
  outline: np.ndarray | None = None


def _style_bar(bar, label: str = "") -> None:
  bar.outline.set_edgecolor("white")
  bar.outline.set_linewidth(0.5)
  bar.ax.tick_params(colors="white", labelsize=_FONT - 0.5, length=2, width=0.5, pad=1)
  if label:
    bar.set_label(label, color="white", fontsize=_FONT, labelpad=2)


def _row_image(row: Sequence[_Panel]) -> tuple[np.ndarray, np.ndarray | None]:
  """A row's panels side by side as one RGBA image `[H, cols · W, 4]` (uint8), and their
  outlines as one mask of the same grid (None without any)."""
  h, w = row[0].image.shape
  rgba = np.zeros((h, len(row) * w, 4), np.uint8)
  outline = np.zeros((h, len(row) * w), np.float32)
  for j, p in enumerate(row):
    if p.image.shape != (h, w):
      raise ValueError(f"panel {j} has shape {p.image.shape}, expected {(h, w)}")
    scaled = np.clip(np.nan_to_num(p.image / p.vmax), 0.0, 1.0)
    rgba[:, j * w : (j + 1) * w] = colormaps[p.cmap](scaled, bytes=True)
    if p.outline is not None:
      # A one-pixel margin keeps a mask that reaches the border from joining its neighbour's.
      outline[1:-1, j * w + 1 : (j + 1) * w - 1] = p.outline[1:-1, 1:-1]
  return rgba, (outline if outline.any() else None)


def _draw_grid(
  path: str | os.PathLike,
  panels: list[list[_Panel]],
  titles: Sequence[str],
  row_labels: Sequence[str],
  title: str,
  note: str,
  row_peaks: Sequence[float],
  error_max: float | None = None,
) -> tuple[int, int]:
  """Draws the panels under their column titles with each panel's caption below it, a grey
  colour bar per row (0 … that row's target maximum, the range of its image panels) and, with
  `error_max`, one colour bar for the error maps; returns the pixel size.

  Each row is one image in one axes: an axes per panel costs most of the drawing time.
  """
  rows, cols = len(panels), len(titles)
  width, height = grid_size(rows, cols, error_bar=error_max is not None)
  fig = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI, facecolor="black")
  # Agg directly, without pyplot: no global backend or figure registry is touched.
  FigureCanvasAgg(fig)
  fig.text(0.5, 1 - 11 / height, title, ha="center", va="center", color="white", fontsize=8)
  fig.text(0.5, 1 - 26 / height, note, ha="center", va="center", color="#c8c8c8", fontsize=_FONT)
  for j, text in enumerate(titles):
    x = (j + 0.5) * PANEL_PX / width
    fig.text(x, 1 - 43 / height, text, ha="center", va="center", color="white", fontsize=7)
  panel_w, panel_h = PANEL_PX / width, PANEL_PX / height
  box = dict(facecolor="black", alpha=0.6, edgecolor="none", pad=1.0)
  for i, row in enumerate(panels):
    top = TITLE_PX + i * (PANEL_PX + CAPTION_PX)
    bottom = 1 - (top + PANEL_PX) / height
    ax = fig.add_axes((0.0, bottom, cols * panel_w, panel_h))
    rgba, outline = _row_image(row)
    h, w = row[0].image.shape
    # Nearest keeps small images crisp when enlarged; larger ones are filtered when shrunk.
    smooth = "nearest" if max(h, w) <= PANEL_PX else "antialiased"
    ax.imshow(rgba, interpolation=smooth, aspect="auto")
    if outline is not None:
      ax.contour(outline, levels=[0.5], colors=_OUTLINE, linewidths=0.7)
      ax.set_xlim(-0.5, cols * w - 0.5)
      ax.set_ylim(h - 0.5, -0.5)
    ax.set_axis_off()
    y = 1 - (top + PANEL_PX + CAPTION_PX / 2) / height
    for j, p in enumerate(row):
      if p.caption:
        x = (j + 0.5) * panel_w
        fig.text(x, y, p.caption, ha="center", va="center", color="white", fontsize=_FONT)
    if row_labels:
      x, y = 3 / width, bottom + panel_h - 3 / height
      fig.text(x, y, row_labels[i], ha="left", va="top", color="yellow", fontsize=6, bbox=box)
    cax = fig.add_axes(
      (cols * panel_w + 8 / width, bottom + 0.1 * panel_h, 8 / width, 0.8 * panel_h)
    )
    peak = float(row_peaks[i])
    bar = fig.colorbar(cm.ScalarMappable(colors.Normalize(0.0, peak), "gray"), cax=cax)
    bar.set_ticks([0.0, peak / 2, peak])
    bar.set_ticklabels(["0", f"{peak / 2:.3g}", f"{peak:.3g}"])
    _style_bar(bar)
  if error_max is not None:
    left = (cols * PANEL_PX + BAR_PX + 8) / width
    span = (height - TITLE_PX - CAPTION_PX) / height
    cax = fig.add_axes(
      (left, CAPTION_PX / height + 0.05 * panel_h, 10 / width, span - 0.1 * panel_h)
    )
    bar = fig.colorbar(cm.ScalarMappable(colors.Normalize(0.0, error_max), "inferno"), cax=cax)
    _style_bar(bar, "|error| / target max")
    bar.ax.yaxis.set_label_position("left")
  # A light compression: a third of the default's encoding time for files a tenth larger.
  fig.savefig(path, dpi=_DPI, facecolor="black", pil_kwargs={"compress_level": 3})
  return width, height


def family_figure(
  path: str | os.PathLike,
  input_SHW,
  recons: Mapping[str, np.ndarray],
  target_SHW,
  *,
  row_labels: Sequence[str] = (),
  title: str = "",
  scores: Mapping[str, tuple] | None = None,
  mask_SHW=None,
  protocol: str = "paper",
) -> tuple[int, int]:
  """PNG grid: rows = slices; columns = R = 32 input, its sampling mask (with `mask_SHW`), each
  model's reconstruction and its error map |recon − target|, target.

  Every image panel of a row is shown over `[0, target maximum]` (the row's grey colour bar).
  The error maps share one scale, the `ERROR_PERCENTILE` of their errors inside the brain masks
  (`brain_mask` of each target, outlined on the error maps and the target). Each reconstruction
  and the input carry their PSNR / SSIM, each error map the NRMSE inside the brain mask and over
  the whole image.

  Args:
    path: the PNG to write.
    input_SHW: zero-filled R = 32 magnitudes.
    recons: `{column name: [S, H, W] magnitudes}` in column order.
    target_SHW: fully sampled magnitudes.
    row_labels: one short label per slice (drawn on the input panel).
    title: the figure's title line.
    scores: `{column name: (psnr [S], ssim [S])}`, the input's under `ZERO_FILLED` (the stage
      passes its own per-slice scores, `slice_scores`); None scores every panel here under the
      `paper` protocol.
    mask_SHW: the R = 32 sampling mask of each slice (centred k-space, nonzero = sampled).
    protocol: the protocol `scores` come from (named in the note line).

  Returns:
    `(width, height)` of the PNG in pixels
    (`grid_size(S, 2 + 2 · len(recons) + (mask given), error_bar=True)`).
  """
  target = _check_stack("target_SHW", target_SHW)
  inp = _check_stack("input_SHW", input_SHW, target.shape)
  recons = {k: _check_stack(f"recons[{k!r}]", v, target.shape) for k, v in recons.items()}
  sampled = None if mask_SHW is None else _check_stack("mask_SHW", mask_SHW, target.shape) > 0
  num = target.shape[0]
  if row_labels and len(row_labels) != num:
    raise ValueError(f"row_labels has {len(row_labels)} entries for {num} slices")
  if scores is None:
    scores = _computed_scores(target, {ZERO_FILLED: inp, **recons})
    protocol = "paper"
  for name, pair in scores.items():
    if len(pair) != 2 or any(np.shape(v) != (num,) for v in pair):
      raise ValueError(f"scores[{name!r}] must be (psnr [{num}], ssim [{num}])")
  peak = np.maximum(target.max(axis=(1, 2)), 1e-12)
  brains = np.stack([brain_mask(t) for t in target])
  errors = {k: np.abs(v - target) / peak[:, None, None] for k, v in recons.items()}
  inside = [e[brains] for e in errors.values()]
  inside = np.concatenate(inside) if inside else np.zeros(0)
  if inside.size:
    err_max = float(np.percentile(inside, ERROR_PERCENTILE))
  else:
    err_max = max([float(e.max()) for e in errors.values()] + [0.0])
  err_max = max(err_max, 1e-6)
  panels = []
  for s in range(num):
    row = [_Panel(inp[s] / peak[s], caption=_score_caption(scores.get(ZERO_FILLED), s))]
    if sampled is not None:
      row.append(_Panel(sampled[s], caption=f"{100 * sampled[s].mean():.1f} % of k-space"))
    for k, v in recons.items():
      brain = _number(_nrmse(v[s], target[s], brains[s]), 3)
      overall = _number(_nrmse(v[s], target[s], np.ones_like(brains[s])), 3)
      row.append(_Panel(v[s] / peak[s], caption=_score_caption(scores.get(k), s)))
      caption = f"NRMSE brain {brain} · all {overall}"
      row.append(_Panel(errors[k][s], "inferno", err_max, caption=caption, outline=brains[s]))
    row.append(_Panel(target[s] / peak[s], outline=brains[s]))
    panels.append(row)
  titles = ["R = 32 input"] + (["R = 32 mask"] if sampled is not None else [])
  for k in recons:
    titles += [k, f"|error| {k}"]
  titles.append("target (FS)")
  note = (
    f"PSNR / SSIM: {protocol} protocol; error scale 0 … {err_max:.3g} of the target maximum "
    f"({ERROR_PERCENTILE:g}th percentile in the brain); blue outline: brain mask"
  )
  return _draw_grid(path, panels, titles, row_labels, title, note, peak, err_max)


def levels_figure(
  path: str | os.PathLike,
  input_SHW,
  levels_SKHW,
  target_SHW,
  *,
  level_names: Sequence[str] = (),
  row_labels: Sequence[str] = (),
  title: str = "",
) -> tuple[int, int]:
  """PNG grid of the cumulative per-scale decodings: rows = slices; columns = R = 32 input,
  level 0..K−1 (the image the first k + 1 token scales decode to), target.

  Every image panel of a row is shown over `[0, target maximum]` (the row's grey colour bar);
  the input and each level carry their `paper` PSNR / SSIM against the target.

  Returns:
    `(width, height)` of the PNG in pixels (`grid_size(S, K + 2)`).
  """
  target = _check_stack("target_SHW", target_SHW)
  inp = _check_stack("input_SHW", input_SHW, target.shape)
  levels = np.asarray(levels_SKHW, np.float64)
  if levels.ndim != 4 or levels.shape[:1] + levels.shape[2:] != target.shape:
    raise ValueError(
      f"levels_SKHW has shape {levels.shape}; expected [S, K, H, W] with target's S, H, W"
    )
  k = levels.shape[1]
  names = list(level_names) or [f"scales ≤ {i}" for i in range(k)]
  if len(names) != k:
    raise ValueError(f"level_names has {len(names)} entries for {k} levels")
  if row_labels and len(row_labels) != target.shape[0]:
    raise ValueError(f"row_labels has {len(row_labels)} entries for {target.shape[0]} slices")
  scores = _computed_scores(target, {ZERO_FILLED: inp} | {i: levels[:, i] for i in range(k)})
  peak = np.maximum(target.max(axis=(1, 2)), 1e-12)
  panels = []
  for s in range(target.shape[0]):
    row = [_Panel(inp[s] / peak[s], caption=_score_caption(scores.get(ZERO_FILLED), s))]
    row += [
      _Panel(levels[s, i] / peak[s], caption=_score_caption(scores.get(i), s)) for i in range(k)
    ]
    row.append(_Panel(target[s] / peak[s]))
    panels.append(row)
  titles = ["R = 32 input", *names, "target (FS)"]
  note = "PSNR / SSIM: paper protocol against the target"
  return _draw_grid(
    path, panels, titles, row_labels, title or "cumulative token scales", note, peak
  )


def figures_section(figures: Mapping[str, Sequence[tuple[str, str]]]) -> str:
  """Markdown of the report's figures: a note on how to read them, then per group (a mask
  family) each figure's caption and image link.

  Args:
    figures: `{group: [(caption, path relative to the report)]}`, in order.
  """
  lines = [
    "Rows are slices spread over the split's volumes and contrasts. The image panels of a row "
    "are shown over 0 … its target's maximum (the grey bar beside the row); the input and every "
    "reconstruction carry their PSNR / SSIM, every error map |x − target| its NRMSE inside the "
    "brain mask (outlined; from the fully sampled target, `report.brain_mask`) and over the "
    "whole image. The error maps of a figure share one colour scale, set by the errors inside "
    "the brain.",
  ]
  for group, items in figures.items():
    lines += ["", f"### {group}"]
    for caption, rel in items:
      lines += ["", f"{caption}:", "", f"![{caption}]({rel})"]
  return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# HTML

_INLINE = re.compile(r"`([^`]+)`|!\[([^\]]*)\]\(([^)\s]+)\)|\*\*(.+?)\*\*")
_ALIGN = {(True, True): "center", (False, True): "right", (True, False): "left"}
_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 96em; padding: 0 1em;
  color: #222; line-height: 1.4; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; }
th { background: #f2f2f2; }
.scroll { overflow-x: auto; }
code { background: #f2f2f2; padding: 0 0.2em; border-radius: 3px; }
img { max-width: 100%; height: auto; }
"""


def _data_uri(path: pathlib.Path) -> str:
  kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
  return f"data:{kind};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def _inline(text: str, base: pathlib.Path) -> str:
  """Inline Markdown (code, images, bold) of one line as HTML; images are embedded."""
  out, pos = [], 0
  for m in _INLINE.finditer(text):
    out.append(html.escape(text[pos : m.start()]))
    code, alt, src, bold = m.groups()
    if code is not None:
      out.append(f"<code>{html.escape(code)}</code>")
    elif src is not None:
      image = base / src
      if image.is_file():
        out.append(f'<img alt="{html.escape(alt)}" src="{_data_uri(image)}">')
      else:
        out.append(f"<em>[missing figure: {html.escape(src)}]</em>")
    else:
      out.append(f"<strong>{_inline(bold, base)}</strong>")
    pos = m.end()
  out.append(html.escape(text[pos:]))
  return "".join(out)


def _cells_of(line: str) -> list[str]:
  return [c.strip() for c in line.strip().removeprefix("|").removesuffix("|").split("|")]


def _table_html(lines: Sequence[str], base: pathlib.Path) -> str:
  header = _cells_of(lines[0])
  aligns = []
  for cell in _cells_of(lines[1]):
    aligns.append(_ALIGN.get((cell.startswith(":"), cell.endswith(":")), ""))
  aligns += [""] * (len(header) - len(aligns))

  def row(cells, tag):
    parts = []
    for cell, align in zip(cells, aligns, strict=False):
      style = f' style="text-align:{align}"' if align else ""
      parts.append(f"<{tag}{style}>{_inline(cell, base)}</{tag}>")
    return "<tr>" + "".join(parts) + "</tr>"

  body = [row(_cells_of(line), "td") for line in lines[2:]]
  return (
    '<div class="scroll"><table>\n<thead>'
    + row(header, "th")
    + "</thead>\n<tbody>\n"
    + "\n".join(body)
    + "\n</tbody></table></div>"
  )


def markdown_html(text: str, base: str | os.PathLike = ".") -> str:
  """The HTML body of the report's Markdown subset: headings, paragraphs, bullet lists, pipe
  tables (a header, an alignment line, rows), bold, inline code and images; each image is read
  from `base` / its path and embedded as a `data:` URI, so the page needs no other file."""
  base = pathlib.Path(base)
  lines = text.splitlines()
  out, i = [], 0
  while i < len(lines):
    line = lines[i]
    if not line.strip():
      i += 1
    elif line.startswith("#"):
      level = min(len(line) - len(line.lstrip("#")), 6)
      out.append(f"<h{level}>{_inline(line[level:].strip(), base)}</h{level}>")
      i += 1
    elif line.startswith("|"):
      j = i
      while j < len(lines) and lines[j].startswith("|"):
        j += 1
      if j - i >= 2:
        out.append(_table_html(lines[i:j], base))
      else:
        out.append(f"<p>{_inline(line, base)}</p>")
      i = j
    elif line.startswith("- "):
      items = []
      while i < len(lines) and lines[i].startswith("- "):
        items.append(f"<li>{_inline(lines[i][2:], base)}</li>")
        i += 1
      out.append("<ul>\n" + "\n".join(items) + "\n</ul>")
    else:
      j = i
      while j < len(lines) and lines[j].strip() and not lines[j].startswith(("#", "|", "- ")):
        j += 1
      out.append("<p>" + _inline(" ".join(s.strip() for s in lines[i:j]), base) + "</p>")
      i = j
  return "\n".join(out)


def write_html(path: str | os.PathLike, markdown_text: str) -> pathlib.Path:
  """Writes `markdown_text` (the report) as one self-contained HTML page at `path`; its images
  are read relative to `path`'s folder (where `report.md` sits) and embedded."""
  path = pathlib.Path(path)
  first = next((s for s in markdown_text.splitlines() if s.startswith("# ")), "# Report")
  page = (
    '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
    f"<title>{html.escape(first[2:].strip())}</title>\n<style>{_STYLE}</style>\n</head>\n"
    f"<body>\n{markdown_html(markdown_text, path.parent)}\n</body>\n</html>\n"
  )
  path.write_text(page, encoding="utf-8")
  return path
