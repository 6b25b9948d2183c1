"""The data stage: build (or reuse) the multi-scale dataset and report what it holds.

Writes `data_summary.json` into the workdir: slice counts per split and acquisition, and the
zero-filled PSNR/SSIM table of the validation split per mask family and acceleration.
"""

from __future__ import annotations

import json
import os
import pathlib

import ml_collections

from nextaccel_jax.data import build, pipeline, summary


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
    report["splits"][split] = summary.split_counts(pipeline.load_split(name, split, data_dir))
  val = pipeline.load_split(name, "validation", data_dir)
  table = summary.zero_filled_table(
    val, protocol=config.summary.protocol, max_records=config.summary.max_records or None
  )
  report["zero_filled_validation"] = table
  report["zero_filled_monotone"] = summary.is_monotone(table)
  (workdir / "data_summary.json").write_text(json.dumps(report, indent=2))

  print(f"dataset {name} in {data_dir}")
  for split, counts in report["splits"].items():
    n, v = counts["slices"], counts["volumes"]
    print(f"  {split}: {n} slices from {v} volumes {counts['by_acquisition']}")
  print(f"zero-filled PSNR (dB, {config.summary.protocol} protocol) on validation:")
  print(summary.format_table(table, 0))
  print("zero-filled SSIM:")
  print(summary.format_table(table, 1))
  print(f"summary written to {workdir / 'data_summary.json'}")
  return report


def training_splits(config: ml_collections.ConfigDict, workdir) -> tuple:
  """Builds the dataset if `config.data.build` and returns its `(train, validation)` sources."""
  data_dir = data_dir_for(config, workdir)
  if config.data.build:
    build_from_config(config, data_dir)
  name = dataset_name(config)
  return pipeline.load_split(name, "train", data_dir), pipeline.load_split(
    name, "validation", data_dir
  )


def loaders(config: ml_collections.ConfigDict, train_src, val_src, mesh, start_step: int):
  """The sharded train loader (resuming at `start_step`) and the fixed validation loader."""
  train = pipeline.TrainLoader(
    train_src,
    global_batch_size=config.data.batch_size,
    mesh=mesh,
    seed=config.seed,
    start_step=start_step,
    single_coil=config.data.single_coil,
  )
  val = pipeline.EvalLoader(
    val_src,
    global_batch_size=config.eval.batch_size,
    mesh=mesh,
    max_records=config.eval.max_records or None,
  )
  return train, val
