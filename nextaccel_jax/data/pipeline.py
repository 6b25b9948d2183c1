"""From a `fastmri_brain_multiscale` split to global, sharded JAX batches of the six levels.

Shape legend: B global batch, b per-process batch, V virtual coils, H×W grid, L = 6 levels
(R = 32, 16, 8, 4, 2, FS), M = 5 masks, F mask families.

Training draws a fresh nested mask family per example on the host (cheap numpy, `masks.nested_masks`
with `train=True`) and ships it as a `uint8` level map; the six levels themselves are computed
on the device in one jitted function (`compute_levels`), where 5 coils × 5 masks of FFTs are
trivial on an accelerator. Order and masks are a pure function of `(seed, step)`, so a resumed
run sees exactly the batches it would have seen. Evaluation reads the stored levels at the seeded
evaluation masks.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds
from jax.sharding import Mesh

from nextaccel_jax import ConfigError, MissingInputError, sharding
from nextaccel_jax.data import (
  fastmri_brain_multiscale,  # noqa: F401  (registers the builder)
  masks,
  transforms,
)


def load_split(name: str, split: str, data_dir: str | os.PathLike | None = None):
  """Opens a built split as a random-access source (no TensorFlow needed).

  Args:
    name: `fastmri_brain_multiscale/<config>`, e.g. `fastmri_brain_multiscale/demo`.
    split: `train`, `validation` or `test`.
    data_dir: the TFDS data dir the dataset was built into.
  """
  builder = tfds.builder(name, data_dir=data_dir)
  if not builder.is_prepared():
    raise MissingInputError(
      f"dataset {name} is not built in {builder.data_dir}; build it with "
      f"`python -m nextaccel_jax.data.build --config={name.split('/')[-1]} --data_dir=...` "
      "(real fastMRI also needs --manual_dir=<folder with multicoil_train/ and multicoil_val/>, "
      "downloaded from https://fastmri.med.nyu.edu/), or run the built-in demo data instead: "
      "`python -m nextaccel_jax.main --config=configs/demo.py --workdir=runs/demo`"
    )
  sources = builder.as_data_source()
  if split not in sources:
    # A build leaves out a test split without usable volumes (only masked test files, say).
    raise ConfigError(
      f"dataset {name} in {builder.data_dir} has no split {split!r}; it has {sorted(sources)} "
      f"(choose one of those, e.g. --config.split=validation)"
    )
  return sources[split]


def as_text(value) -> str:
  """A record's string field as `str` (array_record sources give `bytes`)."""
  return value.decode() if isinstance(value, bytes) else str(value)


# ------------------------------------------------------------------------------------------------
# Ordering


@dataclasses.dataclass(frozen=True)
class IndexSampler:
  """Deterministic, resumable record order for a global batch stream.

  The stream is the concatenation of one permutation of the records per epoch (identity when
  `shuffle=False`); global step `t` covers stream positions `[t·B, (t+1)·B)`. Each process takes its
  contiguous block of `B / process_count` rows, matching `make_array_from_process_local_data`.
  """

  num_records: int
  global_batch_size: int
  seed: int = 0
  shuffle: bool = True
  process_index: int = 0
  process_count: int = 1

  def __post_init__(self):
    if self.num_records <= 0:
      raise ConfigError("IndexSampler: the split has no records")
    if self.global_batch_size % self.process_count:
      raise ConfigError(
        f"global batch {self.global_batch_size} not divisible by {self.process_count} processes"
      )

  def _permutation(self, epoch: int) -> np.ndarray:
    if not self.shuffle:
      return np.arange(self.num_records)
    return np.random.default_rng([self.seed, epoch]).permutation(self.num_records)

  def positions(self, step: int) -> np.ndarray:
    """Stream positions of this process's rows at `step`."""
    local = self.global_batch_size // self.process_count
    start = step * self.global_batch_size + self.process_index * local
    return np.arange(start, start + local)

  def indices(self, step: int) -> np.ndarray:
    """Record indices of this process's rows at `step`."""
    pos = self.positions(step)
    epochs = pos // self.num_records
    out = np.empty_like(pos)
    for e in np.unique(epochs):
      sel = epochs == e
      out[sel] = self._permutation(int(e))[pos[sel] % self.num_records]
    return out

  def epoch(self, step: int) -> float:
    return step * self.global_batch_size / self.num_records


# ------------------------------------------------------------------------------------------------
# Device-side levels


def levels_from_batch(batch: dict, single_coil: bool = False) -> jax.Array:
  """Six levels `[B, 6, H, W, 2]` from `image`, `maps` and `mask_levels` (traceable under jit)."""
  x_BHW = transforms.channels_to_complex(batch["image"])
  level_BHW = batch["mask_levels"]
  # Level map value k means "first sampled at mask k" (masks.level_map), so mask k is `level <= k`.
  m_BMHW = level_BHW[..., None, :, :] <= jnp.arange(len(transforms.ACCELERATIONS))[:, None, None]
  if single_coil:
    return transforms.undersample_levels_single(x_BHW, m_BMHW)
  maps_BVHW = transforms.channels_to_complex(batch["maps"])
  return transforms.undersample_levels(x_BHW, maps_BVHW, m_BMHW)


def r32_kspace(batch: dict, single_coil: bool = False) -> tuple[jax.Array, jax.Array]:
  """The measured R = 32 k-space of a batch with levels: `(kspace_BVHW2, mask_BHW)`.

  `k_c = M_32 ⊙ fft2c(S_c · x)` from the fully sampled level `x` (the last of `levels`), the coil
  `maps` and the R = 32 mask (`mask_levels == 0`); V = 1 and `S = 1` with `single_coil`. It is
  the measurement the R = 32 level was made from: `transforms.mc_adjoint` of it is `levels[:, 0]`
  (`levels_from_batch`, and the builder's stored evaluation levels). Traceable under jit.
  """
  x_BHW = transforms.channels_to_complex(batch["levels"][:, -1])
  mask_BHW = batch["mask_levels"] == 0
  m = mask_BHW.astype(jnp.complex64)
  if single_coil:
    k_BVHW = (m * transforms.fft2c(x_BHW))[:, None]
  else:
    k_BVHW = transforms.mc_forward(x_BHW, transforms.channels_to_complex(batch["maps"]), m)
  return transforms.complex_to_channels(k_BVHW), mask_BHW


def make_levels_fn(mesh: Mesh, single_coil: bool = False, keep_maps: bool = False):
  """Jitted batch → batch-with-levels on `mesh`, sharded over `data` in and out; `keep_maps`
  passes the coil maps through (for steps that form the multicoil k-space themselves)."""
  shard = sharding.data_sharding(mesh)

  def add_levels(batch):
    levels = levels_from_batch(batch, single_coil)
    out = {k: v for k, v in batch.items() if k not in ("image", "maps", "mask_levels")}
    out["levels"] = levels
    out["mask_levels"] = batch["mask_levels"]
    if keep_maps:
      out["maps"] = batch["maps"]
    return out

  return jax.jit(add_levels, in_shardings=shard, out_shardings=shard)


# ------------------------------------------------------------------------------------------------
# Loaders


def _acc_index(b: int) -> np.ndarray:
  # Level k of every example carries acceleration label k (0 = R32 … 5 = FS).
  return np.broadcast_to(
    np.arange(transforms.NUM_LEVELS, dtype=np.int32), (b, transforms.NUM_LEVELS)
  )


class TrainLoader:
  """Infinite stream of global training batches with fresh nested masks per example.

  Each batch is a dict of global arrays sharded over `data`:
    levels `[B, 6, H, W, 2]` f32, mask_levels `[B, H, W]` u8, family `[B]` i32,
    acc_index `[B, 6]` i32, contrast `[B]` i32, scale `[B]` f32.
  With `compute_levels=False` the batch carries `image` and `maps` instead of `levels`, for
  train steps that fold `levels_from_batch` into their own jitted step; with `keep_maps` it
  carries `maps` `[B, V, H, W, 2]` f32 beside the levels (the baselines' multicoil k-space).
  """

  def __init__(
    self,
    source,
    *,
    global_batch_size: int,
    mesh: Mesh,
    seed: int = 0,
    families: Sequence[str] = masks.FAMILIES,
    start_step: int = 0,
    single_coil: bool = False,
    compute_levels: bool = True,
    keep_maps: bool = False,
    prefetch: int = 2,
    num_threads: int = 2,
  ):
    self.source = source
    self.mesh = mesh
    self.families = tuple(masks.canonical_family(f) for f in families)
    self.seed = seed
    self.step = start_step
    self.sampler = IndexSampler(
      len(source),
      global_batch_size,
      seed=seed,
      shuffle=True,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    )
    sharding.per_process_batch(global_batch_size, mesh)
    self._levels_fn = make_levels_fn(mesh, single_coil, keep_maps) if compute_levels else None
    # One thread prefetches whole batches; `num_threads` decode records inside a batch. Record
    # reads and numpy work release the GIL, so threads scale on the host's cores.
    self._pool = concurrent.futures.ThreadPoolExecutor(1)
    self._workers = concurrent.futures.ThreadPoolExecutor(max(1, num_threads))
    self._prefetch = max(1, prefetch)
    self._pending: dict[int, concurrent.futures.Future] = {}

  def _example(self, record_index: int, position: int) -> dict:
    ex = self.source[int(record_index)]
    # One generator per stream position: a record seen again in a later epoch gets new masks.
    rng = np.random.default_rng([self.seed, 1, int(position)])
    fam = int(rng.integers(len(self.families)))
    n = ex["image"].shape[0]
    m = masks.nested_masks(self.families[fam], (n, n), seed=rng, train=True)
    return {
      "image": ex["image"],
      "maps": ex["maps"],
      "mask_levels": masks.level_map(m),
      "family": np.int32(masks.family_id(self.families[fam])),
      "contrast": np.int32(ex["contrast"]),
      "scale": np.float32(ex["scale"]),
    }

  def host_batch(self, step: int) -> dict:
    """This process's rows of global step `step` as numpy arrays."""
    rows = list(
      self._workers.map(self._example, self.sampler.indices(step), self.sampler.positions(step))
    )
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    batch["acc_index"] = _acc_index(len(rows))
    return batch

  def _future(self, step: int) -> concurrent.futures.Future:
    if step not in self._pending:
      self._pending[step] = self._pool.submit(self.host_batch, step)
    return self._pending[step]

  def __iter__(self) -> Iterator[dict]:
    return self

  def __next__(self) -> dict:
    for s in range(self.step, self.step + self._prefetch + 1):
      self._future(s)
    host = self._pending.pop(self.step).result()
    self.step += 1
    batch = sharding.global_batch(host, self.mesh)
    return self._levels_fn(batch) if self._levels_fn is not None else batch

  def close(self):
    self._pool.shutdown(wait=False, cancel_futures=True)
    self._workers.shutdown(wait=False, cancel_futures=True)


class EvalLoader:
  """One fixed pass over an eval split: every record under every requested mask family.

  Batches hold the stored levels at the seeded evaluation masks, plus `valid` `[B]` (False on the
  padding rows of the last batch) and `record` `[B]` (the split index, for per-slice reports);
  with `with_maps` also the coil sensitivities `maps` `[B, V, H, W, 2]` (for data consistency).
  """

  def __init__(
    self,
    source,
    *,
    global_batch_size: int,
    mesh: Mesh,
    families: Sequence[str] = masks.FAMILIES,
    max_records: int | None = None,
    with_maps: bool = False,
  ):
    self.source = source
    self.mesh = mesh
    self.with_maps = with_maps
    self.global_batch_size = global_batch_size
    sharding.per_process_batch(global_batch_size, mesh)
    self.families = tuple(masks.canonical_family(f) for f in families)
    n = len(source) if max_records is None else min(max_records, len(source))
    if n == 0:
      raise ConfigError("EvalLoader: the split has no records")
    # Family-major order keeps each family's slices contiguous for per-family reports.
    self.items = [(f, i) for f in self.families for i in range(n)]

  def __len__(self) -> int:
    return -(-len(self.items) // self.global_batch_size)

  def _example(self, item) -> dict:
    fam, i = item
    ex = self.source[i]
    fid = masks.family_id(fam)
    if ex["levels"].shape[0] == 0:
      raise ConfigError(
        "EvalLoader: this split stores no eval levels (a train split built without "
        "store_train_levels); evaluate on validation or test"
      )
    out = {
      "levels": ex["levels"][fid],
      "mask_levels": ex["mask_levels"][fid],
      "family": np.int32(fid),
      "contrast": np.int32(ex["contrast"]),
      "scale": np.float32(ex["scale"]),
      "record": np.int32(i),
    }
    if self.with_maps:
      out["maps"] = ex["maps"]
    return out

  def host_batch(self, k: int) -> dict:
    b = self.global_batch_size // jax.process_count()
    start = k * self.global_batch_size + jax.process_index() * b
    chunk = self.items[start : start + b]
    valid = [True] * len(chunk) + [False] * (b - len(chunk))
    chunk = chunk + [self.items[0]] * (b - len(chunk))
    rows = [self._example(it) for it in chunk]
    batch = {key: np.stack([r[key] for r in rows]) for key in rows[0]}
    batch["valid"] = np.asarray(valid)
    batch["acc_index"] = _acc_index(b)
    return batch

  def __iter__(self) -> Iterator[dict]:
    for k in range(len(self)):
      yield sharding.global_batch(self.host_batch(k), self.mesh)


def stored_eval_levels(example: dict, family: str) -> np.ndarray:
  """The stored `[6, H, W, 2]` levels of one decoded example under one mask family."""
  return np.asarray(example["levels"][masks.family_id(family)])


def zero_filled_magnitudes(levels_L_HW2: np.ndarray | jnp.ndarray) -> np.ndarray:
  """Magnitudes `[6, H, W]` of stored levels (zero-filled images and the FS target)."""
  return np.abs(transforms.channels_to_complex(np.asarray(levels_L_HW2)))


def train_batch_spec(
  global_batch_size: int, image_size: int, mesh: Mesh, num_coils: int = 0
) -> dict:
  """Shapes, dtypes and sharding of a `TrainLoader` batch (levels computed), so that a train step
  can be compiled ahead of time before any record is read; `num_coils > 0` adds the `maps` of a
  `keep_maps` loader."""
  b, n, k = global_batch_size, image_size, transforms.NUM_LEVELS
  shard = sharding.data_sharding(mesh)
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, jnp.dtype(dtype), sharding=shard)
  out = {
    "family": spec((b,), np.int32),
    "contrast": spec((b,), np.int32),
    "scale": spec((b,), np.float32),
    "acc_index": spec((b, k), np.int32),
    "levels": spec((b, k, n, n, 2), np.float32),
    "mask_levels": spec((b, n, n), np.uint8),
  }
  if num_coils > 0:
    out["maps"] = spec((b, num_coils, n, n, 2), np.float32)
  return out
