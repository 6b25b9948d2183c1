"""Data stage: build the multi-scale TFDS dataset and print its summary.

  # Synthetic demo data (no download needed):
  python -m nextaccel_jax.main --config=configs/data.py:demo --workdir=/tmp/nextaccel_data
  # Real fastMRI brain (folder with multicoil_train/ and multicoil_val/):
  python -m nextaccel_jax.main --config=configs/data.py:fastmri --workdir=/tmp/nextaccel_data \
      --config.data.manual_dir=/data/fastmri_brain --config.data.data_dir=$TFDS_DATA_DIR
"""

import ml_collections

PRESETS = ("fastmri", "demo", "smoke")


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
  if arg not in PRESETS:
    raise ValueError(f"unknown preset {arg!r}; choose one of {', '.join(PRESETS)}")
  config = ml_collections.ConfigDict()
  config.stage = "data"
  config.data = ml_collections.ConfigDict()
  # Builder config of fastmri_brain_multiscale: fastmri (real files), demo or smoke (synthetic).
  config.data.builder_config = arg
  # TFDS data dir; empty means $TFDS_DATA_DIR, else <workdir>/tensorflow_datasets.
  config.data.data_dir = ""
  # Real fastMRI only: the folder with multicoil_train/, multicoil_val/ (+ multicoil_test_full/).
  config.data.manual_dir = ""
  # Processes for coil combination (ESPIRiT); 0 keeps the builder config's default.
  config.data.num_workers = 0
  config.summary = ml_collections.ConfigDict()
  # Metric protocol of the zero-filled table: paper (per slice, self-max) or fastmri (per volume).
  config.summary.protocol = "paper"
  # Validation slices used for the table; 0 means all.
  config.summary.max_records = 0
  return config
