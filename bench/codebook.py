"""Codebook usage of a stage-1 run from scratch, with and without the data-dependent start.

  python bench/codebook.py --preset=smoke --steps=300
  python bench/codebook.py --preset=demo --steps=200 --restart_threshold=0.2

Trains the stage-1 step (`stages/stage1_aqvae.build_step`) on the synthetic dataset for each
codebook start of `--inits` ("kmeans++": `init_codebook`; "uniform": VAR's ±1/V codes), with
dead-code restarts off unless `--restart_threshold` is set, then tokenises the validation split
at all six scales and prints, per start: the fraction of the V codes any validation token uses,
the perplexity of the code histogram, and the all-levels reconstruction SSIM. `--losses=base`
(default) trains with SSIM + L1 + commitment only, which is what decides how the codebook is used
and keeps the run short on a CPU; `--losses=full` adds LPIPS and the adversarial term.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time


def main() -> int:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--preset", default="smoke", choices=["demo", "smoke"])
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--inits", default="kmeans++,uniform")
  p.add_argument("--restart_threshold", type=float, default=0.0)
  p.add_argument("--losses", default="base", choices=["base", "full"])
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--vocab_size", type=int, default=0, help="codebook size (0: the preset's)")
  p.add_argument("--batch", type=int, default=0, help="global batch (0: the preset's)")
  p.add_argument("--data_dir", default="", help="TFDS dir holding the preset's dataset")
  args = p.parse_args()

  import jax

  sys.path.insert(0, ".")
  from configs import aqvae as aqvae_config
  from nextaccel_jax import sharding
  from nextaccel_jax.data import build
  from nextaccel_jax.stages import common, stage1_aqvae
  from nextaccel_jax.stages import data as data_stage

  data_dir = args.data_dir or tempfile.mkdtemp(prefix="codebook_bench_")
  if not args.data_dir:
    build.build(args.preset, data_dir=data_dir)
  print(
    f"{args.preset} preset, {args.steps} steps, restart_threshold {args.restart_threshold}, "
    f"losses {args.losses}, seed {args.seed}, vocab {args.vocab_size or 'preset'}, "
    f"batch {args.batch or 'preset'}, {jax.default_backend()}"
  )
  for init in args.inits.split(","):
    config = aqvae_config.get_config(args.preset)
    config.data.data_dir = data_dir
    config.seed = args.seed
    config.model.restart_threshold = args.restart_threshold
    config.codebook_init.method = init
    if args.vocab_size:
      config.model.vocab_size = args.vocab_size
    if args.batch:
      config.data.batch_size = args.batch
    if args.losses == "base":
      config.loss.lpips = 0.0
      config.loss.adversarial = 0.0
    mesh = sharding.mesh_from_config(config)
    train_src, val_src = data_stage.training_splits(config, data_dir)
    frozen = stage1_aqvae.load_frozen(config, stage1_aqvae.make_discriminator(config), mesh)
    step = stage1_aqvae.build_step(config, mesh, frozen, args.steps)
    state = step.state
    if init == "kmeans++":
      state = stage1_aqvae.init_codebook(config, state, step, train_src, mesh)
    loader, val_loader = common.loaders(config, train_src, val_src, mesh, 0)
    start = time.perf_counter()
    try:
      for batch in itertools.islice(loader, args.steps):
        state, _ = step.train(state, batch, *step.frozen)
    finally:
      loader.close()
    jax.block_until_ready(state)
    seconds = time.perf_counter() - start

    m = stage1_aqvae.evaluate(step.evals["eval"], state, val_loader)
    print(
      f"{init:>9}: {m['codebook/used']:.0%} of {config.model.vocab_size} codes used on "
      f"validation, perplexity {m['codebook/perplexity']:.1f}, recon_all SSIM "
      f"{m['recon_all/ssim']:.3f}, {seconds / args.steps * 1e3:.0f} ms/step"
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())
