"""Device mesh and batch placement: `jax.jit` + `NamedSharding` on a mesh with Auto axes.

Data parallelism is a `("data",)` mesh axis: batches are split along their leading axis and
everything else is replicated. Host-local numpy batches become global arrays through
`jax.make_array_from_process_local_data`, which is what makes the same code run on one host or many.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(axes: Sequence[tuple[str, int]] | None = None) -> Mesh:
  """Builds a mesh with Auto axis types (classic GSPMD propagation).

  Args:
    axes: `(name, size)` pairs; one size may be -1 to take the remaining devices. The default is all
      devices on the `data` axis.
  """
  n = jax.device_count()
  axes = list(axes or [(DATA_AXIS, -1)])
  names = tuple(name for name, _ in axes)
  sizes = [int(size) for _, size in axes]
  known = int(np.prod([s for s in sizes if s != -1]))
  if sizes.count(-1) > 1 or n % max(known, 1):
    raise ValueError(f"mesh axes {axes} do not fit {n} devices")
  sizes = [n // known if s == -1 else s for s in sizes]
  if int(np.prod(sizes)) != n:
    raise ValueError(
      f"mesh axes {dict(zip(names, sizes, strict=True))} use {np.prod(sizes)} of {n} devices"
    )
  return jax.make_mesh(tuple(sizes), names, axis_types=(AxisType.Auto,) * len(names))


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over `data`; the rest replicated."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(host_batch, mesh: Mesh):
  """Turns a pytree of host-local numpy arrays into global arrays sharded over `data`.

  Each process passes its own slice of the global batch (`per_process_batch` rows); the global
  leading dimension is that times the process count.
  """
  sharding = data_sharding(mesh)
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), host_batch
  )


def per_process_batch(global_batch_size: int, mesh: Mesh | None = None) -> int:
  """The rows of a global batch that this process loads; checks divisibility over the data axis."""
  data_size = mesh.shape[DATA_AXIS] if mesh is not None else jax.device_count()
  if global_batch_size % data_size:
    raise ValueError(
      f"global batch size {global_batch_size} is not divisible by the {data_size} devices of the "
      f"'{DATA_AXIS}' mesh axis"
    )
  return global_batch_size // jax.process_count()
