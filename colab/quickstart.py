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
# ---

# %% [markdown]
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/OWNER/REPO/blob/main/colab/quickstart.ipynb)
#
# The badge opens this notebook in Colab once the repository is on GitHub: `OWNER/REPO` in its
# link stands for the repository's GitHub path (the pattern is
# `https://colab.research.google.com/github/OWNER/REPO/blob/BRANCH/colab/quickstart.ipynb`). A
# notebook opened that way has no checkout beside it: set `REPO_URL` in the parameters cell to
# the repository's git URL (`https://github.com/OWNER/REPO.git`) so the install cell clones it.

# %% [markdown]
# # Next-acceleration-scale prediction for MRI reconstruction: quickstart
#
# This notebook runs the whole method of *Next-Acceleration-Scale Prediction for
# Autoregressive MRI Reconstruction* (Korkmaz & Patel) on synthetic data, one stage per
# cell, through the `nextaccel_jax` package:
#
# 1. **Data**: synthetic brain volumes in the fastMRI multicoil format, undersampled with
#    four nested mask families at R = 32, 16, 8, 4, 2 (plus the fully sampled image).
# 2. **Stage 1, AQ-VAE**: a tokenizer that turns the image of every acceleration level
#    into a token grid (11² for R = 32 up to 16² for the fully sampled image).
# 3. **Stage 2, transformer**: a *student* that predicts the tokens of the next
#    acceleration level from the R = 32 image and the coarser levels, and a *privileged
#    teacher* that sees the fully sampled image.
# 4. **Stage 3, distillation**: the student is trained on its own rollouts to match the
#    teacher.
# 5. **Reconstruction** of validation slices from their R = 32 input, level by level.
#
# It runs on a laptop and on a Colab CPU, GPU or TPU runtime. The `demo` preset takes
# about half an hour on two CPU cores; `smoke` runs in minutes with tiny models whose
# images are not meant to look good. Each stage writes checkpoints into its own folder,
# so running a cell again resumes where it stopped.

# %% [markdown]
# ## Parameters
#
# `PRESET` picks the model and data sizes of every stage (`configs/*.py`). `WORKDIR`
# holds one sub-folder per stage and the dataset. `REPO_URL` (empty by default) is only
# needed where the package is not installed and the notebook is not opened from a checkout
# (e.g. a fresh Colab runtime). `ACCELERATOR` picks the JAX build installed with the
# package; `"auto"` reads it off the runtime.

# %% tags=["parameters"]
# "demo": small models that beat the zero-filled input; "smoke": tiny, minutes-long.
PRESET = "demo"
# One sub-folder per stage (data, aqvae, student, teacher, distill) and the dataset.
WORKDIR = "runs/quickstart"
# Stage 3 (on-policy distillation); without it the stage-2 student reconstructs.
RUN_DISTILL = True
# Git URL of the nextaccel_jax repository, cloned when it is neither installed nor here.
REPO_URL = ""
# Reinstall even when nextaccel_jax is importable (e.g. after pulling a new version).
FORCE_INSTALL = False
# JAX for "gpu" (CUDA 12), "tpu" (libtpu) or "cpu"; "auto": whichever this runtime has.
ACCELERATOR = "auto"

# %% [markdown]
# ## Install
#
# Nothing happens when `nextaccel_jax` is already importable. Otherwise the checkout
# this notebook lives in (or a clone of `REPO_URL`) is installed with pip, with JAX's
# CUDA 12 plugin on a GPU runtime or `libtpu` on a TPU runtime (a CPU needs neither). When
# JAX was already imported in this runtime, restart it (*Runtime → Restart session*) after
# this cell and run the notebook again from the top. The stage configs live in the
# checkout's `configs/` folder, which is put on `sys.path`.

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

# %% [markdown]
# ## Devices
#
# JAX uses the accelerator the runtime has (GPU or TPU), else the CPU. Every global
# batch is split over all devices, so each batch size must be a multiple of the device
# count; the next cell rounds the small presets' batch sizes up where needed.

# %%
import json

import jax

from configs import pipeline as pipeline_config
from nextaccel_jax.stages import pipeline

print(f"{jax.device_count()} × {jax.devices()[0].device_kind} ({jax.default_backend()})")

# The same configs as `python -m nextaccel_jax.main --config=configs/demo.py`, with the
# dataset folder and every stage's inputs (the previous stages' folders) filled in.
config = pipeline_config.get_config(PRESET)
stage_configs = pipeline.stage_configs(config, WORKDIR)
root = pathlib.Path(WORKDIR).absolute()
workdirs = {name: root / name for name in pipeline.STEPS}

for name in ("aqvae", "student", "teacher", "distill"):
  for section in (stage_configs[name].data, stage_configs[name].eval):
    if section.batch_size % jax.device_count():
      section.batch_size = -(-section.batch_size // jax.device_count()) * jax.device_count()
      print(f"{name}: batch size rounded up to {section.batch_size}")

print("dataset:", stage_configs["data"].data.data_dir)
print("teacher starts from:", stage_configs["teacher"].init_from or "scratch")
print("distillation: student", stage_configs["distill"].init_from)
print("              teacher", stage_configs["distill"].teacher_from)


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
# ## Data
#
# The data stage writes synthetic volumes made from the MNI152 brain template (T1, T2,
# FLAIR with coils, phase and noise) in the fastMRI multicoil `.h5` layout, combines the
# coils into one complex image with coil sensitivity maps (SENSE-1) as for real fastMRI,
# and stores every slice with its undersampled levels as a TFDS dataset. It prints the
# slice counts and the zero-filled PSNR/SSIM table per mask family and acceleration, the
# baseline the models must beat.

# %%
from nextaccel_jax.stages import data as data_stage

data_summary = data_stage.run(stage_configs["data"], workdirs["data"])

# %% [markdown]
# ## Stage 1: the AQ-VAE tokenizer
#
# An encoder conditioned on the acceleration and mask family (FiLM) maps each of the six
# levels to a latent grid; one shared codebook quantises it at 11², 12², …, 16² tokens
# (R = 32 → Q32, …, fully sampled → QFS). The loss is 1 − SSIM, LPIPS, an adversarial
# term and the commitment term. Validation reports PSNR, SSIM and LPIPS of the decoded
# images.

# %%
from nextaccel_jax.stages import stage1_aqvae

aqvae_val = stage1_aqvae.train_and_evaluate(stage_configs["aqvae"], workdirs["aqvae"])
show("aqvae", aqvae_val, "recon_all/psnr", "recon_all/ssim", "recon_all/lpips_alex")

# %% [markdown]
# ## Stage 2: the student transformer
#
# Given Q32 (the tokens of the R = 32 input) and cross-attention to the features of the
# R = 32 image, the transformer predicts the tokens of R = 16, 8, 4, 2 and the fully
# sampled level, one whole scale at a time. Validation reports token cross-entropy and
# accuracy per scale, and PSNR/SSIM of autoregressive reconstructions.

# %%
from nextaccel_jax.stages import stage2_transformer

student_val = stage2_transformer.train_and_evaluate(stage_configs["student"], workdirs["student"])
show("student", student_val, *STAGE2_KEYS)

# %% [markdown]
# ## Stage 2: the privileged teacher
#
# The same transformer, but its context is the *fully sampled* image, and some of its
# input tokens are replaced by random ones during training (randomised prefixes), so it
# also predicts well after imperfect earlier scales such as a student's. With the small
# presets it starts from the trained student (`teacher.init_from`), as the pipeline does.

# %%
teacher_val = stage2_transformer.train_and_evaluate(stage_configs["teacher"], workdirs["teacher"])
show("teacher", teacher_val, *STAGE2_KEYS)

# %% [markdown]
# ## Stage 3: on-policy distillation
#
# The student samples its own token rollouts; on each rollout the frozen teacher's
# next-scale distributions are the target, and the student minimises the reverse KL
# divergence to them. This trains the student on the mistakes it actually makes at
# inference time.

# %%
from nextaccel_jax.stages import stage3_distill

if RUN_DISTILL:
  distill_dir = workdirs["distill"]
  distill_val = stage3_distill.train_and_evaluate(stage_configs["distill"], distill_dir)
  show("distill", distill_val, "kl", "recon/psnr", "recon/ssim")
else:
  print("stage 3 skipped (RUN_DISTILL = False): the stage-2 student reconstructs")

# %% [markdown]
# ## Reconstruction
#
# One validation slice under each mask family's evaluation mask at R = 32. The
# `Reconstructor` encodes the R = 32 image into Q32, generates the five finer token scales
# with the transformer and decodes them; `return_intermediates=True` also decodes the
# first k + 1 token scales together for every k (Q32, +Q16, …, +QFS; the last one is
# the reconstruction).

# %%
import numpy as np

from nextaccel_jax import export, losses
from nextaccel_jax.data import masks
from nextaccel_jax.data import pipeline as data_pipeline
from nextaccel_jax.stages import evaluate

model_dir = workdirs["distill"] if RUN_DISTILL else workdirs["student"]
rec = export.load_reconstructor(model_dir)

validation = data_pipeline.load_split(
  data_stage.dataset_name(stage_configs["data"]),
  "validation",
  stage_configs["data"].data.data_dir,
)
record = 0
contrasts = evaluate.contrast_names(validation)
slice_info = evaluate.slice_table(validation, record + 1, contrasts)
example = validation[record]
# [family, level, H, W, 2]: the stored R = 32 … R = 2 and fully sampled images.
levels = np.stack([data_pipeline.stored_eval_levels(example, f) for f in masks.FAMILIES])
family_ids = np.array([masks.family_id(f) for f in masks.FAMILIES])

x_hat, aux = rec.reconstruct(levels[:, 0], family_ids, return_intermediates=True)
magnitudes = np.stack([data_pipeline.zero_filled_magnitudes(lv) for lv in levels])
inputs, targets = magnitudes[:, 0], magnitudes[:, -1]
recons = np.asarray(losses.magnitude(x_hat))
scales = np.asarray(losses.magnitude(aux["levels_BKHW2"]))
print(f"slice: {slice_info[record]}")
print(f"input {inputs.shape}, per-scale decodings {scales.shape}, recon {recons.shape}")

# %% [markdown]
# Rows: mask families. Columns: the zero-filled R = 32 input, the image decoded from the
# token scales so far, the error of the reconstruction (|recon − target| over the
# target's maximum) and the fully sampled target. The figures are also saved under
# `WORKDIR/figures/`.

# %%
from IPython.display import Image, display

from nextaccel_jax.evaluation import report

figures = root / "figures"
figures.mkdir(parents=True, exist_ok=True)
num_scales = scales.shape[1]
scale_names = evaluate.LEVEL_NAMES if num_scales == len(evaluate.LEVEL_NAMES) else ()
try:
  from matplotlib.figure import Figure
except ImportError:
  Figure = None

if Figure is not None:
  peak = targets.max(axis=(1, 2), keepdims=True)
  errors = np.abs(recons - targets) / peak
  names = list(scale_names) or [f"scales ≤ {k}" for k in range(num_scales)]
  names[-1] += " = recon"
  titles = ["R = 32 input", *names, "|error|", "target"]
  fig = Figure(figsize=(1.5 * len(titles), 1.6 * len(masks.FAMILIES)), layout="constrained")
  axes = fig.subplots(len(masks.FAMILIES), len(titles), squeeze=False)
  for i, family in enumerate(masks.FAMILIES):
    panels = [inputs[i] / peak[i], *(scales[i] / peak[i]), errors[i], targets[i] / peak[i]]
    for j, (ax, image) in enumerate(zip(axes[i], panels, strict=True)):
      is_error = j == len(titles) - 2
      ax.imshow(
        image,
        cmap="inferno" if is_error else "gray",
        vmin=0.0,
        vmax=float(errors.max()) if is_error else 1.0,
      )
      ax.set_xticks([])
      ax.set_yticks([])
      if i == 0:
        ax.set_title(titles[j], fontsize=8)
    axes[i, 0].set_ylabel(family, fontsize=8)
  fig.savefig(figures / "quickstart.png", dpi=100)
  display(Image(filename=figures / "quickstart.png"))
else:
  # Without matplotlib: the evaluation report's own figure grids.
  report.levels_figure(
    figures / "levels.png",
    inputs,
    scales,
    targets,
    level_names=scale_names,
    row_labels=masks.FAMILIES,
  )
  report.family_figure(
    figures / "recon.png", inputs, {"model": recons}, targets, row_labels=masks.FAMILIES
  )
  display(Image(filename=figures / "levels.png"))
  display(Image(filename=figures / "recon.png"))

# %% [markdown]
# ## Scores
#
# PSNR and SSIM under the paper's protocol (each image divided by its own maximum), the
# reconstruction against the zero-filled R = 32 input. A single slice is only an
# illustration; the evaluation stage (`configs/eval.py`, or the last step of
# `configs/demo.py`) scores whole splits under both the paper's and fastMRI's protocol.

# %%
from nextaccel_jax.evaluation import metrics

zero_filled = metrics.evaluate_slices(targets, inputs, "paper")
reconstructed = metrics.evaluate_slices(targets, recons, "paper")
print(f"{'family':<12} {'zero-filled PSNR / SSIM':>24} {'model PSNR / SSIM':>20}")
for i, family in enumerate(masks.FAMILIES):
  zf = f"{zero_filled['psnr'][i]:.2f} / {zero_filled['ssim'][i]:.4f}"
  rc = f"{reconstructed['psnr'][i]:.2f} / {reconstructed['ssim'][i]:.4f}"
  print(f"{family:<12} {zf:>24} {rc:>20}")

# %% [markdown]
# ## Next steps
#
# - The same stages from the command line, plus export and the evaluation report:
#   `python -m nextaccel_jax.main --config=configs/demo.py --workdir=runs/demo`.
# - Real fastMRI data and the paper's model sizes on a TPU: `colab/train_tpu.ipynb`.
# - Any config field can be changed before training, e.g.
#   `stage_configs["student"].num_epochs = 20` after the configs cell.
