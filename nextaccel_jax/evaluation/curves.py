"""Training curves of a stage's `metrics.jsonl` as one PNG, for the evaluation report.

TensorBoard shows the same scalars interactively (the event files beside `metrics.jsonl`); the PNG
is what a report read on GitHub or in a notebook can show. The panels are chosen from the names
the stages log, so every stage (tokenizer, transformer, distillation, baselines) gets its own set:

- the training losses (`loss`, `*_loss`, `ce`, `kl`, `commitment`), log scale when positive;
- one panel per per-scale quantity (`acc/scale_k`, `usage/scale_k`, `ce/scale_k`, ...): training
  lines solid, validation dashed, one colour per scale;
- one panel per validation metric (SSIM, PSNR, LPIPS, ...) over the rows it was logged for
  (`recon_all`, `recon_r32`, `zero_filled`, ...), overall only (not per mask family);
- the learning rate and the gradient norm.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

_SCALE = re.compile(r"^(?P<base>.+)/scale_(?P<k>\d+)$")
_LOSSES = ("loss", "ce", "kl", "commitment")
# Not curves: counters and bookkeeping.
_SKIP = ("step_time_s", "epoch", "adv_on", "prefix_prob", "restarted_codes")
MAX_PANELS = 12


def read_metrics(path: str | os.PathLike) -> list[dict]:
  """The rows of a `metrics.jsonl` (a line cut off mid-write is skipped)."""
  rows = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(row, dict) and "step" in row:
        rows.append(row)
  return rows


def _series(rows: Sequence[dict], split: str, key: str) -> tuple[list[int], list[float]]:
  steps, values = [], []
  for r in rows:
    v = r.get(key)
    if r.get("split") == split and isinstance(v, int | float) and math.isfinite(v):
      steps.append(int(r["step"]))
      values.append(float(v))
  return steps, values


def _keys(rows: Sequence[dict], split: str) -> list[str]:
  seen: dict[str, None] = {}
  for r in rows:
    if r.get("split") == split:
      seen.update(dict.fromkeys(k for k in r if k not in ("step", "split", *_SKIP)))
  return list(seen)


def panels(rows: Sequence[dict]) -> list[dict]:
  """`[{"title", "lines": [(label, split, key, style)], "log": bool}]`: what `plot` draws."""
  train, val = _keys(rows, "train"), _keys(rows, "validation")
  out = []
  losses = [k for k in train if k in _LOSSES or k.endswith("_loss")]
  if losses:
    out.append({"title": "training losses", "lines": [(k, "train", k, "-") for k in losses]})
  bases: dict[str, list[tuple[str, str, str, str]]] = {}
  for split, keys, style in (("train", train, "-"), ("validation", val, "--")):
    for k in keys:
      m = _SCALE.match(k)
      if m:
        label = f"scale {m['k']}" + (" (val)" if split == "validation" else "")
        bases.setdefault(m["base"], []).append((label, split, k, style))
  for base, lines in bases.items():
    out.append({"title": f"{base} per scale", "lines": lines})
  overall = [k for k in val if k.count("/") <= 1 and not _SCALE.match(k) and "neg_" not in k]
  by_metric: dict[str, list[tuple[str, str, str, str]]] = {}
  for k in overall:
    row, _, metric = k.rpartition("/")
    by_metric.setdefault(metric, []).append((row or metric, "validation", k, "-o"))
  for metric, lines in by_metric.items():
    # A metric of one row is named in full (`codebook/used`), one of several by its own name.
    name = metric if len(lines) > 1 else lines[0][2]
    out.append({"title": f"validation {name}", "lines": lines})
  optim = [(k, "train", k, "-") for k in ("lr", "grad_norm") if k in train]
  if optim:
    out.append({"title": "learning rate and gradient norm", "lines": optim, "log": True})
  for p in out:
    p.setdefault("log", p["title"] == "training losses")
  return out[:MAX_PANELS]


def plot_training_curves(
  metrics_path: str | os.PathLike, out_png: str | os.PathLike, title: str
) -> bool:
  """Draws the curves of one stage run; returns False (and writes nothing) when it has none."""
  rows = read_metrics(metrics_path)
  chosen = panels(rows)
  if not chosen:
    return False
  cols = min(3, len(chosen))
  nrows = math.ceil(len(chosen) / cols)
  fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.2 * nrows), squeeze=False)
  for ax, panel in zip(axes.flat, chosen, strict=False):
    positive = True
    for label, split, key, style in panel["lines"]:
      steps, values = _series(rows, split, key)
      if steps:
        ax.plot(steps, values, style, label=label, markersize=3, linewidth=1.2)
        positive = positive and min(values) > 0
    if panel["log"] and positive:
      ax.set_yscale("log")
    ax.set_title(panel["title"], fontsize=10)
    ax.set_xlabel("step", fontsize=8)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)
    if len(panel["lines"]) > 1:
      ax.legend(fontsize=7, ncol=2 if len(panel["lines"]) > 5 else 1)
  for ax in list(axes.flat)[len(chosen) :]:
    ax.axis("off")
  fig.suptitle(title, fontsize=12)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.fspath(out_png)) or ".", exist_ok=True)
  fig.savefig(out_png, dpi=90)
  plt.close(fig)
  return True
