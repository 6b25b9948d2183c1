"""The whole method on the built-in synthetic data, end to end, on a laptop-class CPU.

  python -m nextaccel_jax.main --config=configs/demo.py --workdir=runs/demo

Builds the demo dataset (synthetic fastMRI-format volumes made from the MNI152 brain template),
trains the AQ-VAE, the stage-2 student and teacher, distils the student, trains the U-Net baseline
(1800 steps, about half of stage 1 + student's wall time), exports the student and writes
`runs/demo/evaluate/report.md`. About half an hour on two CPU cores; run it again to resume.
`configs/demo.py:smoke` is a minutes-long version with tiny models, used by the tests.
"""

import ml_collections

from configs import common, pipeline


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
  return pipeline.get_config(common.check_preset(arg, ("demo", "smoke")))
