"""Data-parallel / FSDP scaling of every stage's train step: step time, images/s, efficiency, MFU.

  python bench/scaling.py                                    # smoke models, 1/2/4/8 CPU devices
  python bench/scaling.py --preset=demo --per_device_batch=2 --devices=1,2,4,8
  python bench/scaling.py --preset=paper --devices=1 --per_device_batch=8 --peak_tflops=989 \
      --stages=transformer                                   # one GPU, paper size
  python bench/scaling.py --fsdp --fsdp_min_size=0           # shard every divisible parameter

Weak scaling: the global batch is `per_device_batch × devices`, so a perfectly parallel step keeps
its time and multiplies images/s by the device count; efficiency = (images/s per device) / (that of
one device). Each row is the stage's real jitted train step (`testing.stage_step`: random frozen
weights, noise inputs), compiled ahead of time like a training run, then timed after a warm-up.
On a CPU host the devices are simulated (`--xla_force_host_platform_device_count`) and share the
machine's cores, so the CPU numbers measure the sharded program's overheads, not a speed-up.
"""

from __future__ import annotations

import argparse
import os
import sys


def main() -> int:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--preset", default="smoke", choices=["paper", "demo", "smoke"])
  p.add_argument("--stages", default="aqvae,transformer,distill")
  p.add_argument("--devices", default="1,2,4,8", help="device counts to time")
  p.add_argument("--per_device_batch", type=int, default=1)
  p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
  p.add_argument("--fsdp", action="store_true", help="all devices on the fsdp axis")
  p.add_argument(
    "--fsdp_min_size", type=int, default=-1, help="config.sharding.fsdp_min_size (-1: preset)"
  )
  p.add_argument("--dtype", default="", help="override the compute dtype")
  p.add_argument("--peak_tflops", type=float, default=0.0, help="per-device peak for MFU")
  args = p.parse_args()
  counts = [int(c) for c in args.devices.split(",")]

  # Simulated host devices for CPU runs; the flag does not touch GPUs or TPUs.
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={max(counts)}"

  import jax
  import steplib

  sys.path.insert(0, ".")
  from configs import aqvae as aqvae_config
  from configs import distill as distill_config
  from configs import transformer as transformer_config
  from nextaccel_jax import sharding, testing
  from nextaccel_jax.stages import common

  get = {
    "aqvae": lambda: aqvae_config.get_config(args.preset),
    "transformer": lambda: transformer_config.get_config("student", args.preset),
    "distill": lambda: distill_config.get_config(args.preset),
  }
  dev = jax.devices()[0]
  print(
    f"device: {dev.device_kind} ({jax.default_backend()}), {jax.device_count()} available, "
    f"{os.cpu_count()} host cores; preset {args.preset}, {args.per_device_batch} image(s) per "
    f"device, {'fsdp' if args.fsdp else 'data'} axis"
  )
  rows = []
  for stage in args.stages.split(","):
    base = None
    for n in counts:
      if n > jax.device_count():
        print(f"skipping {n} devices: only {jax.device_count()} available")
        continue
      config = get[stage]()
      if args.dtype:
        config.model.dtype = args.dtype
      if args.fsdp_min_size >= 0:
        config.sharding.fsdp_min_size = args.fsdp_min_size
      batch_size = args.per_device_batch * n
      config.data.batch_size = batch_size
      axes = (("data", 1), ("fsdp", n)) if args.fsdp else (("data", n), ("fsdp", 1))
      mesh = sharding.make_mesh(axes, devices=jax.devices()[:n])
      print(f"\n== {stage}, {n} device(s), global batch {batch_size}")
      step = testing.stage_step(stage, config, mesh)
      batch = steplib.noise_batch(batch_size, config.data.image_size, mesh)
      compiled, flops = steplib.compile_step(step.train, step.state, batch, *step.frozen)
      _, _, dt = steplib.time_steps(compiled, step.state, batch, *step.frozen, steps=args.steps)
      mem = common.step_memory(compiled)
      ips = batch_size / dt
      base = base or ips
      eff = ips / n / base
      mfu = flops / dt / (args.peak_tflops * 1e12 * n) if args.peak_tflops else None
      rows.append((stage, n, batch_size, dt, ips, eff, mem.total / 2**30 if mem else None, mfu))
      print(f"step {dt:.3f} s, {ips:.2f} images/s, parallel efficiency {eff:.0%}")
      print(f"state layouts: {sharding.describe(step.state_sharding)}")

  print("\n| stage | devices | batch | step (s) | images/s | efficiency | GiB/device | MFU |")
  print("|---|---|---|---|---|---|---|---|")
  for stage, n, b, dt, ips, eff, gib, mfu in rows:
    gib_s = f"{gib:.2f}" if gib is not None else "–"
    mfu_s = f"{mfu:.1%}" if mfu is not None else "–"
    print(f"| {stage} | {n} | {b} | {dt:.3f} | {ips:.2f} | {eff:.0%} | {gib_s} | {mfu_s} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
