"""Tables, per-slice CSV and figure grids of the evaluation stage, as pure functions of scores.

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
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence

import numpy as np

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

# Pixel layout of the grids: square panels under a strip of column titles.
PANEL_PX = 160
TITLE_PX = 40
_DPI = 100


def grid_size(rows: int, cols: int) -> tuple[int, int]:
  """`(width, height)` in pixels of a figure grid with `rows` × `cols` panels."""
  return cols * PANEL_PX, rows * PANEL_PX + TITLE_PX


def _check_stack(name: str, x, shape=None) -> np.ndarray:
  x = np.asarray(x, np.float64)
  if x.ndim != 3:
    raise ValueError(f"{name} must be [S, H, W] magnitudes, got shape {x.shape}")
  if shape is not None and x.shape != shape:
    raise ValueError(f"{name} has shape {x.shape}, expected {shape} like the target")
  return x


def _draw_grid(
  path: str | os.PathLike,
  panels: list[list[tuple[np.ndarray, str, float]]],
  titles: Sequence[str],
  row_labels: Sequence[str],
  suptitle: str,
) -> tuple[int, int]:
  """Draws `panels[row][col] = (image, cmap, vmax)` with column titles; returns the pixel size."""
  import matplotlib

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  rows, cols = len(panels), len(titles)
  width, height = grid_size(rows, cols)
  fig = plt.figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI, facecolor="black")
  try:
    fig.text(0.5, 1 - 12 / height, suptitle, ha="center", va="center", color="white", fontsize=8)
    for j, title in enumerate(titles):
      x = (j + 0.5) * PANEL_PX / width
      fig.text(x, 1 - 30 / height, title, ha="center", va="center", color="white", fontsize=7)
    for i, row in enumerate(panels):
      for j, (image, cmap, vmax) in enumerate(row):
        rect = (j * PANEL_PX / width, 1 - (TITLE_PX + (i + 1) * PANEL_PX) / height)
        ax = fig.add_axes((*rect, PANEL_PX / width, PANEL_PX / height))
        ax.imshow(image, cmap=cmap, vmin=0.0, vmax=vmax, interpolation="nearest")
        ax.set_axis_off()
        if j == 0 and row_labels:
          ax.text(2, 2, row_labels[i], color="yellow", fontsize=6, va="top", ha="left")
    fig.savefig(path, dpi=_DPI, facecolor="black")
  finally:
    plt.close(fig)
  return width, height


def family_figure(
  path: str | os.PathLike,
  input_SHW,
  recons: Mapping[str, np.ndarray],
  target_SHW,
  *,
  row_labels: Sequence[str] = (),
  title: str = "",
) -> tuple[int, int]:
  """PNG grid: rows = slices; columns = R = 32 input, each model's reconstruction and its error
  map |recon − target|, target.

  Each row is shown over its target's maximum; the error maps of the whole figure share one
  colour scale (given in the title line).

  Args:
    path: the PNG to write.
    input_SHW: zero-filled R = 32 magnitudes.
    recons: `{column name: [S, H, W] magnitudes}` in column order.
    target_SHW: fully sampled magnitudes.
    row_labels: one short label per slice (drawn on the input panel).
    title: text in front of the error-scale note.

  Returns:
    `(width, height)` of the PNG in pixels (`grid_size(S, 2 + 2 · len(recons))`).
  """
  target = _check_stack("target_SHW", target_SHW)
  inp = _check_stack("input_SHW", input_SHW, target.shape)
  recons = {k: _check_stack(f"recons[{k!r}]", v, target.shape) for k, v in recons.items()}
  if row_labels and len(row_labels) != target.shape[0]:
    raise ValueError(f"row_labels has {len(row_labels)} entries for {target.shape[0]} slices")
  peak = np.maximum(target.max(axis=(1, 2), keepdims=True), 1e-12)
  errors = {k: np.abs(v - target) / peak for k, v in recons.items()}
  err_max = max([float(e.max()) for e in errors.values()] + [1e-6])
  panels = []
  for s in range(target.shape[0]):
    row = [(inp[s] / peak[s], "gray", 1.0)]
    for k, v in recons.items():
      row += [(v[s] / peak[s], "gray", 1.0), (errors[k][s], "inferno", err_max)]
    row.append((target[s] / peak[s], "gray", 1.0))
    panels.append(row)
  titles = ["R = 32 input"]
  for k in recons:
    titles += [k, f"|error| {k}"]
  titles.append("target (FS)")
  note = f"error maps: 0 … {err_max:.3g} of the target maximum"
  return _draw_grid(path, panels, titles, row_labels, f"{title}  ({note})" if title else note)


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
  peak = np.maximum(target.max(axis=(1, 2), keepdims=True), 1e-12)
  panels = []
  for s in range(target.shape[0]):
    row = [(inp[s] / peak[s], "gray", 1.0)]
    row += [(levels[s, i] / peak[s], "gray", 1.0) for i in range(k)]
    row.append((target[s] / peak[s], "gray", 1.0))
    panels.append(row)
  titles = ["R = 32 input", *names, "target (FS)"]
  return _draw_grid(path, panels, titles, row_labels, title or "cumulative token scales")
