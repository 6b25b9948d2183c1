"""Baselines: fastMRI's U-Net and E2E-VarNet trained on the same data (the paper's Tables 1–3).

  # U-Net at the demo size (the argument is `<model>[,<preset>]`, the preset demo by default):
  python -m nextaccel_jax.main --config=configs/baseline.py:unet --workdir=runs/unet
  # E2E-VarNet at the paper's size on real fastMRI:
  python -m nextaccel_jax.main --config=configs/baseline.py:varnet,paper --workdir=runs/varnet \
      --config.data.data_dir=$TFDS_DATA_DIR
  # Tiny and fast (the tests):
  python -m nextaccel_jax.main --config=configs/baseline.py:varnet,smoke --workdir=/tmp/varnet

The U-Net reads the R = 32 image (`[real, imag]`) and predicts the magnitude; E2E-VarNet reads
the measured R = 32 multicoil k-space (formed in the step from the coil maps and the mask) and
predicts the RSS magnitude. Both are trained against the fully sampled magnitude with fastMRI's
recipes: U-Net L1 with RMSprop 1e-3, E2E-VarNet SSIM with Adam 3e-4, both ×0.1 after 40 of 50
epochs. Evaluate a trained baseline as a row of the report with
`--config.models.unet=runs/unet` (configs/eval.py).
"""

import ml_collections

from configs import common

MODELS = ("unet", "varnet")


def parse_arg(arg: str) -> tuple[str, str]:
  """`(model, preset)` of `"<model>[,<preset>]"`; the preset defaults to demo."""
  parts = [p.strip() for p in str(arg).split(",")]
  if len(parts) > 2 or not parts[0]:
    raise ValueError(
      f"configs/baseline.py:{arg}: expected <model>[,<preset>], e.g. unet or varnet,smoke"
    )
  model, preset = parts[0], parts[1] if len(parts) == 2 else "demo"
  if model not in MODELS:
    raise ValueError(f"unknown baseline model {model!r}; choose one of {', '.join(MODELS)}")
  return model, common.check_preset(preset)


def model_config(model: str, preset: str) -> ml_collections.ConfigDict:
  """The module's fields (`inference.make_baseline`)."""
  m = ml_collections.ConfigDict()
  if model == "unet":
    # Input: the R = 32 image as [real, imag]; output 1: the magnitude, 2: [real, imag].
    m.in_chans, m.out_chans = 2, 1
    m.chans, m.num_pool_layers = {"paper": (32, 4), "demo": (16, 4), "smoke": (8, 2)}[preset]
    m.drop_prob = 0.0
  else:
    # Cascades, each a U-Net regulariser (chans, pools) with soft data consistency, after a
    # sensitivity-estimation U-Net (sens_chans, sens_pools). The single-coil variant (maps of
    # one) follows config.data.single_coil.
    m.num_cascades, m.chans, m.pools, m.sens_chans, m.sens_pools = {
      "paper": (12, 18, 4, 8, 4),
      "demo": (4, 8, 3, 4, 3),
      "smoke": (1, 4, 1, 4, 1),
    }[preset]
    # Estimate the maps from the mask's fully sampled low-frequency box only (fastMRI's default)
    # or, False, from all measured samples. Some R = 32 radial masks leave only the DC point as
    # that box: its coil images are constant, and the NormUnet divides by their zero standard
    # deviation.
    m.mask_center = False
    m.drop_prob = 0.0
  m.dtype = "float32"
  m.param_dtype = "float32"
  return m


def get_config(arg: str = "unet") -> ml_collections.ConfigDict:
  model, preset = parse_arg(arg)
  config = ml_collections.ConfigDict()
  config.stage = "baseline"
  config.seed = 0
  # Which baseline: "unet" or "varnet" (inference.BASELINES).
  config.model_name = model
  batch = {"paper": 16 if model == "unet" else 8, "demo": 8, "smoke": 8}[preset]
  config.data = common.data_config(preset, batch_size=batch)
  config.model = model_config(model, preset)

  config.loss = ml_collections.ConfigDict()
  # Weights of the terms against the fully sampled magnitude: mean absolute error (over
  # [real, imag] when the model outputs the complex image) and 1 − SSIM (paper window).
  config.loss.l1 = 1.0 if model == "unet" else 0.0
  config.loss.ssim = 0.0 if model == "unet" else 1.0

  config.optim = ml_collections.ConfigDict()
  # fastMRI's modules: RMSprop for the U-Net, Adam for E2E-VarNet (PyTorch's definitions).
  config.optim.name = "rmsprop" if model == "unet" else "adam"
  config.optim.lr = 1e-3 if model == "unet" else 3e-4
  # Fractions of the run after which the rate is multiplied by decay_factor (40 of 50 epochs).
  config.optim.decay_at = (0.8,)
  config.optim.decay_factor = 0.1
  # PyTorch-style L2 added to the gradient (fastMRI: 0).
  config.optim.weight_decay = 0.0
  # Global-norm clipping (fastMRI: none); 0 = off.
  config.optim.grad_clip = 0.0

  config.num_epochs = {"paper": 50, "demo": 0, "smoke": 0}[preset]
  # Overrides num_epochs when > 0. Fixed counts (deterministic, unlike a time limit); at the demo
  # size about 7 minutes on two CPU cores (U-Net ≈ 0.22 s, E2E-VarNet ≈ 0.5 s per step). The demo
  # pipeline sets its own count, the wall time of its stage 1 + student (configs/demo.py).
  demo_steps = 1800 if model == "unet" else 600
  config.num_train_steps = {"paper": 0, "demo": demo_steps, "smoke": 3}[preset]
  config.max_steps_per_run = 0
  config.log_every = {"paper": 100, "demo": 20, "smoke": 1}[preset]

  config.eval = ml_collections.ConfigDict()
  config.eval.every = {"paper": 2000, "demo": 450 if model == "unet" else 200, "smoke": 3}[preset]
  config.eval.batch_size = 8
  # Validation slices per mask family (0 = all).
  config.eval.max_records = {"paper": 0, "demo": 0, "smoke": 2}[preset]
  config.eval.protocol = "paper"
  # LPIPS nets of the validation lines (the smoke preset skips them for speed).
  config.eval.lpips_nets = () if preset == "smoke" else ("alex",)

  config.ckpt = ml_collections.ConfigDict()
  config.ckpt.every = {"paper": 2000, "demo": 450 if model == "unet" else 200, "smoke": 2}[preset]
  config.ckpt.max_to_keep = 3
  common.set_parallelism(config)
  return config
