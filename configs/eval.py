"""Evaluation: trained models reconstruct a split at R = 32 under every mask family; PSNR, SSIM
and LPIPS per slice under both metric protocols, tables per family × contrast like the paper's,
a per-slice CSV and figure grids (decisions.md §7).

  python -m nextaccel_jax.main --config=configs/eval.py:demo --workdir=runs/eval \
      --config.models.base=runs/student --config.models.distilled=runs/distill
  # An exported model (a folder written by nextaccel_jax.export) works the same way:
  python -m nextaccel_jax.main --config=configs/eval.py:paper --workdir=runs/eval_paper \
      --config.models.distilled=exports/distilled --config.data.data_dir=$TFDS_DATA_DIR

Each entry of `config.models` names a table row and points at a stage-2/3 workdir (its
`config.json` names the tokenizer; `config.tokenizer_from` overrides it), at an export folder, or
at a baseline workdir (`--config.models.unet=runs/unet --config.models.varnet=runs/varnet`, see
configs/baseline.py). Empty entries are skipped.
"""

import ml_collections

from configs import common


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
  preset = common.check_preset(arg)
  config = ml_collections.ConfigDict()
  config.stage = "evaluate"
  config.seed = 0
  batch_size = {"paper": 32, "demo": 8, "smoke": 8}[preset]
  # The stage reads `config.batch_size`; `data.batch_size` mirrors it for the shared data section.
  config.data = common.data_config(preset, batch_size=batch_size)

  # Row name → stage-2/3 workdir, export folder or baseline workdir (configs/baseline.py), in
  # table order; "" leaves the row out. Unsorted so that the rows keep the order written here.
  config.models = ml_collections.ConfigDict(sort_keys=False)
  config.models.base = ""
  config.models.distilled = ""
  config.models.unet = ""
  config.models.varnet = ""
  # Stage-1 workdir overriding the tokenizer a workdir's config.json names (exports carry theirs).
  config.tokenizer_from = ""

  config.split = "validation"
  config.families = ("cartesian_y", "cartesian_x", "gaussian_2d", "radial")
  # Slices per family, the first ones of the split (0 = all).
  config.max_records = {"paper": 0, "demo": 0, "smoke": 2}[preset]
  # Global batch; must be divisible by the number of devices.
  config.batch_size = batch_size
  config.protocols = ("paper", "fastmri")
  # LPIPS-alex is the paper's main table; vgg and DISTS are its Supp. Table 2.
  config.lpips_nets = ("alex", "vgg")
  # DISTS needs dists-pytorch (its trained α, β); without it the report says "DISTS: off".
  config.dists = True

  # Token selection variants; the first one feeds the figures. The paper and demo presets add the
  # paper's Table 4 sampling (top-k then top-p, `top_k_top_p`); "multinomial", "top_k" and "top_p"
  # are the other variants (`stages.evaluate.DECODINGS`).
  config.decoding = ("argmax",) if preset == "smoke" else ("argmax", "top_k_top_p")
  config.sampling = ml_collections.ConfigDict()
  config.sampling.temperature = 1.0
  # Table 4: top-k 900 of V = 4096 and top-p 0.96; the small presets keep the same share of their
  # vocabularies (512, 64).
  config.sampling.top_k = {"paper": 900, "demo": 112, "smoke": 14}[preset]
  config.sampling.top_p = 0.96

  config.data_consistency = ml_collections.ConfigDict()
  # Also score every model with its measured R = 32 samples enforced (decisions.md §6), as rows
  # named "<model>+DC"; the plain rows are the paper's protocol.
  config.data_consistency.enabled = True
  # Steps of x ← x + x_32 − A^H M A x (multicoil, the stored coil maps).
  config.data_consistency.iterations = 10
  # "input": the reconstruction's magnitude with the R = 32 image's phase (the tokenizer is
  # trained on magnitudes); "model": the decoded phase.
  config.data_consistency.phase = "input"

  # Where quality is lost, per transformer model: decodes of the tokenizer's true tokens (all six
  # levels; FS alone), of one teacher-forced pass and of the free rollout, token accuracy per
  # scale, and figures/<family>_<model>_diagnostics.png (the report's "Where quality is lost").
  config.diagnostics = True

  config.figures = ml_collections.ConfigDict()
  # Slices per family grid, spread over volumes and contrasts; 0 = no figures.
  config.figures.num_slices = 4 if preset != "smoke" else 2
  # Also draw the cumulative per-scale decodings of every transformer model.
  config.figures.levels = True
  # Mesh axes as (name, size) pairs; -1 takes the remaining devices.
  config.mesh = (("data", -1),)
  return config
