"""What the train-step benchmarks share: compile with memory and FLOPs, timed steps, MFU."""

from __future__ import annotations

import time


def compile_measured(fn, *args):
  """Lowers and compiles `fn(*args)` without printing.

  Returns:
    `(compiled, seconds, memory, flops)`: the compile time, `common.step_memory` (None where XLA
    does not report it) and the FLOPs of one call from XLA's cost analysis (0 when absent).
  """
  from nextaccel_jax.stages import common

  t = time.perf_counter()
  compiled = fn.lower(*args).compile()
  seconds = time.perf_counter() - t
  return compiled, seconds, common.step_memory(compiled), cost_flops(compiled)


def cost_flops(compiled) -> float:
  """FLOPs of one call of a compiled function by XLA's cost analysis (0 where it gives none)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list | tuple) else cost
  return float(cost.get("flops", 0.0)) if cost else 0.0


def compile_step(train_fn, *args):
  """Lowers and compiles `train_fn(*args)`; prints compile time, memory and FLOPs per step.

  Returns:
    `(compiled, flops)`.
  """
  compiled, seconds, mem, flops = compile_measured(train_fn, *args)
  print(f"compile: {seconds:.1f} s")
  if mem is not None:
    print(f"compiled memory per device: {mem}")
  print(f"XLA cost analysis: {flops / 1e12:.3f} TFLOP per step")
  return compiled, flops


def time_steps(compiled, state, *rest, steps: int):
  """One warm-up call, then `steps` timed ones; returns `(state, metrics, seconds per step)`."""
  import jax

  state, m = compiled(state, *rest)
  jax.block_until_ready(m)
  t = time.perf_counter()
  for _ in range(steps):
    state, m = compiled(state, *rest)
  jax.block_until_ready(m)
  return state, m, (time.perf_counter() - t) / steps


def print_utilisation(flops: float, seconds: float, peak_tflops: float) -> None:
  print(f"achieved: {flops / seconds / 1e12:.3f} TFLOP/s", end="")
  if peak_tflops:
    mfu = 100 * flops / seconds / (peak_tflops * 1e12)
    print(f", MFU {mfu:.1f}% of {peak_tflops} TFLOP/s")
  else:
    print(" (pass --peak_tflops for MFU)")


def time_call(fn, *args, repeats: int) -> float:
  """Seconds per call of `fn(*args)` after one warm-up call (which compiles)."""
  import jax

  jax.block_until_ready(fn(*args))
  t = time.perf_counter()
  for _ in range(repeats):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t) / repeats


def noise_batch(batch: int, size: int, mesh):
  """A global batch `{levels [B, 6, size, size, 2], family [B]}` of seeded noise: step cost does
  not depend on the values, so no dataset is needed."""
  import numpy as np

  from nextaccel_jax import sharding

  rng = np.random.default_rng(0)
  host = {
    "levels": rng.standard_normal((batch, 6, size, size, 2)).astype(np.float32) * 0.3,
    "family": rng.integers(0, 4, batch).astype(np.int32),
  }
  return sharding.global_batch(host, mesh)
