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
import sys
import time


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
  import jax.numpy as jnp
  import numpy as np
  import steplib

  sys.path.insert(0, ".")
  from configs import transformer as transformer_config
  from nextaccel_jax import inference
  from nextaccel_jax.models import aqvae, layers, next_scale
  from nextaccel_jax.models import transformer as transformer_lib
  from nextaccel_jax.stages import stage2_transformer as stage

  config = transformer_config.get_config("student", args.preset)
  if args.depth:
    config.model.depth = args.depth
  if args.dtype:
    config.model.dtype = args.dtype
  config.model.remat = "none"
  n = config.data.image_size
  tokenizer = stage.make_tokenizer(config)
  tok_vars = aqvae.init_variables(tokenizer, jax.random.key(1), n)
  model = stage.make_model(config)
  params = transformer_lib.init_params(model, jax.random.key(0), n)["params"]
  rec = inference.Reconstructor(tokenizer, tok_vars, model, params)
  print(
    f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}); preset {args.preset}, "
    f"depth {model.depth}, width {model.width}, {n}², dtype {config.model.dtype}; "
    f"transformer {layers.count_params(params):,} params"
  )

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

  encode_j, steps_j, decode_j = jax.jit(encode), jax.jit(steps), jax.jit(decode)
  pv = {"params": params}
  print(
    "| batch | compile s | memory GiB | ms / batch | ms / image | images/s | encode ms | "
    "AR steps ms | decode ms |"
  )
  print("|---|---|---|---|---|---|---|---|---|")
  for b in [int(x) for x in args.batches.split(",")]:
    rng = np.random.default_rng(b)
    x = jnp.asarray(rng.standard_normal((b, n, n, 2)).astype(np.float32) * 0.3)
    fam = jnp.asarray(rng.integers(0, 4, b).astype(np.int32))
    t = time.perf_counter()
    lowered = rec._fn.lower(tok_vars, pv, x, fam, None, sampling=rec.sampling)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t
    mem = compiled.memory_analysis()
    mem_gib = float("nan")
    if mem is not None:
      mem_gib = (mem.temp_size_in_bytes + mem.argument_size_in_bytes) / 2**30
    whole = steplib.time_call(rec.reconstruct, x, fam, repeats=args.repeats)
    idx0 = encode_j(tok_vars, x, fam)
    h_list = steps_j(tok_vars, pv, idx0, x, fam)
    t_enc = steplib.time_call(encode_j, tok_vars, x, fam, repeats=args.repeats)
    t_steps = steplib.time_call(steps_j, tok_vars, pv, idx0, x, fam, repeats=args.repeats)
    t_dec = steplib.time_call(decode_j, tok_vars, h_list, repeats=args.repeats)
    print(
      f"| {b} | {compile_s:.1f} | {mem_gib:.2f} | {1e3 * whole:.1f} | {1e3 * whole / b:.2f} | "
      f"{b / whole:.1f} | {1e3 * t_enc:.1f} | {1e3 * t_steps:.1f} | {1e3 * t_dec:.1f} |"
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())
