"""Pieces shared by every stage's config: the data section and preset parsing."""

import ml_collections

PRESETS = ("paper", "demo", "smoke")
# Builder config of fastmri_brain_multiscale and the image side each preset trains on.
BUILDER_CONFIG = {"paper": "fastmri", "demo": "demo", "smoke": "smoke"}
IMAGE_SIZE = {"paper": 256, "demo": 64, "smoke": 64}


def check_preset(arg: str, presets=PRESETS) -> str:
  if arg not in presets:
    raise ValueError(f"unknown preset {arg!r}; choose one of {', '.join(presets)}")
  return arg


def data_config(preset: str, batch_size: int) -> ml_collections.ConfigDict:
  """The `config.data` section for a preset."""
  d = ml_collections.ConfigDict()
  # Builder config of fastmri_brain_multiscale: fastmri (real files), demo or smoke (synthetic).
  d.builder_config = BUILDER_CONFIG[preset]
  # TFDS data dir; empty means $TFDS_DATA_DIR, else <workdir>/tensorflow_datasets.
  d.data_dir = ""
  # Real fastMRI only: the folder with multicoil_train/, multicoil_val/ (+ multicoil_test_full/).
  d.manual_dir = ""
  # Processes for coil combination (ESPIRiT); 0 keeps the builder config's default.
  d.num_workers = 0
  # Build the dataset first when it is missing (synthetic presets build in minutes).
  d.build = preset != "paper"
  # Side of the square model grid; must match the builder config's crop.
  d.image_size = IMAGE_SIZE[preset]
  # Global batch size (split over the data axis of the mesh).
  d.batch_size = batch_size
  # Single-coil undersampling instead of the multicoil adjoint (decisions.md §2 option).
  d.single_coil = False
  return d
