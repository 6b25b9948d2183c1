"""Writes `colab/quickstart.ipynb` and `colab/train_tpu.ipynb` (without outputs).

  python colab/make_notebooks.py

The notebooks are generated so that their cells stay reviewable as code and the files are
reproducible; `tests/test_notebooks.py` checks that the committed ones match this script.
"""

from __future__ import annotations

import pathlib
import textwrap

import nbformat
from nbformat import v4

HERE = pathlib.Path(__file__).resolve().parent

# Cells get fixed ids (nbformat would draw random ones), so regenerating changes nothing.


def _cell(kind: str, cell_id: str, source: str):
  text = textwrap.dedent(source).strip("\n")
  if kind == "md":
    cell = v4.new_markdown_cell(text)
  else:
    cell = v4.new_code_cell(text)
  cell.id = cell_id
  return cell


def md(cell_id: str, source: str):
  return _cell("md", cell_id, source)


def code(cell_id: str, *sources: str, tags: tuple[str, ...] = ()):
  # Several sources make one cell, two blank lines apart (shared helpers are written once).
  text = "\n\n\n".join(textwrap.dedent(src).strip("\n") for src in sources)
  cell = _cell("code", cell_id, text)
  if tags:
    cell.metadata["tags"] = list(tags)
  return cell


def _notebook(cells, extra_metadata=None):
  nb = v4.new_notebook()
  nb.nbformat, nb.nbformat_minor = 4, 5
  nb.metadata = {
    "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
    "language_info": {"name": "python"},
    **(extra_metadata or {}),
  }
  nb.cells = cells
  return nb


# The install logic both notebooks share: an installed package, else the checkout the notebook
# runs in, else a clone of REPO_URL.
_INSTALL = '''
import importlib.util
import pathlib
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
  pip_install(EXTRA_PIP_ARGS"-e", str(checkout))
# configs/ is not part of the installed package, and a package installed by this cell is only
# found by a fresh interpreter: the checkout on sys.path serves both right away.
sys.path.insert(0, str(checkout))
print(f"nextaccel_jax from {checkout}")
'''


# The metrics printer both notebooks' config cells end with.
_SHOW = '''
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
'''


# The training-stage cells both notebooks run, one stage per cell.
_STAGE_CELLS = {
  "aqvae": """
from nextaccel_jax.stages import stage1_aqvae

aqvae_val = stage1_aqvae.train_and_evaluate(stage_configs["aqvae"], workdirs["aqvae"])
show("aqvae", aqvae_val, "recon_all/psnr", "recon_all/ssim", "recon_all/lpips_alex")
""",
  "student": """
from nextaccel_jax.stages import stage2_transformer

student_val = stage2_transformer.train_and_evaluate(stage_configs["student"], workdirs["student"])
show("student", student_val, *STAGE2_KEYS)
""",
  "teacher": """
teacher_val = stage2_transformer.train_and_evaluate(stage_configs["teacher"], workdirs["teacher"])
show("teacher", teacher_val, *STAGE2_KEYS)
""",
}


def _install(*extra: str) -> str:
  return _INSTALL.replace("EXTRA_PIP_ARGS", "".join(f"{e}, " for e in extra))


def quickstart():
  return _notebook(
    [
      md(
        "title",
        """
        # Next-acceleration-scale prediction for MRI reconstruction: quickstart

        This notebook runs the whole method of *Next-Acceleration-Scale Prediction for
        Autoregressive MRI Reconstruction* (Korkmaz & Patel) on synthetic data, one stage per
        cell, through the `nextaccel_jax` package:

        1. **Data**: synthetic brain volumes in the fastMRI multicoil format, undersampled with
           four nested mask families at R = 32, 16, 8, 4, 2 (plus the fully sampled image).
        2. **Stage 1, AQ-VAE**: a tokenizer that turns the image of every acceleration level
           into a token grid (11² for R = 32 up to 16² for the fully sampled image).
        3. **Stage 2, transformer**: a *student* that predicts the tokens of the next
           acceleration level from the R = 32 image and the coarser levels, and a *privileged
           teacher* that sees the fully sampled image.
        4. **Stage 3, distillation**: the student is trained on its own rollouts to match the
           teacher.
        5. **Reconstruction** of validation slices from their R = 32 input, level by level.

        It runs on a laptop and on a Colab CPU, GPU or TPU runtime. The `demo` preset takes
        about half an hour on two CPU cores; `smoke` runs in minutes with tiny models whose
        images are not meant to look good. Each stage writes checkpoints into its own folder,
        so running a cell again resumes where it stopped.
        """,
      ),
      md(
        "parameters-md",
        """
        ## Parameters

        `PRESET` picks the model and data sizes of every stage (`configs/*.py`). `WORKDIR`
        holds one sub-folder per stage and the dataset. `REPO_URL` is only needed where the
        package is not installed and the notebook is not opened from a checkout (e.g. a
        fresh Colab runtime).
        """,
      ),
      code(
        "parameters",
        """
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
        """,
        tags=("parameters",),
      ),
      md(
        "install-md",
        """
        ## Install

        Nothing happens when `nextaccel_jax` is already importable. Otherwise the checkout
        this notebook lives in (or a clone of `REPO_URL`) is installed with pip. The stage
        configs live in the checkout's `configs/` folder, which is put on `sys.path`.
        """,
      ),
      code("install", _install()),
      md(
        "devices-md",
        """
        ## Devices

        JAX uses the accelerator the runtime has (GPU or TPU), else the CPU. Every global
        batch is split over all devices, so each batch size must be a multiple of the device
        count; the next cell rounds the small presets' batch sizes up where needed.
        """,
      ),
      code(
        "configs",
        """
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
        """,
        _SHOW,
      ),
      md(
        "data-md",
        """
        ## Data

        The data stage writes synthetic volumes made from the MNI152 brain template (T1, T2,
        FLAIR with coils, phase and noise) in the fastMRI multicoil `.h5` layout, combines the
        coils into one complex image with coil sensitivity maps (SENSE-1) as for real fastMRI,
        and stores every slice with its undersampled levels as a TFDS dataset. It prints the
        slice counts and the zero-filled PSNR/SSIM table per mask family and acceleration, the
        baseline the models must beat.
        """,
      ),
      code(
        "data",
        """
        from nextaccel_jax.stages import data as data_stage

        data_summary = data_stage.run(stage_configs["data"], workdirs["data"])
        """,
      ),
      md(
        "aqvae-md",
        """
        ## Stage 1: the AQ-VAE tokenizer

        An encoder conditioned on the acceleration and mask family (FiLM) maps each of the six
        levels to a latent grid; one shared codebook quantises it at 11², 12², …, 16² tokens
        (R = 32 → Q32, …, fully sampled → QFS). The loss is 1 − SSIM, LPIPS, an adversarial
        term and the commitment term. Validation reports PSNR, SSIM and LPIPS of the decoded
        images.
        """,
      ),
      code("aqvae", _STAGE_CELLS["aqvae"]),
      md(
        "student-md",
        """
        ## Stage 2: the student transformer

        Given Q32 (the tokens of the R = 32 input) and cross-attention to the features of the
        R = 32 image, the transformer predicts the tokens of R = 16, 8, 4, 2 and the fully
        sampled level, one whole scale at a time. Validation reports token cross-entropy and
        accuracy per scale, and PSNR/SSIM of autoregressive reconstructions.
        """,
      ),
      code("student", _STAGE_CELLS["student"]),
      md(
        "teacher-md",
        """
        ## Stage 2: the privileged teacher

        The same transformer, but its context is the *fully sampled* image, and some of its
        input tokens are replaced by random ones during training (randomised prefixes), so it
        also predicts well after imperfect earlier scales such as a student's. With the small
        presets it starts from the trained student (`teacher.init_from`), as the pipeline does.
        """,
      ),
      code("teacher", _STAGE_CELLS["teacher"]),
      md(
        "distill-md",
        """
        ## Stage 3: on-policy distillation

        The student samples its own token rollouts; on each rollout the frozen teacher's
        next-scale distributions are the target, and the student minimises the reverse KL
        divergence to them. This trains the student on the mistakes it actually makes at
        inference time.
        """,
      ),
      code(
        "distill",
        """
        from nextaccel_jax.stages import stage3_distill

        if RUN_DISTILL:
          distill_dir = workdirs["distill"]
          distill_val = stage3_distill.train_and_evaluate(stage_configs["distill"], distill_dir)
          show("distill", distill_val, "kl", "recon/psnr", "recon/ssim")
        else:
          print("stage 3 skipped (RUN_DISTILL = False): the stage-2 student reconstructs")
        """,
      ),
      md(
        "reconstruct-md",
        """
        ## Reconstruction

        One validation slice under each mask family's evaluation mask at R = 32. The
        `Reconstructor` encodes the R = 32 image into Q32, generates the five finer token scales
        with the transformer and decodes them; `return_intermediates=True` also decodes the
        first k + 1 token scales together for every k (Q32, +Q16, …, +QFS; the last one is
        the reconstruction).
        """,
      ),
      code(
        "reconstruct",
        """
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
        """,
      ),
      md(
        "figure-md",
        """
        Rows: mask families. Columns: the zero-filled R = 32 input, the image decoded from the
        token scales so far, the error of the reconstruction (|recon − target| over the
        target's maximum) and the fully sampled target. The figures are also saved under
        `WORKDIR/figures/`.
        """,
      ),
      code(
        "figure",
        """
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
        """,
      ),
      md(
        "scores-md",
        """
        ## Scores

        PSNR and SSIM under the paper's protocol (each image divided by its own maximum), the
        reconstruction against the zero-filled R = 32 input. A single slice is only an
        illustration; the evaluation stage (`configs/eval.py`, or the last step of
        `configs/demo.py`) scores whole splits under both the paper's and fastMRI's protocol.
        """,
      ),
      code(
        "scores",
        """
        from nextaccel_jax.evaluation import metrics

        zero_filled = metrics.evaluate_slices(targets, inputs, "paper")
        reconstructed = metrics.evaluate_slices(targets, recons, "paper")
        print(f"{'family':<12} {'zero-filled PSNR / SSIM':>24} {'model PSNR / SSIM':>20}")
        for i, family in enumerate(masks.FAMILIES):
          zf = f"{zero_filled['psnr'][i]:.2f} / {zero_filled['ssim'][i]:.4f}"
          rc = f"{reconstructed['psnr'][i]:.2f} / {reconstructed['ssim'][i]:.4f}"
          print(f"{family:<12} {zf:>24} {rc:>20}")
        """,
      ),
      md(
        "next-md",
        """
        ## Next steps

        - The same stages from the command line, plus export and the evaluation report:
          `python -m nextaccel_jax.main --config=configs/demo.py --workdir=runs/demo`.
        - Real fastMRI data and the paper's model sizes on a TPU: `colab/train_tpu.ipynb`.
        - Any config field can be changed before training, e.g.
          `stage_configs["student"].num_epochs = 20` after the configs cell.
        """,
      ),
    ]
  )


def train_tpu():
  return _notebook(
    [
      md(
        "title",
        """
        # Next-acceleration-scale prediction: the paper's models on a TPU

        Trains the paper-size AQ-VAE, student, privileged teacher and distilled student on the
        fastMRI brain multicoil data, and fastMRI's U-Net as a baseline, then exports the
        distilled student and evaluates it against the stage-2 student, the U-Net and the
        zero-filled input, one stage per cell through the `nextaccel_jax` package.

        This is a long job (days of TPU time at the paper's epochs). Every stage checkpoints
        into its own folder under `WORKDIR`: when a runtime is recycled, reconnect, run the
        cells from the top again and each finished stage returns at once while an interrupted
        one resumes from its last checkpoint. Keep `WORKDIR` on persistent storage.
        """,
      ),
      md(
        "connect-md",
        """
        ## 1. Connect to a TPU runtime

        In Colab: *Runtime → Change runtime type → TPU*, then *Connect*. On a Cloud TPU VM,
        start Jupyter on the VM and open this notebook there. The device check below stops
        with an explanation when no TPU is attached.
        """,
      ),
      md(
        "parameters-md",
        """
        ## 2. Parameters

        - `WORKDIR`: one folder per stage (checkpoints, metrics, the export, the report).
          A path under `/content/drive` mounts Google Drive, so the checkpoints outlive the
          runtime. It must be a local or mounted path: the stages write with local file
          operations.
        - `TFDS_DATA_DIR`: where the processed dataset is written and read, on a fast local
          disk. `GCS_TFDS_DIR` (a `gs://` path, optional) keeps a copy in a Cloud Storage
          bucket: it is copied to `TFDS_DATA_DIR` when present and uploaded after building.
        - `FASTMRI_DIR`: the folder holding the extracted `multicoil_train/` and
          `multicoil_val/` brain archives (optionally `multicoil_test_full/`).
        - `BIOMEDCLIP_WEIGHTS`, `VAR_VAE`: optional pretrained weights (see the README).
        """,
      ),
      code(
        "parameters",
        """
        REPO_URL = ""  # git URL of the nextaccel_jax repository (not needed inside a checkout)
        FORCE_INSTALL = False  # reinstall even when nextaccel_jax is importable
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
        """,
        tags=("parameters",),
      ),
      md(
        "install-md",
        """
        ## 3. Install

        Installs the package with `jax[tpu]` (JAX with the TPU runtime, `libtpu`). When JAX
        was already imported in this runtime, restart it (*Runtime → Restart session*) after
        this cell and run the notebook again from the top.
        """,
      ),
      code("install", _install('"jax[tpu]"')),
      code(
        "devices",
        """
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
        """,
      ),
      md(
        "mesh-md",
        """
        ## 4. Device mesh

        Every stage builds its mesh from its `config.mesh`: by default one `data` axis over all
        TPU cores, so each global batch is split over them (batch sizes must be multiples of
        the core count) and the parameters are replicated. An `fsdp` axis also shards the
        parameters and optimizer moments, e.g. `config.student.mesh = (("data", -1),
        ("fsdp", 4))` in the overrides cell below. Each stage prints its train step's memory
        per core when it starts, and stops there with what to change if it cannot fit.
        """,
      ),
      code(
        "mesh",
        """
        from nextaccel_jax import sharding

        mesh = sharding.make_mesh()
        print(mesh)
        print(dict(mesh.shape))
        """,
      ),
      md(
        "storage-md",
        """
        ## 5. Storage

        Mounts Google Drive when `WORKDIR` or `FASTMRI_DIR` lies under `/content/drive`, and
        fetches the processed dataset from `GCS_TFDS_DIR` if a copy is there (Colab asks for
        Google Cloud access first).
        """,
      ),
      code(
        "storage",
        """
        import os

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
        """,
      ),
      md(
        "data-md",
        """
        ## 6. The fastMRI dataset

        fastMRI is not redistributable: request access at <https://fastmri.med.nyu.edu/>,
        download the **brain multicoil** train and validation archives and extract them into
        `FASTMRI_DIR`. Building reads every slice, removes the readout oversampling,
        compresses the coils to 5 virtual coils, combines them with ESPIRiT maps, centre-crops
        to 256² and stores the undersampled levels of the evaluation masks. It takes hours on
        a few cores and resumes where it stopped; once built, this cell only opens the dataset.
        Volumes that cannot give a 256² crop and unreadable files are skipped and listed.
        """,
      ),
      code(
        "data",
        """
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
        """,
      ),
      md(
        "configs-md",
        """
        ## 7. Configs

        `configs/pipeline.py:paper` holds every stage's config (`config.aqvae`,
        `config.student`, `config.teacher`, `config.distill`, `config.evaluate`), each the
        same as `configs/<stage>.py:paper`. Change fields in the next cell before the stage
        configs are derived: the epochs, the global batch sizes (multiples of the core count),
        the learning rates. `max_steps_per_run` ends a stage's cell after that many steps, so
        a long stage can be split over several sessions (run the cell again to continue).
        """,
      ),
      code(
        "config",
        """
        from configs import pipeline as pipeline_config

        config = pipeline_config.get_config("paper")
        config.data_dir = TFDS_DATA_DIR
        config.aqvae.disc.weights = BIOMEDCLIP_WEIGHTS
        config.aqvae.init_from = VAR_VAE
        """,
      ),
      code(
        "overrides",
        """
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
        """,
      ),
      code(
        "stage-configs",
        """
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
        """,
        _SHOW,
      ),
      md(
        "aqvae-md",
        """
        ## 8. Stage 1: the AQ-VAE tokenizer

        VAR's VQ-VAE with FiLM conditioning on the acceleration and mask family and one 4096 ×
        32 codebook for the six levels (11² … 16² tokens). Loss: 1 − SSIM, 0.1 · LPIPS, 0.1 ·
        adversarial (BiomedCLIP-based discriminator) and the commitment term.
        """,
      ),
      code("aqvae", _STAGE_CELLS["aqvae"]),
      md(
        "student-md",
        """
        ## 9. Stage 2: the student

        Depth-16 transformer with cross-attention to the R = 32 image's encoder features; it
        predicts Q16 … QFS scale by scale from Q32.
        """,
      ),
      code("student", _STAGE_CELLS["student"]),
      md(
        "teacher-md",
        """
        ## 10. Stage 2: the privileged teacher

        The same architecture with the fully sampled image as its context, trained on
        randomised prefixes.
        """,
      ),
      code("teacher", _STAGE_CELLS["teacher"]),
      md(
        "distill-md",
        """
        ## 11. Stage 3: on-policy distillation

        The student, initialised from stage 2, minimises the reverse KL to the frozen teacher
        on its own sampled rollouts.
        """,
      ),
      code(
        "distill",
        """
        from nextaccel_jax.stages import stage3_distill

        distill_dir = workdirs["distill"]
        distill_val = stage3_distill.train_and_evaluate(stage_configs["distill"], distill_dir)
        show("distill", distill_val, "kl", "recon/psnr", "recon/ssim")
        """,
      ),
      md(
        "unet-md",
        """
        ## 12. Baseline: the U-Net

        fastMRI's U-Net (32 channels, 4 poolings) on the same data: the R = 32 image in, the
        magnitude out, L1 loss, RMSprop with fastMRI's step decay. The evaluation compares it
        with the transformer as the row `unet`.
        """,
      ),
      code(
        "unet",
        """
        from nextaccel_jax.stages import baseline

        unet_val = baseline.train_and_evaluate(stage_configs["unet"], workdirs["unet"])
        show("unet", unet_val, "recon/psnr", "recon/ssim", "zero_filled/ssim")
        """,
      ),
      md(
        "export-md",
        """
        ## 13. Export

        One Orbax checkpoint with everything inference needs: the tokenizer, the distilled
        student, their configs and the data conventions. Load it anywhere with
        `export.load_reconstructor(path)`.
        """,
      ),
      code(
        "export",
        """
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
        """,
      ),
      md(
        "evaluate-md",
        """
        ## 14. Evaluation

        The stage-2 student (`base`), the exported distilled student and the U-Net reconstruct
        every test slice from R = 32 under each mask family; PSNR, SSIM and LPIPS per contrast
        under the paper's and fastMRI's protocols, against the zero-filled input. Writes
        `report.md`, `per_slice.csv` and figure grids into `WORKDIR/evaluate`.
        """,
      ),
      code(
        "evaluate",
        """
        from IPython.display import Image, Markdown, display

        from nextaccel_jax.stages import evaluate

        eval_metrics = evaluate.run(stage_configs["evaluate"], workdirs["evaluate"])
        display(Markdown((workdirs["evaluate"] / "report.md").read_text()))
        for png in sorted((workdirs["evaluate"] / "figures").glob("*.png")):
          display(Image(filename=png))
        """,
      ),
    ],
    extra_metadata={"accelerator": "TPU", "colab": {"provenance": []}},
  )


NOTEBOOKS = {"quickstart.ipynb": quickstart, "train_tpu.ipynb": train_tpu}


def main() -> None:
  for name, make in NOTEBOOKS.items():
    nb = make()
    nbformat.validate(nb)
    nbformat.write(nb, HERE / name)
    print(f"wrote {HERE / name}")


if __name__ == "__main__":
  main()
