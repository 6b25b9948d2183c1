"""Stage-1 (AQ-VAE) train-step benchmark: parameters, compiled memory, step time, images/s, MFU.

  python bench/aqvae.py --preset=paper --batch=2 --steps=3            # reduced batch on CPU
  python bench/aqvae.py --preset=paper --batch=16 --dtype=bfloat16 --peak_tflops=989   # H100 bf16
  python bench/aqvae.py --preset=paper --batch=1 --losses=base        # SSIM + commitment only

`--losses=full` (default) times the whole stage-1 step: generator with SSIM, LPIPS-alex and the
adversarial term, plus the discriminator update (frozen BiomedCLIP tower + heads). It also times
the tower (G and D passes) and LPIPS on their own, to give their share of the step.
FLOPs per step come from XLA's cost analysis of the compiled step; MFU = FLOPs / step time / peak.
Random inputs of the right shapes are used, so no dataset is needed.
"""

from __future__ import annotations

import argparse
import sys


def main() -> int:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--preset", default="paper", choices=["paper", "demo", "smoke"])
  p.add_argument("--batch", type=int, default=2, help="global batch (paper: 16)")
  p.add_argument("--steps", type=int, default=3, help="timed steps after the compile step")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--remat", default="", help="remat policy: none, full, dots, dots_no_batch")
  p.add_argument("--peak_tflops", type=float, default=0.0, help="device peak for MFU (0: skip)")
  p.add_argument("--losses", default="full", choices=["full", "base"])
  args = p.parse_args()

  import jax
  import steplib

  sys.path.insert(0, ".")
  from configs import aqvae as aqvae_config
  from nextaccel_jax import sharding, testing
  from nextaccel_jax.models import layers

  config = aqvae_config.get_config(args.preset)
  config.model.dtype = args.dtype
  if args.remat:
    config.model.remat = args.remat
  config.data.batch_size = args.batch
  if args.losses == "base":
    config.loss.lpips = 0.0
    config.loss.adversarial = 0.0
  mesh = sharding.mesh_from_config(config)
  step = testing.stage_step("aqvae", config, mesh)
  state, train_fn, (frozen,) = step.state, step.train, step.frozen
  disc = step.models["discriminator"]
  n = config.data.image_size
  batch = steplib.noise_batch(args.batch, n, mesh)
  print(
    f"device: {jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()}); "
    f"preset {args.preset}, {n}², batch {args.batch}, dtype {args.dtype}, "
    f"remat {config.model.remat}"
  )
  print(
    f"parameters: {layers.count_params(state.params):,} "
    f"(codebook {config.model.vocab_size} x {config.model.z_channels} in vq_ema); "
    f"discriminator heads {layers.count_params(state.disc_params):,}, "
    f"frozen tower {layers.count_params(frozen['tower']):,}"
  )

  compiled, flops = steplib.compile_step(train_fn, state, batch, frozen)
  state, m, dt = steplib.time_steps(compiled, state, batch, frozen, steps=args.steps)
  print(
    f"step time: {dt:.3f} s, {args.batch / dt:.2f} images/s "
    f"(each image = six encoder passes + one decoder pass)"
  )
  steplib.print_utilisation(flops, dt, args.peak_tflops)
  print(f"loss after {args.steps + 1} steps: {float(m['loss']):.4f}")
  if args.losses == "full":
    _loss_shares(config, disc, state, frozen, batch, dt, args.steps)
  return 0


def _loss_shares(config, disc, state, frozen, batch, step_s: float, steps: int) -> None:
  """Times the perceptual and adversarial parts alone, as in the step (fwd + bwd)."""
  import jax
  import jax.numpy as jnp
  import steplib

  from nextaccel_jax import losses
  from nextaccel_jax.models import lpips
  from nextaccel_jax.stages import stage1_aqvae as aqvae

  mag = losses.magnitude(batch["levels"][:, -1])
  scale = jnp.max(mag, axis=(1, 2))

  @jax.jit
  def lpips_fwd_bwd(fake):
    return jax.grad(lambda f: lpips.lpips_distance(f, mag, frozen["lpips"]).mean())(fake)

  @jax.jit
  def disc_passes(fake, variables):
    # G: gradient through the tower to the image; D: real and fake with the head update.
    def g(f):
      logits, _ = disc.apply(variables, f, scale, train=False)
      return losses.lsgan_g_loss(logits)

    def d(params):
      v = dict(variables, params=params)
      (r, _), _ = disc.apply(v, mag, scale, train=True, mutable=["spectral"])
      (f, _), _ = disc.apply(v, fake, scale, train=True, mutable=["spectral"])
      return losses.lsgan_d_loss(r, f)

    return jax.grad(g)(fake), jax.grad(d)(variables["params"])

  fake = mag * 0.9
  t_lpips = steplib.time_call(lpips_fwd_bwd, fake, repeats=steps)
  variables = aqvae._disc_variables(state, frozen)
  t_disc = steplib.time_call(disc_passes, fake, variables, repeats=steps)
  print(
    f"alone: discriminator (tower G pass + D real/fake) {t_disc:.3f} s "
    f"({100 * t_disc / step_s:.0f}% of the step), LPIPS-alex fwd+bwd {t_lpips:.3f} s "
    f"({100 * t_lpips / step_s:.0f}%)"
  )


if __name__ == "__main__":
  sys.exit(main())
