"""Stage 2 settings shared by `configs/student.py` and `configs/teacher.py` (decisions.md §4).

The tokenizer sizes come from `configs/aqvae.py`, so both stages agree on the AQ-VAE; its trained
weights come from `tokenizer_from` (a stage-1 workdir).
"""

import ml_collections

from configs import aqvae as aqvae_config
from configs import common

ROLES = ("student", "teacher")


def model_config(preset: str, role: str) -> ml_collections.ConfigDict:
  m = ml_collections.ConfigDict()
  if preset == "paper":
    m.depth, m.width, m.num_heads = 16, 1024, 16
  elif preset == "demo":
    m.depth, m.width, m.num_heads = 4, 128, 4
  else:
    m.depth, m.width, m.num_heads = 2, 32, 2
  m.mlp_ratio = 4.0
  # Encoder levels the cross-attention reads, coarse first, spread evenly over the blocks.
  # The paper's 64² level is the image itself at the small presets' 64² and too costly on CPU.
  m.context_levels = {
    "paper": ("mid", "pre_mid", "32", "64"),
    "demo": ("mid", "pre_mid", "32"),
    "smoke": ("mid", "32"),
  }[preset]
  m.drop_path_rate = 0.025 if preset == "paper" else 0.0
  m.role = role
  # Teacher only: each input token id is replaced by a uniform random id with probability
  # p ~ U(0, prefix_noise_max) per sample (the paper does not give the bound).
  m.prefix_noise_max = 0.5 if role == "teacher" else 0.0
  # "mean": block k sees the mean of scales < k (what the tokenizer decodes); "previous": h_{k-1}.
  m.input_mode = "mean"
  # Table 4 ablations (configs/ablations.py). False: no context encoder and no cross-attention;
  # the model is conditioned on the mask family through adaLN only, like VAR on its class.
  m.cross_attention = True
  # True: flat 16² tokens at every scale (five blocks of 16² positions), tokenised by the same
  # stage-1 tokenizer at its full latent grid instead of its 12² … 16² hierarchy.
  m.flat_tokens = False
  # Rematerialisation policy of the blocks: "none", "full", "dots" or "dots_no_batch".
  m.remat = "full" if preset == "paper" else "none"
  # Compute dtype; norms, softmax, logits and the loss stay float32.
  m.dtype = "bfloat16" if preset == "paper" else "float32"
  return m


def get_config(role: str, preset: str) -> ml_collections.ConfigDict:
  if role not in ROLES:
    raise ValueError(f"unknown role {role!r}; choose one of {', '.join(ROLES)}")
  preset = common.check_preset(preset)
  config = ml_collections.ConfigDict()
  config.stage = "transformer"
  config.seed = 0
  config.data = common.data_config(preset, batch_size={"paper": 40, "demo": 8, "smoke": 8}[preset])
  config.tokenizer = aqvae_config.model_config(preset)
  # Stage-1 workdir (its best checkpoint is used) or checkpoint folder holding the tokenizer.
  config.tokenizer_from = ""
  config.model = model_config(preset, role)
  # Train the context encoder (a copy of the stage-1 FiLM encoder, initialised from it).
  config.trainable_context_encoder = True
  # Previous weights of this transformer (e.g. a converted VAR d16); empty = from scratch.
  config.init_from = ""

  config.optim = ml_collections.ConfigDict()
  config.optim.lr = {"paper": 3.125e-5, "demo": 1e-3, "smoke": 1e-3}[preset]
  config.optim.end_lr = 0.0
  config.optim.schedule = "linear"
  config.optim.warmup_steps = {"paper": 2000, "demo": 20, "smoke": 1}[preset]
  config.optim.b1 = 0.9
  config.optim.b2 = 0.95
  config.optim.weight_decay = 0.05
  config.optim.grad_clip = 2.0

  # The demo teacher gets fewer epochs so that the whole demo fits its half-hour CPU budget.
  config.num_epochs = {"paper": 250, "demo": 12 if role == "student" else 6, "smoke": 1}[preset]
  # Overrides num_epochs when > 0.
  config.num_train_steps = {"paper": 0, "demo": 0, "smoke": 3}[preset]
  config.max_steps_per_run = 0
  config.log_every = {"paper": 50, "demo": 10, "smoke": 1}[preset]

  config.eval = ml_collections.ConfigDict()
  config.eval.every = {"paper": 5000, "demo": 72, "smoke": 3}[preset]
  config.eval.batch_size = 8
  # Validation slices per mask family for teacher-forced metrics (0 = all).
  config.eval.max_records = {"paper": 0, "demo": 0, "smoke": 2}[preset]
  # Batches of autoregressive reconstruction (argmax) scored with PSNR/SSIM/LPIPS (0 = all).
  config.eval.recon_batches = {"paper": 8, "demo": 0, "smoke": 1}[preset]
  config.eval.protocol = "paper"

  config.ckpt = ml_collections.ConfigDict()
  config.ckpt.every = {"paper": 5000, "demo": 24, "smoke": 2}[preset]
  config.ckpt.max_to_keep = 3
  common.set_parallelism(config)
  return config
