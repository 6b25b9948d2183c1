"""The whole method on the built-in synthetic data, end to end, on a laptop-class CPU.

  python -m nextaccel_jax.main --config=configs/demo.py --workdir=runs/demo
  python -m nextaccel_jax.main --config=configs/demo.py:long --workdir=runs/demo_long

Builds the demo dataset (synthetic fastMRI-format volumes made from the MNI152 brain template),
trains the AQ-VAE, the stage-2 student and teacher, distils the student, trains the U-Net baseline
for the wall time of stage 1 + student, exports the student and writes
`<workdir>/evaluate/report.md`. About half an hour on two CPU cores; run it again to resume.

`long` is the same models trained about four times longer (about two hours on two cores): the
half-hour budget leaves the transformer far from trained, which the report's "Where quality is
lost" section shows (the per-scale prediction, not the tokenizer, loses most of the SSIM).
`configs/demo.py:smoke` is a minutes-long version with tiny models, used by the tests.
"""

import ml_collections

from configs import common, pipeline

PRESETS = ("demo", "long", "smoke")

# Training lengths of the two demo budgets, in epochs of the 96 training slices (the U-Net in
# steps). Per step on two idle cores, validation included: AQ-VAE ≈ 1.5 s (batch 4), student and
# teacher ≈ 4.5 s, distillation ≈ 8.5 s (batch 8), U-Net ≈ 0.19 s (batch 8). The half-hour run gives
# the U-Net less than aqvae + student's wall time; the long one sizes it to that wall time (≈ 50
# min). pipeline.md and the report's header compare the measured times.
EPOCHS = {
  "demo": {"aqvae": 12, "student": 9, "teacher": 3, "distill": 2, "unet_steps": 1500},
  "long": {"aqvae": 36, "student": 36, "teacher": 8, "distill": 4, "unet_steps": 16000},
}


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
  preset = common.check_preset(arg, PRESETS)
  if preset == "smoke":
    return pipeline.get_config("smoke")
  config = pipeline.get_config("demo")
  config.preset = preset
  lengths = EPOCHS[preset]
  for stage in ("aqvae", "student", "teacher", "distill"):
    config[stage].num_epochs = lengths[stage]
  unet = config.unet
  unet.num_train_steps = lengths["unet_steps"]
  # Four validation passes and checkpoints over the run, whatever its length.
  unet.eval.every = unet.ckpt.every = lengths["unet_steps"] // 4
  if preset == "long":
    # Validation and checkpoints about as often, relative to the run, as in the half-hour one.
    for stage in ("aqvae", "student", "teacher", "distill"):
      c = config[stage]
      c.eval.every *= 4
      c.ckpt.every *= 4
  return config
