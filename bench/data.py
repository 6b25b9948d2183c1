"""Data-path throughput: synthesis, building (coil combination with ESPIRiT) and loading.

  python bench/data.py [--workdir /tmp/nextaccel_bench] [--devices 8]

Prints:
  1. synthetic volumes per second (demo geometry and full fastMRI geometry);
  2. builder slices per second at the paper's 256² crop (ESPIRiT or low-res maps, 5 virtual
     coils) and for a whole 256² build;
  3. loader examples per second at 256²: the host side (record decode + fresh nested masks) and the
     device side (the jitted six-level computation, multicoil), and both together.
The loader target is >= 500 examples/s of six 256² levels on 2 cores for the host side, so the input
pipeline never starves an accelerator step.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time


def _parse():
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--workdir", default=None, help="scratch folder (default: a temp dir)")
  p.add_argument("--devices", type=int, default=1, help="simulated CPU devices for the loader")
  p.add_argument("--batches", type=int, default=20, help="loader batches to time")
  p.add_argument("--batch_size", type=int, default=16)
  return p.parse_args()


def main():
  args = _parse()
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"

  import jax

  from nextaccel_jax import sharding
  from nextaccel_jax.data import coils, fastmri, pipeline, synthetic

  work = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="nextaccel_bench_"))
  print(
    f"scratch: {work}; JAX {jax.__version__}, {jax.device_count()} {jax.default_backend()} "
    f"device(s), {os.cpu_count()} CPU cores"
  )

  # 1. Synthesis ----------------------------------------------------------------------------------
  synthetic.generate_volume(0, "AXT2", num_slices=1, coils=(4, 4), geometry="tiny")  # warm caches
  for geometry, slices, ncoils, n in (("demo", 4, (8, 8), 4), ("fastmri", 4, (16, 16), 1)):
    t = time.perf_counter()
    paths = synthetic.write_dataset(
      work / f"synth_{geometry}",
      n,
      seed=0,
      num_slices=slices,
      coils=ncoils,
      geometry=geometry,
      overwrite=True,
    )
    dt = time.perf_counter() - t
    print(
      f"[synthetic] {geometry}: {n / dt:.2f} volumes/s ({slices} slices x {ncoils[0]} coils, "
      f"{dt / n:.2f} s/volume)"
    )
  fastmri_file = paths[0]

  # 2. Builder preprocessing -------------------------------------------------------------------
  vol = fastmri.read_volume(fastmri_file)
  for maps in ("espirit", "lowres"):
    t = time.perf_counter()
    for s in range(vol.num_slices):
      coils.combine_slice(
        vol.kspace[s], vol.header, crop=(256, 256), num_virtual_coils=5, maps=maps
      )
    dt = time.perf_counter() - t
    print(
      f"[builder] coil combination at 256² ({maps}, 5 virtual of 16 coils): "
      f"{vol.num_slices / dt:.2f} slices/s ({dt / vol.num_slices:.2f} s/slice)"
    )

  t = time.perf_counter()
  builder = loader_dataset(work / "tfds")
  dt = time.perf_counter() - t
  n_slices = sum(s.num_examples for s in builder.info.splits.values())
  print(
    f"[builder] end-to-end build at 256² (synthesis + lowres maps + eval levels): "
    f"{n_slices / dt:.2f} slices/s"
  )

  # 3. Loader ----------------------------------------------------------------------------------
  source = builder.as_data_source()["train"]
  mesh = sharding.make_mesh()
  loader = pipeline.TrainLoader(source, global_batch_size=args.batch_size, mesh=mesh, prefetch=2)
  host_rate = host_rate_of(loader, args.batches, args.batch_size)
  print(f"[loader] host side (decode + fresh nested masks), 256²: {host_rate:.0f} examples/s")

  levels_fn = pipeline.make_levels_fn(mesh)
  dev = sharding.global_batch(loader.host_batch(0), mesh)
  jax.block_until_ready(levels_fn(dev))
  t = time.perf_counter()
  for _ in range(args.batches):
    out = levels_fn(dev)
  jax.block_until_ready(out)
  dt = time.perf_counter() - t
  print(
    f"[loader] device side (jitted six levels, multicoil, {jax.default_backend()}): "
    f"{args.batches * args.batch_size / dt:.0f} examples/s"
  )

  next(loader)
  t = time.perf_counter()
  for _ in range(args.batches):
    out = next(loader)
  jax.block_until_ready(out["levels"])
  dt = time.perf_counter() - t
  print(
    f"[loader] end to end (prefetching host + device levels): "
    f"{args.batches * args.batch_size / dt:.0f} examples/s; levels {tuple(out['levels'].shape)}"
  )
  loader.close()
  print("target: host side >= 500 examples/s on 2 cores:", "met" if host_rate >= 500 else "NOT met")
  return 0


def loader_dataset(
  data_dir, crop: int = 256, geometry: str = "fastmri", coils=(8, 8), volumes=4, slices=4
):
  """Builds (or reuses) the synthetic dataset the loader is timed on; returns its builder.

  Low-res maps keep the set-up quick; the loader's cost is the same as with ESPIRiT maps.
  """
  import dataclasses

  from nextaccel_jax.data import build
  from nextaccel_jax.data import fastmri_brain_multiscale as fbm

  cfg = dataclasses.replace(
    fbm.BUILDER_CONFIGS[1],
    name=f"bench{crop}" if geometry == "fastmri" else f"bench{crop}{geometry}",
    crop=crop,
    maps="lowres",
    synthetic_geometry=geometry,
    synthetic_volumes={"train": volumes, "validation": 1},
    synthetic_slices=slices,
    synthetic_coils=tuple(coils),
  )
  return build.build(cfg, data_dir=data_dir)


def host_rate_of(loader, batches: int, batch_size: int) -> float:
  """Examples per second of `loader.host_batch` (record decode + fresh nested masks) after one
  untimed batch."""
  loader.host_batch(0)
  t = time.perf_counter()
  for k in range(batches):
    loader.host_batch(k)
  return batches * batch_size / (time.perf_counter() - t)


if __name__ == "__main__":
  sys.exit(main())
