"""The data stage, and how every stage opens the dataset its config names.

  python -m nextaccel_jax.main --config=configs/data.py:demo --workdir=runs/data

Builds (or reuses) the multi-scale dataset and writes `data_summary.json` into the workdir: slice
counts per split and acquisition, and the zero-filled PSNR/SSIM table of the validation split per
mask family and acceleration. The zero-filled table is the floor every reconstruction must beat;
with nested masks it rises monotonically from R = 32 to R = 2 (fastmri_spec.md §3.3).

The training stages open their splits through `training_splits`, the evaluation stage through
`open_split`.
"""

from __future__ import annotations

import collections
import json
import os
import pathlib

import ml_collections
import numpy as np

from nextaccel_jax import ConfigError
from nextaccel_jax.data import build, masks, pipeline, transforms
from nextaccel_jax.evaluation import metrics


def data_dir_for(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> str:
  """`config.data.data_dir`, else `$TFDS_DATA_DIR`, else `<workdir>/tensorflow_datasets`."""
  if config.data.data_dir:
    return os.path.expanduser(config.data.data_dir)
  return os.environ.get("TFDS_DATA_DIR") or os.fspath(pathlib.Path(workdir) / "tensorflow_datasets")


def dataset_name(config: ml_collections.ConfigDict) -> str:
  return f"fastmri_brain_multiscale/{config.data.builder_config}"


def build_from_config(config: ml_collections.ConfigDict, data_dir: str):
  """Builds (or reuses) the dataset that `config.data` names; returns its builder."""
  return build.build(
    config.data.builder_config,
    data_dir=data_dir,
    manual_dir=config.data.manual_dir or None,
    num_workers=config.data.num_workers or None,
  )


def run(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
  """Builds the dataset named by `config.data` and writes/prints its summary."""
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  data_dir = data_dir_for(config, workdir)
  builder = build_from_config(config, data_dir)
  name = dataset_name(config)
  report = {"dataset": name, "data_dir": data_dir, "splits": {}, "skipped": builder.skipped}
  for split in builder.info.splits:
    report["splits"][split] = split_counts(pipeline.load_split(name, split, data_dir))
  val = pipeline.load_split(name, "validation", data_dir)
  table = zero_filled_table(
    val, protocol=config.summary.protocol, max_records=config.summary.max_records or None
  )
  report["zero_filled_validation"] = table
  report["zero_filled_monotone"] = is_monotone(table)
  (workdir / "data_summary.json").write_text(json.dumps(report, indent=2))

  print(f"dataset {name} in {data_dir}")
  for split, counts in report["splits"].items():
    n, v = counts["slices"], counts["volumes"]
    print(f"  {split}: {n} slices from {v} volumes {counts['by_acquisition']}")
  print(f"zero-filled PSNR (dB, {config.summary.protocol} protocol) on validation:")
  print(format_table(table, 0))
  print("zero-filled SSIM:")
  print(format_table(table, 1))
  print(f"summary written to {workdir / 'data_summary.json'}")
  return report


def open_split(config: ml_collections.ConfigDict, workdir, split: str):
  """Builds the dataset if `config.data.build`; returns `(source, dataset name, data dir)`."""
  data_dir = data_dir_for(config, workdir)
  if config.data.build:
    build_from_config(config, data_dir)
  name = dataset_name(config)
  return pipeline.load_split(name, split, data_dir), name, data_dir


def training_splits(config: ml_collections.ConfigDict, workdir) -> tuple:
  """Builds the dataset if `config.data.build` and returns its `(train, validation)` sources."""
  train, name, data_dir = open_split(config, workdir, "train")
  return train, pipeline.load_split(name, "validation", data_dir)


# ------------------------------------------------------------------------------------------------
# Summaries of a built split

LEVEL_NAMES = tuple(f"R{r}" for r in transforms.ACCELERATIONS)


def split_counts(source) -> dict:
  """Slices per contrast group and acquisition, and the number of distinct volumes."""
  by_acq, files = collections.Counter(), set()
  for i in range(len(source)):
    ex = source[i]
    by_acq[pipeline.as_text(ex["acquisition"])] += 1
    files.add(pipeline.as_text(ex["file_name"]))
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
    raise ConfigError("zero_filled_table: the split has no records")
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
