"""Stage-2 train-step benchmark: parameters, compiled memory, step time, tokens/s, MFU.

  python bench/transformer.py --preset=paper --batch=1 --depth=4        # reduced, on CPU
  python bench/transformer.py --preset=paper --batch=32 --peak_tflops=989   # H100 bf16

The step is the real one (`stage2_transformer.train_step`): the frozen tokenizer turns the six
levels into targets and inputs, then the transformer with its context encoder runs forward and
backward over the 990 positions. Weights are random and inputs are noise of the right shapes, so
no dataset or checkpoint is needed. FLOPs come from XLA's cost analysis of the compiled step.
"""

from __future__ import annotations

import argparse
import sys


def main() -> int:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--preset", default="paper", choices=["paper", "demo", "smoke"])
  p.add_argument("--role", default="student", choices=["student", "teacher"])
  p.add_argument("--batch", type=int, default=2, help="global batch")
  p.add_argument("--steps", type=int, default=3, help="timed steps after the compile step")
  p.add_argument("--depth", type=int, default=0, help="override the depth (0: preset)")
  p.add_argument("--dtype", default="", help="override the compute dtype")
  p.add_argument("--peak_tflops", type=float, default=0.0, help="device peak for MFU (0: skip)")
  args = p.parse_args()

  import jax
  import steplib

  sys.path.insert(0, ".")
  from configs import transformer as transformer_config
  from nextaccel_jax import sharding, testing
  from nextaccel_jax.models import layers
  from nextaccel_jax.models import transformer as transformer_lib

  config = transformer_config.get_config(args.role, args.preset)
  if args.depth:
    config.model.depth = args.depth
  if args.dtype:
    config.model.dtype = args.dtype
  config.data.batch_size = args.batch
  n = config.data.image_size
  mesh = sharding.mesh_from_config(config)
  step = testing.stage_step("transformer", config, mesh, total_steps=100_000)
  state, train_fn, (tok_vars,) = step.state, step.train, step.frozen
  model = step.models["model"]
  batch = steplib.noise_batch(args.batch, n, mesh)
  seq = transformer_lib.sequence_length(model.patch_nums)
  print(
    f"device: {jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()}); "
    f"preset {args.preset} ({args.role}), depth {model.depth}, width {model.width}, "
    f"{n}², batch {args.batch}, dtype {config.model.dtype}, remat {model.remat}"
  )
  encoder = layers.count_params(state.params["context_encoder"])
  print(
    f"parameters: {layers.count_params(state.params):,} "
    f"(context encoder {encoder:,}); tokenizer {layers.count_params(tok_vars['params']):,}"
  )
  compiled, flops = steplib.compile_step(train_fn, state, batch, tok_vars)
  state, m, dt = steplib.time_steps(compiled, state, batch, tok_vars, steps=args.steps)
  print(
    f"step time: {dt:.3f} s, {args.batch / dt:.2f} images/s, "
    f"{args.batch * seq / dt:,.0f} tokens/s ({seq} positions per image)"
  )
  steplib.print_utilisation(flops, dt, args.peak_tflops)
  print(f"loss after {args.steps + 1} steps: {float(m['loss']):.4f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
