"""Stage 2, privileged teacher: context from the fully sampled image, randomised prefix tokens.

  python -m nextaccel_jax.main --config=configs/teacher.py:demo --workdir=runs/teacher \
      --config.tokenizer_from=runs/aqvae
"""

from configs import transformer


def get_config(arg: str = "demo"):
  return transformer.get_config("teacher", arg)
