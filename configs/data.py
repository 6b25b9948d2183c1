"""Data stage: build the multi-scale TFDS dataset and print its summary.

  # Synthetic demo data (no download needed):
  python -m nextaccel_jax.main --config=configs/data.py:demo --workdir=/tmp/nextaccel_data
  # Real fastMRI brain (folder with multicoil_train/ and multicoil_val/):
  python -m nextaccel_jax.main --config=configs/data.py:paper --workdir=/tmp/nextaccel_data \
      --config.data.manual_dir=/data/fastmri_brain --config.data.data_dir=$TFDS_DATA_DIR
"""

import ml_collections

from configs import common


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
  preset = common.check_preset(arg)
  config = ml_collections.ConfigDict()
  config.stage = "data"
  config.data = common.data_config(preset, batch_size=8)
  config.data.build = True
  config.summary = ml_collections.ConfigDict()
  # Metric protocol of the zero-filled table: paper (per slice, self-max) or fastmri (per volume).
  config.summary.protocol = "paper"
  # Validation slices used for the table; 0 means all.
  config.summary.max_records = 0
  return config
