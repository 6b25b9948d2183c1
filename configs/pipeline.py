"""Every stage in order, each in its own sub-folder of the workdir (decisions.md §8).

  python -m nextaccel_jax.main --config=configs/pipeline.py:paper --workdir=runs/paper \
      --config.data_dir=$TFDS_DATA_DIR --config.data.manual_dir=/data/fastmri_brain

data → aqvae → student → teacher → distill → unet → export → evaluate. A stage that finished is
skipped when the command is run again; one that was interrupted resumes from its own checkpoints.
Each stage's section is that stage's own config (`configs/<stage>.py`), so any field can be
overridden, e.g. `--config.student.num_epochs=4`; the paths between stages are filled in by the
pipeline. `configs/demo.py` is this with the demo preset.

The `unet` step trains fastMRI's U-Net baseline (`configs/baseline.py`) on the same data for a
fixed number of steps, `--config.unet.num_train_steps`; it must take at most the wall time of
aqvae + student, and pipeline.md and the report's header show both. The evaluation compares it
with the transformer as the row `unet`.
"""

import ml_collections

from configs import aqvae, baseline, common, data, distill, student, teacher
from configs import eval as eval_config

STEPS = ("data", "aqvae", "student", "teacher", "distill", "unet", "export", "evaluate")


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
  preset = common.check_preset(arg)
  config = ml_collections.ConfigDict()
  config.stage = "pipeline"
  config.preset = preset
  # Seed of every stage (initialisation, batch order, masks, sampling), e.g. --config.seed=1 for
  # another run of the same command; the dataset does not change with it.
  config.seed = 0
  # TFDS data dir shared by every stage; empty: $TFDS_DATA_DIR, else <workdir>/tensorflow_datasets.
  config.data_dir = ""
  config.steps = STEPS
  config.data = data.get_config(preset)
  config.aqvae = aqvae.get_config(preset)
  config.student = student.get_config(preset)
  config.teacher = teacher.get_config(preset)
  config.distill = distill.get_config(preset)
  config.unet = baseline.get_config(f"unet,{preset}")
  config.evaluate = eval_config.get_config(preset)
  # The report compares the stage-2 student with the distilled one on the held-out test split
  # (validation already picked the checkpoints).
  config.evaluate.split = "test"
  # Start the privileged teacher from the trained student (its weights, a fresh optimiser) rather
  # than from scratch: the small presets' budgets are too short for a teacher trained from nothing
  # to beat the student, and distilling from a weaker teacher only makes the student worse.
  config.teacher_from_student = preset != "paper"
  if config.teacher_from_student:
    config.teacher.optim.lr = 3e-4
  config.export = ml_collections.ConfigDict()
  # Export the best distilled checkpoint (False: the latest).
  config.export.best = True
  return config
