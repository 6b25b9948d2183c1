"""Stage 3: on-policy privileged distillation (decisions.md §5).

  python -m nextaccel_jax.main --config=configs/distill.py:demo --workdir=runs/distill \
      --config.init_from=runs/student --config.teacher_from=runs/teacher

The student starts from the stage-2 student workdir `init_from`; the teacher is the frozen stage-2
teacher `teacher_from`; the tokenizer is the stage-1 workdir the student recorded (or
`tokenizer_from`). Model sizes must equal those of the stage-2 runs (same preset).
"""

import ml_collections

from configs import aqvae as aqvae_config
from configs import common
from configs import transformer as transformer_config


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
  preset = common.check_preset(arg)
  config = ml_collections.ConfigDict()
  config.stage = "distill"
  config.seed = 0
  config.data = common.data_config(preset, batch_size={"paper": 24, "demo": 8, "smoke": 8}[preset])
  config.tokenizer = aqvae_config.model_config(preset)
  config.model = transformer_config.model_config(preset, "student")
  config.teacher = transformer_config.model_config(preset, "teacher")
  # Stage-2 student workdir (required): the student's starting weights.
  config.init_from = ""
  # Stage-2 teacher workdir (required): frozen throughout.
  config.teacher_from = ""
  # Stage-1 workdir; empty uses the one recorded in the student's config.json.
  config.tokenizer_from = ""
  config.trainable_context_encoder = True

  config.distill = ml_collections.ConfigDict()
  # "reverse": KL(p_student ‖ p_teacher), the paper's; "forward": KL(p_teacher ‖ p_student).
  config.distill.direction = "reverse"
  # How the on-policy rollout picks tokens: multinomial over the full softmax by default.
  config.distill.rollout = ml_collections.ConfigDict(
    {"greedy": False, "temperature": 1.0, "top_k": 0, "top_p": 0.0}
  )

  config.optim = ml_collections.ConfigDict()
  config.optim.lr = {"paper": 1e-5, "demo": 3e-5, "smoke": 1e-4}[preset]
  config.optim.end_lr = 0.0
  config.optim.schedule = "cosine"
  config.optim.warmup_steps = {"paper": 500, "demo": 5, "smoke": 1}[preset]
  config.optim.b1 = 0.9
  config.optim.b2 = 0.95
  config.optim.weight_decay = 0.05
  config.optim.grad_clip = 2.0

  config.num_epochs = {"paper": 100, "demo": 2, "smoke": 1}[preset]
  # Overrides num_epochs when > 0.
  config.num_train_steps = {"paper": 0, "demo": 0, "smoke": 2}[preset]
  config.max_steps_per_run = 0
  config.log_every = {"paper": 50, "demo": 8, "smoke": 1}[preset]

  config.eval = ml_collections.ConfigDict()
  config.eval.every = {"paper": 2000, "demo": 12, "smoke": 2}[preset]
  config.eval.batch_size = 8
  config.eval.max_records = {"paper": 0, "demo": 0, "smoke": 2}[preset]
  config.eval.recon_batches = {"paper": 8, "demo": 0, "smoke": 1}[preset]
  config.eval.protocol = "paper"

  config.ckpt = ml_collections.ConfigDict()
  config.ckpt.every = {"paper": 2000, "demo": 12, "smoke": 2}[preset]
  config.ckpt.max_to_keep = 3
  common.set_parallelism(config)
  return config
