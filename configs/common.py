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


def set_parallelism(config: ml_collections.ConfigDict) -> None:
  """Adds the mesh, the sharding rules and the start-up memory check of a training stage."""
  # Mesh axes as (name, size) pairs; -1 takes the remaining devices. The batch is split over
  # data × fsdp; an fsdp axis > 1 also shards the large parameters and optimizer moments, e.g.
  # --config.mesh="(('data', 2), ('fsdp', 4))".
  config.mesh = (("data", -1), ("fsdp", 1))
  config.sharding = ml_collections.ConfigDict()
  # (regex, spec) pairs, first match wins, searched in each state leaf's path
  # ("params/.../kernel", "opt_state/.../mu/.../kernel", "frozen/..."). spec: "fsdp" (largest
  # dimension divisible by the fsdp axis), "replicated", or a tuple of mesh axes per dimension.
  config.sharding.rules = ((".*", "fsdp"),)
  # Leaves with fewer elements stay replicated under "fsdp" (2^18 float32 values = 1 MiB).
  config.sharding.fsdp_min_size = 2**18
  config.memory = ml_collections.ConfigDict()
  # Compile the train step ahead of time, print its memory per device and stop when it cannot fit.
  config.memory.check = True
  # Per-device budget in GiB; 0 takes the device's own limit where the runtime reports one
  # (GPU, TPU), and only prints on CPU.
  config.memory.limit_gib = 0.0
