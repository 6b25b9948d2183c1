"""Inference benchmark: R = 32 image → reconstruction with the cached five-step sampler.

  python bench/inference.py --preset=paper --batches=1,8 --depth=4     # reduced, on CPU
  python bench/inference.py --preset=paper --batches=1,8,32,128          # H100 (targets: ≤ 20 ms
                                                                          # at batch 1, ≥ 500 img/s
                                                                          # at batch 128)

For each batch size it reports the whole jitted `Reconstructor` call (latency per batch, per
image, images/s), its compile time and compiled memory, and the same work split into three
separately jitted parts: encode + tokenize Q32, the five autoregressive steps (context features,
KV cache, argmax) and decode. Weights are random; timing does not depend on their values.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Any


def main() -> int:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--preset", default="paper", choices=["paper", "demo", "smoke"])
  p.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--depth", type=int, default=0, help="override the depth (0: preset)")
  p.add_argument("--dtype", default="", help="override the transformer's compute dtype")
  args = p.parse_args()

  import jax

  from nextaccel_jax.models import layers

  setup = build(args.preset, depth=args.depth, dtype=args.dtype)
  model = setup.model
  print(
    f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}); preset {args.preset}, "
    f"depth {model.depth}, width {model.width}, {setup.image_size}², "
    f"dtype {setup.config.model.dtype}; transformer {layers.count_params(setup.params):,} params"
  )
  print(
    "| batch | compile s | memory GiB | ms / batch | ms / image | images/s | encode ms | "
    "AR steps ms | decode ms |"
  )
  print("|---|---|---|---|---|---|---|---|---|")
  for b in [int(x) for x in args.batches.split(",")]:
    r = measure_batch(setup, b, repeats=args.repeats)
    whole = r["whole_s"]
    print(
      f"| {b} | {r['compile_s']:.1f} | {r['memory_gib']:.2f} | {1e3 * whole:.1f} | "
      f"{1e3 * whole / b:.2f} | {b / whole:.1f} | {1e3 * r['encode_s']:.1f} | "
      f"{1e3 * r['steps_s']:.1f} | {1e3 * r['decode_s']:.1f} |"
    )
  return 0


@dataclasses.dataclass
class Setup:
  """A student with random weights and its tokenizer, as `measure_batch` times them."""

  config: Any
  image_size: int
  tokenizer: Any
  tok_vars: Any
  model: Any
  params: Any
  rec: Any
  encode: Any
  steps: Any
  decode: Any


def build(preset: str, depth: int = 0, dtype: str = "", adjust=None) -> Setup:
  """The `preset` student (no remat; depth and compute dtype overridable) with random weights,
  its `Reconstructor` and the three parts of its call, each jitted on its own.

  `adjust`, when given, edits the stage-2 config in place before the models are made.
  """
  import jax
  import jax.numpy as jnp

  sys.path.insert(0, ".")
  from configs import transformer as transformer_config
  from nextaccel_jax import inference, testing
  from nextaccel_jax.models import aqvae, next_scale
  from nextaccel_jax.models import transformer as transformer_lib
  from nextaccel_jax.stages import stage2_transformer as stage

  config = transformer_config.get_config("student", preset)
  if depth:
    config.model.depth = depth
  if dtype:
    config.model.dtype = dtype
  config.model.remat = "none"
  if adjust is not None:
    adjust(config)
  n = config.data.image_size
  tokenizer = stage.make_tokenizer(config)
  # Shapes only, filled from numpy: the initializers would compile a program of their own.
  tok_vars = testing.random_tokenizer_variables(tokenizer, n, seed=1)
  model = stage.make_model(config)
  params = transformer_lib.init_params(model, testing.rbg_key(0), n)["params"]
  rec = inference.Reconstructor(tokenizer, tok_vars, model, params)

  def encode(tv, x, fam):
    return next_scale.r32_tokens(tokenizer, tv, x, fam)

  def steps(tv, pv, idx0, x, fam):
    _, h_list, _ = inference.rollout(model, pv, tokenizer, tv, idx0, x, fam)
    return h_list

  def decode(tv, h_list):
    b = h_list[0].shape[0]
    active = jnp.ones((b, len(h_list)), jnp.float32)
    f_hat = tokenizer.apply(tv, h_list, active, method=aqvae.AQVAE.combine)
    return tokenizer.apply(tv, f_hat, method=aqvae.AQVAE.decode)

  return Setup(
    config,
    n,
    tokenizer,
    tok_vars,
    model,
    params,
    rec,
    jax.jit(encode),
    jax.jit(steps),
    jax.jit(decode),
  )


def measure_batch(setup: Setup, b: int, repeats: int, on_whole=None) -> dict:
  """Times the whole jitted reconstruction of `b` noise images and its three parts.

  `on_whole`, when given, is called with the whole call's numbers before the parts compile, so a
  caller that may be cut off keeps them.

  Returns:
    Seconds per call (`whole_s`, `encode_s`, `steps_s`, `decode_s`), the whole call's
    `compile_s`, `memory_gib` (temporaries + arguments), `memory` (`common.step_memory`) and
    `flops` (XLA cost analysis), and `parts_compile_s` (the three parts together).
  """
  import jax.numpy as jnp
  import numpy as np
  import steplib

  from nextaccel_jax.stages import common

  n = setup.image_size
  rec = setup.rec
  rng = np.random.default_rng(b)
  x = jnp.asarray(rng.standard_normal((b, n, n, 2)).astype(np.float32) * 0.3)
  fam = jnp.asarray(rng.integers(0, 4, b).astype(np.int32))
  t = time.perf_counter()
  lowered = rec._fn.lower(
    setup.tok_vars, rec.transformer_variables, x, fam, None, sampling=rec.sampling
  )
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t
  mem = compiled.memory_analysis()
  mem_gib = float("nan")
  if mem is not None:
    mem_gib = (mem.temp_size_in_bytes + mem.argument_size_in_bytes) / 2**30
  # The compiled call itself: `rec.reconstruct` would compile the same program a second time.
  tv, pv = setup.tok_vars, rec.transformer_variables
  whole = steplib.time_call(compiled, tv, pv, x, fam, None, repeats=repeats)
  out = {
    "compile_s": compile_s,
    "memory_gib": mem_gib,
    "memory": common.step_memory(compiled),
    "flops": steplib.cost_flops(compiled),
    "whole_s": whole,
  }
  if on_whole is not None:
    on_whole(dict(out))
  enc, t_enc = _compile(setup.encode, tv, x, fam)
  idx0 = enc(tv, x, fam)
  steps, t_steps = _compile(setup.steps, tv, pv, idx0, x, fam)
  h_list = steps(tv, pv, idx0, x, fam)
  dec, t_dec = _compile(setup.decode, tv, h_list)
  return {
    **out,
    "parts_compile_s": t_enc + t_steps + t_dec,
    "encode_s": steplib.time_call(enc, tv, x, fam, repeats=repeats),
    "steps_s": steplib.time_call(steps, tv, pv, idx0, x, fam, repeats=repeats),
    "decode_s": steplib.time_call(dec, tv, h_list, repeats=repeats),
  }


def _compile(fn, *args):
  t = time.perf_counter()
  compiled = fn.lower(*args).compile()
  return compiled, time.perf_counter() - t


if __name__ == "__main__":
  sys.exit(main())
