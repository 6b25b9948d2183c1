"""Stage-3 train-step benchmark: step time, its split into rollout / teacher / student, memory, MFU.

  python bench/distill.py --preset=demo --batch=8                   # CPU
  python bench/distill.py --preset=paper --batch=24 --peak_tflops=989   # H100 bf16

The step is the real one (`stage3_distill.train_step`): a multinomial rollout of the student
through the KV-cached sampler, a frozen teacher pass on it and a student forward + backward.
Weights are random and inputs are noise of the right shapes, so no dataset or checkpoint is
needed. The parts are timed as separately jitted functions on the same inputs.
"""

from __future__ import annotations

import argparse
import functools
import sys


def main() -> int:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--preset", default="demo", choices=["paper", "demo", "smoke"])
  p.add_argument("--batch", type=int, default=8, help="global batch (paper: 24)")
  p.add_argument("--steps", type=int, default=3, help="timed steps after the compile step")
  p.add_argument("--depth", type=int, default=0, help="override both models' depth (0: preset)")
  p.add_argument("--peak_tflops", type=float, default=0.0, help="device peak for MFU (0: skip)")
  args = p.parse_args()

  import jax
  import steplib

  sys.path.insert(0, ".")
  from configs import distill as distill_config
  from nextaccel_jax import inference, sharding, testing
  from nextaccel_jax.models import layers, next_scale
  from nextaccel_jax.stages import stage3_distill as distill

  config = distill_config.get_config(args.preset)
  if args.depth:
    config.model.depth = config.teacher.depth = args.depth
  config.data.batch_size = args.batch
  n = config.data.image_size
  mesh = sharding.mesh_from_config(config)
  step = testing.stage_step("distill", config, mesh, total_steps=100_000)
  state, train_fn, (tok_vars, p_teacher) = step.state, step.train, step.frozen
  tokenizer, student, teacher = (step.models[k] for k in ("tokenizer", "model", "teacher"))
  batch = steplib.noise_batch(args.batch, n, mesh)
  print(
    f"device: {jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()}); "
    f"preset {args.preset}, depth {student.depth}, width {student.width}, {n}², "
    f"batch {args.batch}, dtype {config.model.dtype}"
  )
  print(
    f"parameters: student {layers.count_params(state.params):,}, "
    f"teacher {layers.count_params(p_teacher):,} (frozen)"
  )
  compiled, flops = steplib.compile_step(train_fn, state, batch, tok_vars, p_teacher)
  state, m, dt = steplib.time_steps(compiled, state, batch, tok_vars, p_teacher, steps=args.steps)
  print(f"step time: {dt:.3f} s, {args.batch / dt:.2f} images/s")
  steplib.print_utilisation(flops, dt, args.peak_tflops)

  # The parts on their own: what the on-policy rollout and the frozen teacher add to a stage-2 step.
  sampling = distill.rollout_sampling(config)
  rollout = jax.jit(
    functools.partial(distill.on_policy_batch, student, teacher, tokenizer, sampling=sampling)
  )
  key = jax.random.key(0)
  t_rollout = steplib.time_call(
    lambda: rollout(tok_vars, state.params, p_teacher, batch, rng=key), repeats=args.steps
  )
  idx0 = jax.jit(next_scale.r32_tokens, static_argnums=0)(
    tokenizer, tok_vars, batch["levels"][:, 0], batch["family"]
  )
  sample_only = jax.jit(
    lambda p: inference.rollout(
      student,
      p,
      tokenizer,
      tok_vars,
      idx0,
      batch["levels"][:, 0],
      batch["family"],
      sampling=sampling,
      rng=key,
    )[0]
  )
  t_sample = steplib.time_call(lambda: sample_only(state.params), repeats=args.steps)
  print(
    f"rollout + teacher pass: {t_rollout:.3f} s ({t_rollout / dt:.0%} of the step), "
    f"of which the cached sampler {t_sample:.3f} s"
  )
  print(f"loss after {args.steps + 1} steps: {float(m['loss']):.4f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
