"""Device mesh, parameter sharding rules and batch placement (`jax.jit` + `NamedSharding`).

The mesh has Auto axes (classic GSPMD propagation) named `data` and, optionally, `fsdp`:

- batches are split along their leading axis over every batch axis present (`data` × `fsdp`),
  so a `(data=2, fsdp=4)` mesh still runs 8-way data parallel;
- parameters, optimizer moments and frozen networks follow `rules`: `(regex, spec)` pairs
  matched in order against each leaf's `/`-joined path (`params/encoder/conv_in/kernel`,
  `opt_state/1/0/mu/encoder/conv_in/kernel`). `"fsdp"` shards a leaf of at least
  `fsdp_min_size` elements along its largest dimension divisible by the `fsdp` axis (ZeRO-3
  style: XLA all-gathers it where it is used and reduce-scatters its gradient); `"replicated"`
  keeps a full copy on every device; a tuple names a mesh axis (or None) per dimension. With
  `fsdp = 1` every rule degenerates to replication, which is plain data parallelism.

Host-local numpy batches become global arrays through `jax.make_array_from_process_local_data`,
and `to_host` gathers results back, which is what makes the same code run on one host or many.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from nextaccel_jax import ConfigError

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
# Axes the batch is split over, in this order, where the mesh has them.
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)
DEFAULT_MESH = ((DATA_AXIS, -1), (FSDP_AXIS, 1))
# Every leaf is a candidate for FSDP; the size threshold keeps small ones replicated.
DEFAULT_RULES = ((".*", "fsdp"),)
# 2^18 float32 values are 1 MiB: below that, gathering a leaf costs more than its copy saves.
DEFAULT_FSDP_MIN_SIZE = 2**18
_SPEC_NAMES = ("fsdp", "replicated")


def make_mesh(
  axes: Sequence[tuple[str, int]] | None = None, devices: Sequence[jax.Device] | None = None
) -> Mesh:
  """Builds a mesh with Auto axis types.

  Args:
    axes: `(name, size)` pairs; one size may be -1 to take the remaining devices. The default is
      all devices on `data` (and an `fsdp` axis of size 1).
    devices: The devices to lay out (default: all of them, every process's).

  Raises:
    ValueError: If the sizes do not multiply to the number of devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  axes = [tuple(a) for a in (axes or DEFAULT_MESH)]
  names = tuple(str(name) for name, _ in axes)
  sizes = [int(size) for _, size in axes]
  if len(set(names)) != len(names):
    raise ConfigError(f"mesh axes {axes} repeat a name")
  known = int(np.prod([s for s in sizes if s != -1]))
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes) or n % max(known, 1):
    raise ConfigError(f"mesh axes {axes} do not fit {n} devices")
  sizes = [n // known if s == -1 else s for s in sizes]
  if int(np.prod(sizes)) != n:
    raise ConfigError(
      f"mesh axes {dict(zip(names, sizes, strict=True))} use {np.prod(sizes)} of {n} devices"
    )
  return jax.make_mesh(
    tuple(sizes), names, axis_types=(AxisType.Auto,) * len(names), devices=devices
  )


def mesh_from_config(config) -> Mesh:
  """The mesh of a stage config's `mesh` field (`(name, size)` pairs)."""
  return make_mesh(config.get("mesh") or None)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """The mesh axes the batch dimension is split over."""
  return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def batch_divisor(mesh: Mesh) -> int:
  """How many ways the batch is split: the product of the batch axes' sizes."""
  return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the batch axes; the rest replicated."""
  axes = batch_axes(mesh)
  if not axes:
    return NamedSharding(mesh, P())
  return NamedSharding(mesh, P(axes[0] if len(axes) == 1 else axes))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


# ------------------------------------------------------------------------------------------------
# Parameter and state sharding


def leaf_path(path) -> str:
  """A pytree key path as `"params/block_0/attn/kernel"`."""
  return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def _check_rules(rules) -> list[tuple[re.Pattern, object]]:
  out = []
  for i, rule in enumerate(rules):
    if len(rule) != 2:
      raise ConfigError(f"sharding rule {i} {rule!r} is not a (regex, spec) pair")
    pattern, spec = rule
    if isinstance(spec, str) and spec not in _SPEC_NAMES:
      raise ConfigError(
        f"sharding rule {i} ({pattern!r}): spec {spec!r} is not one of {_SPEC_NAMES} or a tuple "
        "of mesh axes per dimension"
      )
    try:
      out.append((re.compile(pattern), spec))
    except re.error as e:
      raise ConfigError(f"sharding rule {i}: {pattern!r} is not a valid regex ({e})") from e
  return out


def _fsdp_spec(shape: tuple[int, ...], mesh: Mesh, min_size: int) -> P:
  n = mesh.shape.get(FSDP_AXIS, 1)
  if n <= 1 or math.prod(shape) < max(min_size, 1):
    return P()
  # The largest dimension that splits evenly; ties go to the later one (output features).
  candidates = [(d, i) for i, d in enumerate(shape) if d % n == 0]
  if not candidates:
    return P()
  _, dim = max(candidates)
  spec = [None] * len(shape)
  spec[dim] = FSDP_AXIS
  return P(*spec)


def _explicit_spec(spec, shape, mesh: Mesh, name: str, pattern: str) -> P:
  spec = tuple(spec)
  if len(spec) != len(shape):
    raise ConfigError(
      f"sharding rule {pattern!r} gives {len(spec)} axes for {name} of shape {shape}"
    )
  for axis, dim in zip(spec, shape, strict=True):
    if axis is None:
      continue
    for a in (axis,) if isinstance(axis, str) else tuple(axis):
      if a not in mesh.axis_names:
        raise ConfigError(f"sharding rule {pattern!r}: no mesh axis {a!r} (mesh {mesh.shape})")
    size = math.prod(mesh.shape[a] for a in ((axis,) if isinstance(axis, str) else axis))
    if dim % size:
      raise ConfigError(
        f"sharding rule {pattern!r}: {name} of shape {shape} cannot split a dimension of "
        f"{dim} over {axis!r} ({size} devices)"
      )
  return P(*spec)


def leaf_spec(
  name: str,
  shape: tuple[int, ...],
  mesh: Mesh,
  rules=DEFAULT_RULES,
  fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE,
) -> P:
  """The PartitionSpec of one leaf from the first rule whose regex is found in `name`."""
  shape = tuple(int(d) for d in shape)
  for pattern, spec in _check_rules(rules):
    if not pattern.search(name):
      continue
    if not shape or spec == "replicated":
      return P()
    if spec == "fsdp":
      return _fsdp_spec(shape, mesh, fsdp_min_size)
    return _explicit_spec(spec, shape, mesh, name, pattern.pattern)
  return P()


def tree_shardings(
  tree,
  mesh: Mesh,
  rules=DEFAULT_RULES,
  fsdp_min_size: int = DEFAULT_FSDP_MIN_SIZE,
  prefix: str = "",
):
  """A `NamedSharding` per leaf of `tree` (arrays or `jax.ShapeDtypeStruct`s) from the rules.

  Args:
    tree: The pytree to lay out (a train state, frozen variables, ...).
    mesh: The device mesh.
    rules: `(regex, spec)` pairs, see the module docstring.
    fsdp_min_size: Leaves with fewer elements stay replicated under `"fsdp"`.
    prefix: Prepended to each leaf's path before matching (e.g. `"frozen/"`).
  """

  def one(path, leaf):
    name = prefix + leaf_path(path)
    return NamedSharding(mesh, leaf_spec(name, np.shape(leaf), mesh, rules, fsdp_min_size))

  return jax.tree.map_with_path(one, tree)


def rules_from_config(config) -> dict:
  """`tree_shardings` keyword arguments from a stage config's `sharding` section."""
  section = config.get("sharding") if hasattr(config, "get") else None
  if not section:
    return {"rules": DEFAULT_RULES, "fsdp_min_size": DEFAULT_FSDP_MIN_SIZE}
  rules = tuple(tuple(r) for r in section.get("rules", DEFAULT_RULES))
  return {"rules": rules, "fsdp_min_size": int(section.get("fsdp_min_size", DEFAULT_FSDP_MIN_SIZE))}


def state_shardings(abstract, mesh: Mesh, config=None, prefix: str = ""):
  """`tree_shardings` with the rules of `config` (defaults when None)."""
  return tree_shardings(abstract, mesh, prefix=prefix, **rules_from_config(config))


def place(tree, mesh: Mesh, config=None, prefix: str = ""):
  """`tree` (frozen variables) put on the mesh with the config's rules."""
  return jax.device_put(tree, state_shardings(tree, mesh, config, prefix))


def with_shardings(abstract, shardings):
  """`jax.ShapeDtypeStruct`s of `abstract` carrying `shardings` (a restore target)."""
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings
  )


def laid_out(abstract, mesh: Mesh, config=None, prefix: str = ""):
  """`abstract` carrying the shardings the config's rules give it: where to restore a tree."""
  return with_shardings(abstract, state_shardings(abstract, mesh, config, prefix))


def shardings_of(tree):
  """The sharding of every array leaf (for `in_shardings` of arguments already placed)."""
  return jax.tree.map(lambda x: x.sharding, tree)


def describe(shardings: Mapping | object) -> dict[str, int]:
  """How many leaves each distinct PartitionSpec covers (for logs)."""
  counts: dict[str, int] = {}
  for s in jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding)):
    key = str(s.spec)
    counts[key] = counts.get(key, 0) + 1
  return counts


# ------------------------------------------------------------------------------------------------
# Batches


def global_batch(host_batch, mesh: Mesh):
  """Turns a pytree of host-local numpy arrays into global arrays sharded over the batch axes.

  Each process passes its own slice of the global batch (`per_process_batch` rows); the global
  leading dimension is that times the process count.
  """
  sharding = data_sharding(mesh)
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), host_batch
  )


def per_process_batch(global_batch_size: int, mesh: Mesh | None = None) -> int:
  """The rows of a global batch that this process loads; checks divisibility over the batch axes."""
  ways = batch_divisor(mesh) if mesh is not None else jax.device_count()
  if global_batch_size % ways or global_batch_size % jax.process_count():
    axes = "×".join(batch_axes(mesh)) if mesh is not None else DATA_AXIS
    raise ConfigError(
      f"global batch size {global_batch_size} is not divisible by the {ways} devices of the "
      f"'{axes}' mesh axes (and the {jax.process_count()} processes)"
    )
  return global_batch_size // jax.process_count()


def to_host(tree):
  """numpy copies of every leaf, whole on every process (gathered when sharded across hosts)."""

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)

  return jax.tree.map(one, tree)
