# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
#   language_info:
#     name: python
#   accelerator: TPU
#   colab:
#     provenance: []
# ---

# %% [markdown]
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/OWNER/REPO/blob/main/colab/train_tpu.ipynb)
#
# The badge opens this notebook in Colab once the repository is on GitHub: `OWNER/REPO` in its
# link stands for the repository's GitHub path (the pattern is
# `https://colab.research.google.com/github/OWNER/REPO/blob/BRANCH/colab/train_tpu.ipynb`). A
# notebook opened that way has no checkout beside it: set `REPO_URL` in the parameters cell to
# the repository's git URL (`https://github.com/OWNER/REPO.git`) so the install cell clones it.

# %% [markdown]
# # Next-acceleration-scale prediction: the paper's models on a TPU
#
# Trains the paper-size AQ-VAE, student, privileged teacher and distilled student on the
# fastMRI brain multicoil data, and fastMRI's U-Net as a baseline, then exports the
# distilled student and evaluates it against the stage-2 student, the U-Net and the
# zero-filled input, one stage per cell through the `nextaccel_jax` package.
#
# This is a long job (days of TPU time at the paper's epochs). Every stage checkpoints
# into its own folder under `WORKDIR`: when a runtime is recycled, reconnect, run the
# cells from the top again and each finished stage returns at once while an interrupted
# one resumes from its last checkpoint. Keep `WORKDIR` on persistent storage.

# %% [markdown]
# ## 1. Connect to a TPU runtime
#
# In Colab: *Runtime → Change runtime type → TPU*, then *Connect*. On a Cloud TPU VM,
# start Jupyter on the VM and open this notebook there. The device check below stops
# with an explanation when no TPU is attached.

# %% [markdown]
# ## 2. Parameters
#
# - `WORKDIR`: one folder per stage (checkpoints, metrics, the export, the report).
#   A path under `/content/drive` mounts Google Drive, so the checkpoints outlive the
#   runtime. It must be a local or mounted path: the stages write with local file
#   operations.
# - `TFDS_DATA_DIR`: where the processed dataset is written and read, on a fast local
#   disk. `GCS_TFDS_DIR` (a `gs://` path, optional) keeps a copy in a Cloud Storage
#   bucket: it is copied to `TFDS_DATA_DIR` when present and uploaded after building.
# - `FASTMRI_DIR`: the folder holding the extracted `multicoil_train/` and
#   `multicoil_val/` brain archives (optionally `multicoil_test_full/`).
# - `BIOMEDCLIP_WEIGHTS`, `VAR_VAE`: optional pretrained weights (see the README).
# - `REPO_URL` (empty by default): the repository's git URL, cloned and installed when the
#   package is not importable and this notebook is not opened from a checkout.
#   `ACCELERATOR`: the JAX build installed with it.

# %% tags=["parameters"]
REPO_URL = ""  # git URL of the nextaccel_jax repository (not needed inside a checkout)
FORCE_INSTALL = False  # reinstall even when nextaccel_jax is importable
ACCELERATOR = "tpu"  # the JAX build to install with it: "tpu" (libtpu), "gpu", "cpu" or "auto"
WORKDIR = "/content/drive/MyDrive/nextaccel/paper"
TFDS_DATA_DIR = "/content/tensorflow_datasets"
GCS_TFDS_DIR = ""  # e.g. "gs://my-bucket/tensorflow_datasets"
FASTMRI_DIR = "/content/drive/MyDrive/fastmri_brain"
NUM_WORKERS = 0  # processes for coil combination while building; 0 = all CPU cores
# open_clip_pytorch_model.bin of microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224
# for the discriminator's frozen tower (reading it needs PyTorch); "" = random tower.
BIOMEDCLIP_WEIGHTS = ""
# Folder written by `python -m nextaccel_jax.convert.var_vae` from VAR's VQ-VAE.
VAR_VAE = ""

# %% [markdown]
# ## 3. Install
#
# Unless `nextaccel_jax` is already importable, installs the package with `jax[tpu]` (JAX
# with the TPU runtime, `libtpu`; `jax[cuda12]` with `ACCELERATOR = "gpu"`). When JAX was
# already imported in this runtime, restart it (*Runtime → Restart session*) after this cell
# and run the notebook again from the top.

# %%
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys


def find_checkout(start: pathlib.Path) -> pathlib.Path | None:
  """The nearest folder at or above `start` whose pyproject.toml names nextaccel_jax."""
  for folder in (start, *start.parents):
    project = folder / "pyproject.toml"
    if project.is_file() and 'name = "nextaccel_jax"' in project.read_text():
      return folder
  return None


def pip_install(*args: str) -> None:
  subprocess.run([sys.executable, "-m", "pip", "install", "-q", *args], check=True)


def runtime_accelerator() -> str:
  """What this runtime provides: "tpu", "gpu" or "cpu"."""
  # Colab's TPU runtimes set COLAB_TPU_ADDR and TPU hosts TPU_NAME; where neither is set,
  # ACCELERATOR = "tpu" says so.
  if os.environ.get("COLAB_TPU_ADDR") or os.environ.get("TPU_NAME"):
    return "tpu"
  if shutil.which("nvidia-smi"):
    return "gpu"
  return "cpu"


if ACCELERATOR not in ("auto", "gpu", "tpu", "cpu"):
  raise ValueError(f'ACCELERATOR must be "auto", "gpu", "tpu" or "cpu", not {ACCELERATOR!r}')
accelerator = runtime_accelerator() if ACCELERATOR == "auto" else ACCELERATOR
spec = importlib.util.find_spec("nextaccel_jax")
installed = spec is not None and spec.origin is not None
checkout = find_checkout(pathlib.Path.cwd().absolute())
if checkout is None and installed:
  # An editable install: the stage configs (configs/) sit next to the package folder.
  beside = pathlib.Path(spec.origin).parent.parent
  if (beside / "configs" / "pipeline.py").is_file():
    checkout = beside
if checkout is None and REPO_URL:
  # Not named after the package, so the clone never shadows it as a namespace package.
  checkout = pathlib.Path("nextaccel_jax_src").absolute()
  if not checkout.exists():
    subprocess.run(["git", "clone", "--depth", "1", REPO_URL, str(checkout)], check=True)
if checkout is None:
  raise RuntimeError(
    "nextaccel_jax (with its configs/ folder) was not found: set REPO_URL in the parameters "
    "cell to the git URL of the nextaccel_jax repository (it is cloned and installed), or "
    "open this notebook from inside a checkout of it"
  )
if not installed or FORCE_INSTALL:
  jax_build = []
  if accelerator == "gpu":
    jax_build = ["-U", "jax[cuda12]"]
  elif accelerator == "tpu":
    jax_build = ["-U", "jax[tpu]"]
  # One resolution for both, so the CUDA plugin or libtpu matches the jax the package gets.
  pip_install(*jax_build, "-e", str(checkout))
  print(f"installed nextaccel_jax with JAX for {accelerator}")
# configs/ is not part of the installed package, and a package installed by this cell is only
# found by a fresh interpreter: the checkout on sys.path serves both right away.
sys.path.insert(0, str(checkout))
print(f"nextaccel_jax from {checkout}")

# %%
import jax

devices = jax.devices()
if devices[0].platform != "tpu":
  raise RuntimeError(
    f"no TPU attached: JAX sees {len(devices)} {devices[0].platform} device(s). In Colab "
    "choose Runtime → Change runtime type → TPU and reconnect; on a Cloud TPU VM check "
    "that no other process holds the TPU. Then run the notebook from the top again."
  )
print(f"{jax.device_count()} TPU cores: {devices[0].device_kind}")
print(f"{jax.process_count()} process(es), {jax.local_device_count()} local devices")

# %% [markdown]
# ## 4. Device mesh
#
# Every stage builds its mesh from its `config.mesh`: by default one `data` axis over all
# TPU cores, so each global batch is split over them (batch sizes must be multiples of
# the core count) and the parameters are replicated. An `fsdp` axis also shards the
# parameters and optimizer moments, e.g. `config.student.mesh = (("data", -1),
# ("fsdp", 4))` in the overrides cell below. Each stage prints its train step's memory
# per core when it starts, and stops there with what to change if it cannot fit.

# %%
from nextaccel_jax import sharding

mesh = sharding.make_mesh()
print(mesh)
print(dict(mesh.shape))

# %% [markdown]
# ## 5. Storage
#
# Mounts Google Drive when `WORKDIR` or `FASTMRI_DIR` lies under `/content/drive`, and
# fetches the processed dataset from `GCS_TFDS_DIR` if a copy is there (Colab asks for
# Google Cloud access first).

# %%
if WORKDIR.startswith("gs://"):
  raise ValueError("WORKDIR must be a local or mounted path (e.g. on Google Drive)")
if any(p.startswith("/content/drive") for p in (WORKDIR, FASTMRI_DIR)):
  from google.colab import drive

  drive.mount("/content/drive")
if GCS_TFDS_DIR:
  if "google.colab" in sys.modules:
    from google.colab import auth

    auth.authenticate_user()
  os.makedirs(TFDS_DATA_DIR, exist_ok=True)
  # A missing copy is not an error: the next cell builds the dataset.
  subprocess.run(["gcloud", "storage", "rsync", "-r", GCS_TFDS_DIR, TFDS_DATA_DIR])
os.makedirs(WORKDIR, exist_ok=True)

# %% [markdown]
# ## 6. The fastMRI dataset
#
# fastMRI is not redistributable: request access at <https://fastmri.med.nyu.edu/>,
# download the **brain multicoil** train and validation archives and extract them into
# `FASTMRI_DIR`. Building reads every slice, removes the readout oversampling,
# compresses the coils to 5 virtual coils, combines them with ESPIRiT maps, centre-crops
# to 256² and stores the undersampled levels of the evaluation masks. It takes hours on
# a few cores and resumes where it stopped; once built, this cell only opens the dataset.
# Volumes that cannot give a 256² crop and unreadable files are skipped and listed.

# %%
from nextaccel_jax.data import build

builder = build.build(
  "fastmri",
  data_dir=TFDS_DATA_DIR,
  manual_dir=FASTMRI_DIR,
  num_workers=NUM_WORKERS or os.cpu_count(),
)
print(f"{builder.info.full_name} in {builder.data_dir}")
for split, info in builder.info.splits.items():
  print(f"  {split}: {info.num_examples} slices")
for path, why in builder.skipped:
  print(f"  skipped {path}: {why}")
if GCS_TFDS_DIR:
  upload = ["gcloud", "storage", "rsync", "-r", TFDS_DATA_DIR, GCS_TFDS_DIR]
  subprocess.run(upload, check=True)

# %% [markdown]
# ## 7. Configs
#
# `configs/pipeline.py:paper` holds every stage's config (`config.aqvae`,
# `config.student`, `config.teacher`, `config.distill`, `config.evaluate`), each the
# same as `configs/<stage>.py:paper`. Change fields in the next cell before the stage
# configs are derived: the epochs, the global batch sizes (multiples of the core count),
# the learning rates. `max_steps_per_run` ends a stage's cell after that many steps, so
# a long stage can be split over several sessions (run the cell again to continue).

# %%
from configs import pipeline as pipeline_config

config = pipeline_config.get_config("paper")
config.data_dir = TFDS_DATA_DIR
config.aqvae.disc.weights = BIOMEDCLIP_WEIGHTS
config.aqvae.init_from = VAR_VAE

# %%
# The paper's values, written out as examples of what can be changed.
config.aqvae.num_epochs = 100
config.aqvae.data.batch_size = 16
config.student.num_epochs = 250
config.student.data.batch_size = 40
config.teacher.num_epochs = 250
config.distill.num_epochs = 100
config.distill.data.batch_size = 24
config.unet.num_epochs = 50
config.unet.data.batch_size = 16
# Stop a stage's cell after this many steps to fit a session (0 = run to the end).
config.student.max_steps_per_run = 0

for name in ("aqvae", "student", "teacher", "distill", "unet"):
  batch = config[name].data.batch_size
  if batch % jax.device_count():
    raise ValueError(
      f"config.{name}.data.batch_size = {batch} is not a multiple of the "
      f"{jax.device_count()} TPU cores"
    )

# %%
import json
import pathlib

from nextaccel_jax.stages import pipeline

# Each stage's config with the dataset and the previous stages' folders filled in, exactly
# as `python -m nextaccel_jax.main --config=configs/pipeline.py:paper` wires them.
stage_configs = pipeline.stage_configs(config, WORKDIR)
root = pathlib.Path(WORKDIR).absolute()
workdirs = {name: root / name for name in pipeline.STEPS}
for name in ("aqvae", "student", "teacher", "distill", "unet"):
  c = stage_configs[name]
  print(f"{name}: {c.num_epochs} epochs, batch {c.data.batch_size} → {workdirs[name]}")


def show(name: str, stage_metrics: dict, *keys: str) -> None:
  """Prints some of a stage's final validation metrics (all of them are in its
  folder's final_metrics.json and, per evaluation, metrics.jsonl)."""
  # A stage that had finished before returns nothing; its folder keeps the numbers.
  if not stage_metrics:
    stage_metrics = json.loads((workdirs[name] / "final_metrics.json").read_text())
  for key in keys:
    if key in stage_metrics:
      print(f"  {key}: {stage_metrics[key]:.4g}")


# Token accuracy, then autoregressive reconstructions against the zero-filled input.
STAGE2_KEYS = ("acc", "recon/psnr", "zero_filled/psnr", "recon/ssim", "zero_filled/ssim")

# %% [markdown]
# ## 8. Stage 1: the AQ-VAE tokenizer
#
# VAR's VQ-VAE with FiLM conditioning on the acceleration and mask family and one 4096 ×
# 32 codebook for the six levels (11² … 16² tokens). Loss: 1 − SSIM, 0.1 · LPIPS, 0.1 ·
# adversarial (BiomedCLIP-based discriminator) and the commitment term.

# %%
from nextaccel_jax.stages import stage1_aqvae

aqvae_val = stage1_aqvae.train_and_evaluate(stage_configs["aqvae"], workdirs["aqvae"])
show("aqvae", aqvae_val, "recon_all/psnr", "recon_all/ssim", "recon_all/lpips_alex")

# %% [markdown]
# ## 9. Stage 2: the student
#
# Depth-16 transformer with cross-attention to the R = 32 image's encoder features; it
# predicts Q16 … QFS scale by scale from Q32.

# %%
from nextaccel_jax.stages import stage2_transformer

student_val = stage2_transformer.train_and_evaluate(stage_configs["student"], workdirs["student"])
show("student", student_val, *STAGE2_KEYS)

# %% [markdown]
# ## 10. Stage 2: the privileged teacher
#
# The same architecture with the fully sampled image as its context, trained on
# randomised prefixes.

# %%
teacher_val = stage2_transformer.train_and_evaluate(stage_configs["teacher"], workdirs["teacher"])
show("teacher", teacher_val, *STAGE2_KEYS)

# %% [markdown]
# ## 11. Stage 3: on-policy distillation
#
# The student, initialised from stage 2, minimises the reverse KL to the frozen teacher
# on its own sampled rollouts.

# %%
from nextaccel_jax.stages import stage3_distill

distill_dir = workdirs["distill"]
distill_val = stage3_distill.train_and_evaluate(stage_configs["distill"], distill_dir)
show("distill", distill_val, "kl", "recon/psnr", "recon/ssim")

# %% [markdown]
# ## 12. Baseline: the U-Net
#
# fastMRI's U-Net (32 channels, 4 poolings) on the same data: the R = 32 image in, the
# magnitude out, L1 loss, RMSprop with fastMRI's step decay. The evaluation compares it
# with the transformer as the row `unet`.

# %%
from nextaccel_jax.stages import baseline

unet_val = baseline.train_and_evaluate(stage_configs["unet"], workdirs["unet"])
show("unet", unet_val, "recon/psnr", "recon/ssim", "zero_filled/ssim")

# %% [markdown]
# ## 13. Export
#
# One Orbax checkpoint with everything inference needs: the tokenizer, the distilled
# student, their configs and the data conventions. Load it anywhere with
# `export.load_reconstructor(path)`.

# %%
from nextaccel_jax import export

export_config = stage_configs["export"]
export_path = export.export_from_workdirs(
  workdirs["export"],
  transformer_from=export_config.transformer_from,
  tokenizer_from=export_config.tokenizer_from,
  best=export_config.best,
  overwrite=True,
)
print(export.describe(export.read_meta(export_path)))

# %% [markdown]
# ## 14. Evaluation
#
# The stage-2 student (`base`), the exported distilled student and the U-Net reconstruct
# every test slice from R = 32 under each mask family; PSNR, SSIM and LPIPS per contrast
# under the paper's and fastMRI's protocols, against the zero-filled input. Writes
# `report.md`, `per_slice.csv` and figure grids into `WORKDIR/evaluate`.

# %%
from IPython.display import Image, Markdown, display

from nextaccel_jax.stages import evaluate

eval_metrics = evaluate.run(stage_configs["evaluate"], workdirs["evaluate"])
display(Markdown((workdirs["evaluate"] / "report.md").read_text()))
for png in sorted((workdirs["evaluate"] / "figures").glob("*.png")):
  display(Image(filename=png))
