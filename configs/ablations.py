"""The paper's component ablations and decoding variants (Table 4), all from one stage-1 run.

  # Against a trained tokenizer, e.g. the demo pipeline's (its dataset is reused):
  python -m nextaccel_jax.main --config=configs/ablations.py:demo --workdir=runs/ablations \
      --config.tokenizer_from=runs/demo/aqvae
  # Without tokenizer_from the AQ-VAE is trained first, in <workdir>/aqvae:
  python -m nextaccel_jax.main --config=configs/ablations.py:demo --workdir=runs/ablations
  # Paper size on real fastMRI:
  python -m nextaccel_jax.main --config=configs/ablations.py:paper --workdir=runs/ablations \
      --config.tokenizer_from=runs/paper/aqvae --config.data_dir=$TFDS_DATA_DIR

One stage-2 student per entry of `config.variants` (`config.student` with the entry's overrides),
all against the same tokenizer, each evaluated on the same split with argmax decoding; the
reference variant is also decoded with `config.reference_decodings`. The table lands in
`<workdir>/report.md`. Running the command again skips every finished step. Any field can be
overridden, e.g. `--config.student.num_epochs=4` (every variant) or
`--config.variants.frozen_encoder.model.stop_context_grad=False` (one variant).
"""

import ml_collections

from configs import aqvae, common, student
from configs import eval as eval_config


def variants() -> ml_collections.ConfigDict:
  """Name → overrides of `config.student`, in the table's order (the reference first)."""
  v = ml_collections.ConfigDict(sort_keys=False)
  v.base = ml_collections.ConfigDict()
  # "w/o Cross-Attention": conditioned on the mask family through adaLN only, like VAR.
  v.no_cross_attention = ml_collections.ConfigDict({"model": {"cross_attention": False}})
  # "w/o Token Hierarchy": flat 16² tokens at every scale, from the same stage-1 tokenizer.
  v.no_token_hierarchy = ml_collections.ConfigDict({"model": {"flat_tokens": True}})
  # "w/o Trainable Encoder": the stage-1 encoder copy stays as stage 1 left it; stopping the
  # gradient at its features only saves the backward pass that the freeze would discard.
  v.frozen_encoder = ml_collections.ConfigDict(
    {"trainable_context_encoder": False, "model": {"stop_context_grad": True}}
  )
  return v


def get_config(arg: str = "demo") -> ml_collections.ConfigDict:
  preset = common.check_preset(arg)
  config = ml_collections.ConfigDict()
  config.stage = "ablations"
  config.preset = preset
  # Stage-1 workdir every variant reads its tokenizer from; empty trains one in <workdir>/aqvae.
  config.tokenizer_from = ""
  # TFDS data dir shared by every step; empty: the one the tokenizer_from run read when it still
  # exists, else $TFDS_DATA_DIR, else <workdir>/tensorflow_datasets.
  config.data_dir = ""
  # The stage-1 run, used only when tokenizer_from is empty.
  config.aqvae = aqvae.get_config(preset)
  # What every variant trains: the stage-2 student of the preset.
  config.student = student.get_config(preset)
  config.variants = variants()
  # The variant the decoding comparison runs on, and its decodings besides argmax.
  config.reference = "base"
  config.reference_decodings = ("multinomial", "top_k_top_p")

  ev = eval_config.get_config(preset)
  # The paper reports Table 4 on the validation set, in this column order.
  ev.split = "validation"
  ev.families = ("gaussian_2d", "cartesian_x", "cartesian_y", "radial")
  # The paper's protocol: plain decodings, no data consistency.
  ev.data_consistency.enabled = False
  # Top-p 0.96 with top-k 900 of 4096 codes; the small presets keep the same share of their
  # smaller vocabularies (512, 64), which a top-k of 900 would not cut at all.
  ev.sampling.top_p = 0.96
  ev.sampling.top_k = {"paper": 900, "demo": 112, "smoke": 14}[preset]
  if preset == "smoke":
    ev.figures.num_slices = 0
  # Models and decodings are filled in per variant by the stage.
  ev.decoding = ("argmax",)
  config.evaluate = ev
  return config
