"""Stage-1 (AQ-VAE) train-step benchmark: parameters, compiled memory, step time, images/s, MFU.

  python bench/aqvae.py --preset=paper --batch=2 --steps=3            # reduced batch on CPU
  python bench/aqvae.py --preset=paper --batch=16 --dtype=bfloat16 --peak_tflops=989   # H100 bf16

FLOPs per step come from XLA's cost analysis of the compiled step; MFU = FLOPs / step time / peak.
Random inputs of the right shapes are used, so no dataset is needed.
"""

from __future__ import annotations

import argparse
import sys
import time


def main() -> int:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--preset", default="paper", choices=["paper", "demo", "smoke"])
  p.add_argument("--batch", type=int, default=2, help="global batch (paper: 16)")
  p.add_argument("--steps", type=int, default=3, help="timed steps after the compile step")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--remat", type=int, default=-1, help="1/0 to force remat on/off (-1: preset)")
  p.add_argument("--peak_tflops", type=float, default=0.0, help="device peak for MFU (0: skip)")
  args = p.parse_args()

  import jax
  import numpy as np

  sys.path.insert(0, ".")
  from configs import aqvae as aqvae_config
  from nextaccel_jax import sharding
  from nextaccel_jax.stages import aqvae, common

  config = aqvae_config.get_config(args.preset)
  config.model.dtype = args.dtype
  if args.remat >= 0:
    config.model.remat = bool(args.remat)
  config.data.batch_size = args.batch
  mesh = sharding.make_mesh()
  model = aqvae.make_model(config)
  tx, _ = aqvae.make_optimizer(config, total_steps=1000)
  state, state_sharding = aqvae.create_train_state(config, model, tx, mesh, jax.random.key(0))
  train_fn, _ = aqvae.jit_steps(config, model, tx, mesh, state_sharding)
  n = config.data.image_size
  rng = np.random.default_rng(0)
  batch = {
    "levels": rng.standard_normal((args.batch, 6, n, n, 2)).astype(np.float32) * 0.3,
    "family": rng.integers(0, 4, args.batch).astype(np.int32),
  }
  batch = sharding.global_batch(batch, mesh)
  print(
    f"device: {jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()}); "
    f"preset {args.preset}, {n}², batch {args.batch}, dtype {args.dtype}, "
    f"remat {config.model.remat}"
  )
  print(
    f"parameters: {common.count_params(state.params):,} "
    f"(codebook {config.model.vocab_size} x {config.model.z_channels} in vq_ema)"
  )

  t = time.perf_counter()
  compiled = train_fn.lower(state, batch).compile()
  print(f"compile: {time.perf_counter() - t:.1f} s")
  mem = compiled.memory_analysis()
  if mem is not None:
    total = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
    total -= getattr(mem, "alias_size_in_bytes", 0)
    print(
      f"compiled memory: temp {mem.temp_size_in_bytes / 2**30:.2f} GiB, arguments "
      f"{mem.argument_size_in_bytes / 2**30:.2f} GiB, total ~{total / 2**30:.2f} GiB"
    )
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list | tuple) else cost
  flops = float(cost.get("flops", 0.0)) if cost else 0.0
  print(f"XLA cost analysis: {flops / 1e12:.3f} TFLOP per step")

  state, m = compiled(state, batch)
  jax.block_until_ready(m)
  t = time.perf_counter()
  for _ in range(args.steps):
    state, m = compiled(state, batch)
  jax.block_until_ready(m)
  dt = (time.perf_counter() - t) / args.steps
  print(
    f"step time: {dt:.3f} s, {args.batch / dt:.2f} images/s "
    f"(each image = six encoder passes + one decoder pass)"
  )
  print(f"achieved: {flops / dt / 1e12:.3f} TFLOP/s", end="")
  if args.peak_tflops:
    print(
      f", MFU {100 * flops / dt / (args.peak_tflops * 1e12):.1f}% of {args.peak_tflops} TFLOP/s"
    )
  else:
    print(" (pass --peak_tflops for MFU)")
  print(f"loss after {args.steps + 1} steps: {float(m['loss']):.4f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
