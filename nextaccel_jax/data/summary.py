"""Summaries of a built split: slice counts and the zero-filled quality of every level and family.

The zero-filled table is the floor every reconstruction must beat: PSNR/SSIM of `|x_R|` against
`|x_FS|` under a metric protocol, per mask family and acceleration. With nested masks it rises
monotonically from R = 32 to R = 2 (fastmri_spec.md §3.3).
"""

from __future__ import annotations

import collections

import numpy as np

from nextaccel_jax.data import masks, transforms
from nextaccel_jax.evaluation import metrics

LEVEL_NAMES = tuple(f"R{r}" for r in transforms.ACCELERATIONS)


def split_counts(source) -> dict:
  """Slices per contrast group and acquisition, and the number of distinct volumes."""
  by_acq, files = collections.Counter(), set()
  for i in range(len(source)):
    ex = source[i]
    by_acq[_text(ex["acquisition"])] += 1
    files.add(_text(ex["file_name"]))
  return {
    "slices": len(source),
    "volumes": len(files),
    "by_acquisition": dict(sorted(by_acq.items())),
  }


def zero_filled_table(source, protocol: str = "paper", max_records: int | None = None) -> dict:
  """Mean PSNR and SSIM of each zero-filled level against FS.

  Returns:
    `{family: {"R32": (psnr, ssim), ..., "R2": (psnr, ssim)}}`.
  """
  n = len(source) if max_records is None else min(max_records, len(source))
  if n == 0:
    raise ValueError("zero_filled_table: the split has no records")
  table = {}
  for fam in masks.FAMILIES:
    fid = masks.family_id(fam)
    mags = np.stack(
      [
        np.abs(transforms.channels_to_complex(np.asarray(source[i]["levels"][fid])))
        for i in range(n)
      ]
    )  # [N, 6, H, W]
    gt = mags[:, -1]
    row = {}
    for k, name in enumerate(LEVEL_NAMES):
      p = np.mean(metrics.psnr(gt, mags[:, k], protocol=protocol))
      s = np.mean(metrics.ssim(gt, mags[:, k], protocol=protocol))
      row[name] = (float(p), float(s))
    table[fam] = row
  return table


def format_table(table: dict, metric: int = 0) -> str:
  """Markdown table, rows = families, columns = R32 … R2; `metric` 0 = PSNR, 1 = SSIM."""
  lines = ["| mask | " + " | ".join(LEVEL_NAMES) + " |", "|---" * (len(LEVEL_NAMES) + 1) + "|"]
  for fam, row in table.items():
    fmt = "{:.2f}" if metric == 0 else "{:.4f}"
    lines.append(f"| {fam} | " + " | ".join(fmt.format(row[n][metric]) for n in LEVEL_NAMES) + " |")
  return "\n".join(lines)


def is_monotone(table: dict, metric: int = 0) -> bool:
  """True when every family's metric strictly rises from R = 32 to R = 2."""
  return all(
    all(row[a][metric] < row[b][metric] for a, b in zip(LEVEL_NAMES, LEVEL_NAMES[1:], strict=False))
    for row in table.values()
  )


def _text(v) -> str:
  return v.decode() if isinstance(v, bytes) else str(v)
