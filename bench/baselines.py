"""Baseline benchmark: parameters, train-step time, images/s and inference latency per slice.

  python bench/baselines.py --steps=2                     # paper sizes at 256², on CPU
  python bench/baselines.py --batch=16 --steps=20 --peak_tflops=989       # H100
  python bench/baselines.py --quick                       # tiny models at 64², a smoke check

Models at the paper's sizes: the fastMRI U-Net (chans 32, 4 pools, `[real, imag]` R = 32 image in,
magnitude out) and E2E-VarNet (12 cascades, chans 18, pools 4, sensitivity net chans 8, pools 4)
on 5-coil k-space under an R = 32 `cartesian_y` mask. The train step is an L1 loss on the
magnitude image with AdamW, jitted with the state donated; latency is one slice (batch 1) through
the jitted forward pass. Weights are random (`testing.random_like`) and inputs are noise of the
right shapes, so no dataset or checkpoint is needed. FLOPs come from XLA's cost analysis of the
compiled step.
"""

from __future__ import annotations

import argparse
import sys


def _train_fn(apply, optimizer):
  """A jitted `(params, opt_state), batch → (state, {"loss"})` step: L1 on the magnitude."""
  import jax
  import jax.numpy as jnp
  import optax

  def step(state, inputs, target):
    params, opt_state = state

    def loss_fn(p):
      return jnp.mean(jnp.abs(apply(p, *inputs) - target))

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), {"loss": loss}

  return jax.jit(step, donate_argnums=0)


def _bench(name, model, params, apply, inputs, target, slice_inputs, args) -> None:
  import jax
  import optax
  import steplib

  from nextaccel_jax.models import fields, layers

  print(f"\n== {name}: {fields.to_json(model)}")
  print(f"parameters: {layers.count_params(params):,}")
  optimizer = optax.adamw(1e-4, weight_decay=1e-4)
  state = (params, optimizer.init(params))
  train = _train_fn(apply, optimizer)
  compiled, flops = steplib.compile_step(train, state, inputs, target)
  state, m, dt = steplib.time_steps(compiled, state, inputs, target, steps=args.steps)
  print(f"train step: {dt * 1e3:.1f} ms, {args.batch / dt:.2f} images/s (batch {args.batch})")
  steplib.print_utilisation(flops, dt, args.peak_tflops)
  print(f"loss after {args.steps + 1} steps: {float(m['loss']):.4f}")
  forward = jax.jit(apply)
  latency = steplib.time_call(forward, state[0], *slice_inputs, repeats=max(args.steps, 1))
  print(f"inference latency: {latency * 1e3:.1f} ms per slice (batch 1)")


def main() -> int:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--model", default="both", choices=["unet", "varnet", "both"])
  p.add_argument("--batch", type=int, default=2, help="train batch")
  p.add_argument("--steps", type=int, default=3, help="timed steps after the compile step")
  p.add_argument("--size", type=int, default=256, help="image side (masks need >= 64)")
  p.add_argument("--coils", type=int, default=5, help="VarNet coils")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--quick", action="store_true", help="tiny models at 64² (smoke check)")
  p.add_argument("--peak_tflops", type=float, default=0.0, help="device peak for MFU (0: skip)")
  args = p.parse_args()

  import jax
  import jax.numpy as jnp
  import numpy as np

  sys.path.insert(0, ".")
  from nextaccel_jax import testing
  from nextaccel_jax.data import masks
  from nextaccel_jax.models import unet, varnet

  def random_params(model, *example):
    # A jitted `init` of the 13 VarNet U-Nets compiles for minutes on CPU; numpy fills the
    # shapes at once, and the step cost does not depend on the values.
    shapes = jax.eval_shape(model.init, jax.random.key(0), *example)["params"]
    return testing.random_like(shapes, seed=0)

  unet_fields, varnet_fields = dict(unet.PAPER), dict(varnet.PAPER)
  if args.quick:
    args.size = 64
    args.coils = min(args.coils, 2)
    unet_fields.update(chans=4, num_pool_layers=2)
    varnet_fields.update(num_cascades=2, chans=4, pools=2, sens_chans=4, sens_pools=2)
  n, b, c = args.size, args.batch, args.coils
  print(
    f"device: {jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()}); "
    f"{n}², batch {b}, {c} coils, dtype {args.dtype}"
  )
  rng = np.random.default_rng(0)
  target = jnp.asarray(rng.random((b, n, n)), jnp.float32)

  if args.model in ("unet", "both"):
    model = unet.Unet(**unet_fields, dtype=jnp.dtype(args.dtype))
    params = random_params(model, jnp.zeros((1, 32, 32, 2)))

    def apply_unet(p, x):
      y, _ = model.apply({"params": p}, x)
      return unet.to_magnitude(y).astype(jnp.float32)

    x = jnp.asarray(rng.standard_normal((b, n, n, 2)), jnp.float32)
    _bench("U-Net", model, params, apply_unet, (x,), target, (x[:1],), args)

  if args.model in ("varnet", "both"):
    model = varnet.VarNet(**varnet_fields, dtype=jnp.dtype(args.dtype))
    params = random_params(model, jnp.zeros((1, 1, 32, 32, 2)), jnp.ones((32, 32), bool))
    # Soft data consistency at fastMRI's initial weight rather than a random sign.
    params = jax.tree.map_with_path(
      lambda path, v: jnp.ones_like(v) if path[-1].key == "dc_weight" else v, params
    )
    mask = jnp.asarray(masks.nested_masks("cartesian_y", (n, n), seed=0)[32])
    k = rng.standard_normal((b, c, n, n, 2)).astype(np.float32) * np.asarray(mask)[..., None]
    k = jnp.asarray(k)

    def apply_varnet(p, k, mask):
      y, _ = model.apply({"params": p}, k, mask)
      return y

    _bench("E2E-VarNet", model, params, apply_varnet, (k, mask), target, (k[:1], mask), args)
  return 0


if __name__ == "__main__":
  sys.exit(main())
