"""Builds the `fastmri_brain_multiscale` TFDS dataset without TensorFlow.

  python -m nextaccel_jax.data.build --config=demo --data_dir=~/tensorflow_datasets
  python -m nextaccel_jax.data.build --config=fastmri --manual_dir=/data/fastmri_brain \\
      --data_dir=$TFDS_DATA_DIR --num_workers=8

Re-running after an interruption resumes: preprocessed volumes are cached per file (a replaced
file is preprocessed again), and the `incomplete.*` folder a killed build left is removed. Files
and slices that cannot be used are skipped and listed at the end with the reason.
"""

from __future__ import annotations

import argparse
import os
import sys

from nextaccel_jax import ConfigError
from nextaccel_jax.data import fastmri_brain_multiscale as fbm


def build(
  config: str | fbm.MultiscaleConfig = "demo",
  data_dir: str | os.PathLike | None = None,
  manual_dir: str | os.PathLike | None = None,
  num_workers: int | None = None,
) -> fbm.FastmriBrainMultiscale:
  """Builds (or reuses) the dataset and returns its builder.

  Args:
    config: a builder config name or a `MultiscaleConfig` (for custom settings).
    data_dir: TFDS data dir.
    manual_dir: real fastMRI folder (source "fastmri" only).
    num_workers: processes for preprocessing volumes (default: the config's `num_workers`); it does
      not change which dataset is built.
  """
  import tensorflow_datasets as tfds

  if isinstance(config, str):
    by_name = {c.name: c for c in fbm.BUILDER_CONFIGS}
    if config not in by_name:
      raise ConfigError(f"unknown builder config {config!r}; choose one of {sorted(by_name)}")
    config = by_name[config]
  if config.source == "fastmri" and manual_dir is None:
    raise ConfigError(
      "building from real fastMRI needs manual_dir (the folder holding multicoil_train/ and "
      "multicoil_val/). Without fastMRI access, build the synthetic `demo` config instead.\n"
      + fbm.MANUAL_DOWNLOAD_INSTRUCTIONS
    )
  data_dir = os.path.expanduser(str(data_dir)) if data_dir else None
  builder = fbm.FastmriBrainMultiscale(config=config, data_dir=data_dir, num_workers=num_workers)
  dl_config = tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir) if manual_dir else None)
  if not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty()):
    # TFDS's bars redraw with carriage returns: in a log file they are walls of one line.
    tfds.disable_progress_bar()
  builder.download_and_prepare(download_config=dl_config)
  return builder


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--config", default="demo", choices=[c.name for c in fbm.BUILDER_CONFIGS])
  p.add_argument("--data_dir", help="TFDS data dir (default: TFDS default)")
  p.add_argument("--manual_dir", help="folder with multicoil_train/ and multicoil_val/")
  p.add_argument("--num_workers", type=int, help="processes for preprocessing volumes")
  args = p.parse_args(argv)
  builder = build(args.config, args.data_dir, args.manual_dir, args.num_workers)
  print(f"built {builder.info.full_name} in {builder.data_dir}")
  for split, info in builder.info.splits.items():
    print(f"  {split}: {info.num_examples} slices")
  for path, why in builder.skipped:
    print(f"  skipped {path}: {why}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
