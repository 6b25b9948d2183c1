"""Stage 2, student: context from the R = 32 image, plain teacher forcing.

  python -m nextaccel_jax.main --config=configs/student.py:demo --workdir=runs/student \
      --config.tokenizer_from=runs/aqvae
"""

from configs import transformer


def get_config(arg: str = "demo"):
  return transformer.get_config("student", arg)
