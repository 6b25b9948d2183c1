"""Orbax checkpoints of a stage's train state: periodic saves, the best model, and `init_from`.

One stage writes into its workdir:

- `checkpoints/<step>/`: periodic checkpoints, the last `max_to_keep` of them, each a
  `Composite(state=StandardSave, meta=JsonSave)`.
- `best/<step>/`: exactly one checkpoint, the best so far by the validation metric; its value
  sits in the JSON metadata so a resumed job keeps comparing against it.

The resume order of a stage (style.md §2 "Checkpointing") is: (1) `Checkpointer.restore` of the
workdir's own latest step, (2) `load_params` of the previous stage's workdir (`config.init_from`),
which returns the stored tree without needing its full structure, (3) scratch.

Every process must call `save`, `save_best` and `restore` with the same arguments: Orbax writes
each array shard from the process that holds it, and the JSON metadata from process 0 only.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

_STATE = "state"
_META = "meta"
_CHECKPOINTS_DIR = "checkpoints"
_BEST_DIR = "best"


def abstract_like(state) -> Any:
  """Shapes, dtypes and shardings of `state`, the restore target for a state laid out like it.

  Args:
    state: A pytree of arrays (typed PRNG keys included).

  Returns:
    The same tree with `jax.ShapeDtypeStruct` leaves; `jax.Array` leaves keep their sharding.
  """

  def leaf(x):
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    if isinstance(x, jax.ShapeDtypeStruct):
      return x
    x = np.asarray(x)
    return jax.ShapeDtypeStruct(x.shape, x.dtype)

  return jax.tree.map(leaf, state)


def _to_json(value):
  """Plain Python types for JSON: numpy and JAX scalars become floats or ints."""
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {str(k): _to_json(v) for k, v in value.items()}
  if isinstance(value, list | tuple):
    return [_to_json(v) for v in value]
  if isinstance(value, bool | str | int | float) or value is None:
    return value
  arr = np.asarray(value)
  if arr.size == 1 and arr.dtype == np.bool_:
    return bool(arr.reshape(()))
  if arr.size == 1 and np.issubdtype(arr.dtype, np.integer):
    return int(arr.reshape(()))
  if arr.size == 1 and np.issubdtype(arr.dtype, np.number):
    return float(arr.reshape(()))
  return str(value)


def _manager(directory: str, max_to_keep: int | None, async_save: bool):
  options = ocp.CheckpointManagerOptions(
    max_to_keep=max_to_keep,
    enable_async_checkpointing=async_save,
    create=True,
  )
  return ocp.CheckpointManager(directory, options=options)


class Checkpointer:
  """Periodic and best-model checkpoints of one workdir.

  Saves are synchronous unless `async_save=True`. Even then, every method that reads checkpoints
  first waits for pending writes, so what was saved is what is read.

  Attributes:
    workdir: The stage's working directory.
  """

  def __init__(
    self,
    workdir: str,
    *,
    max_to_keep: int = 3,
    save_interval_steps: int = 1,
    keep_best: bool = True,
    best_metric: str = "ssim",
    best_mode: str = "max",
    async_save: bool = False,
  ):
    """Opens (or creates) the checkpoint folders of `workdir`.

    Args:
      workdir: Stage working directory; checkpoints go to `workdir/checkpoints` and `workdir/best`.
      max_to_keep: Periodic checkpoints kept; older ones are deleted.
      save_interval_steps: `save` writes only steps divisible by this (unless `force=True`).
      keep_best: Whether `save_best` writes anything.
      best_metric: Name of the metric `save_best` compares, recorded in the metadata.
      best_mode: `"max"` (higher is better, e.g. SSIM) or `"min"` (e.g. a loss).
      async_save: Write in a background thread after the device-to-host copy; the copy finishes
        before `save` returns, so the saved state may be donated right away.
    """
    if best_mode not in ("max", "min"):
      raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
    # Orbax needs absolute paths; a relative workdir (runs/demo) is resolved against the cwd.
    self.workdir = os.path.abspath(os.fspath(workdir))
    self.best_metric = best_metric
    self.best_mode = best_mode
    self.keep_best = keep_best
    self.save_interval_steps = max(int(save_interval_steps), 1)
    self._async = async_save
    self._periodic = _manager(os.path.join(self.workdir, _CHECKPOINTS_DIR), max_to_keep, async_save)
    self._best = None
    if keep_best:
      # Only improvements are ever written, so keeping the newest one keeps the best one.
      self._best = _manager(os.path.join(self.workdir, _BEST_DIR), 1, async_save)
    self._best_value: float | None = None
    self._best_value_read = False

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def _managers(self):
    return [m for m in (self._periodic, self._best) if m is not None]

  def wait(self) -> None:
    """Blocks until every pending write has finished."""
    for m in self._managers():
      m.wait_until_finished()

  def close(self) -> None:
    """Finishes pending writes and releases the managers."""
    for m in self._managers():
      m.close()

  def latest_step(self, *, best: bool = False) -> int | None:
    """The newest saved step (periodic, or of the best checkpoint), or None if there is none."""
    manager = self._pick(best)
    manager.wait_until_finished()
    return manager.latest_step()

  def all_steps(self, *, best: bool = False) -> list[int]:
    """Every saved step, oldest first."""
    manager = self._pick(best)
    manager.wait_until_finished()
    return sorted(manager.all_steps())

  def save(
    self,
    step: int,
    state,
    *,
    meta: dict | None = None,
    metrics: dict | None = None,
    force: bool = False,
  ) -> bool:
    """Saves a periodic checkpoint if `step` is due (or `force`).

    Args:
      step: Training step; a step that is already saved is skipped.
      state: Pytree of arrays.
      meta: JSON-able metadata (e.g. the stage name and config), stored beside the state.
      metrics: Scalars describing this step, stored in the metadata under `"metrics"`.
      force: Save even if `step` is not a multiple of `save_interval_steps`.

    Returns:
      Whether a checkpoint was written.
    """
    step = int(step)
    # The interval is checked here rather than by Orbax, which would also save the first step of
    # a run whatever its number.
    due = force or step % self.save_interval_steps == 0
    if not due or step in self._periodic.all_steps():
      return False
    meta = dict(meta or {})
    if metrics is not None:
      meta["metrics"] = metrics
    saved = self._periodic.save(step, args=self._save_args(state, meta), force=True)
    if saved and not self._async:
      self._periodic.wait_until_finished()
    return bool(saved)

  def best_value(self) -> float | None:
    """The metric value of the best checkpoint so far, or None before the first."""
    if self._best is None:
      return None
    if not self._best_value_read:
      self._best.wait_until_finished()
      step = self._best.latest_step()
      if step is not None:
        meta = self._best.restore(step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))
        self._best_value = float(meta[_META]["best_value"])
      self._best_value_read = True
    return self._best_value

  def is_better(self, metric_value: float) -> bool:
    """Whether `metric_value` beats the best so far (NaN never does)."""
    value = float(metric_value)
    if math.isnan(value):
      return False
    best = self.best_value()
    if best is None:
      return True
    return value > best if self.best_mode == "max" else value < best

  def save_best(self, step: int, state, metric_value: float, meta: dict | None = None) -> bool:
    """Replaces the best checkpoint if `metric_value` improves on it.

    Args:
      step: Training step of `state`.
      state: Pytree of arrays.
      metric_value: Value of `best_metric` for `state`; stored in the metadata.
      meta: Further JSON-able metadata.

    Returns:
      Whether `state` became the new best checkpoint.
    """
    if self._best is None or not self.is_better(metric_value):
      return False
    step = int(step)
    value = float(metric_value)
    meta = {
      **(meta or {}),
      "best_metric": self.best_metric,
      "best_mode": self.best_mode,
      "best_value": value,
    }
    # A job resumed from before its last best step can reach that step, or an earlier one, with
    # a better value. Orbax keeps the highest step, so those later entries must go first.
    for stale in self._best.all_steps():
      if stale >= step:
        self._best.delete(stale)
    self._best.save(step, args=self._save_args(state, meta), force=True)
    if not self._async:
      self._best.wait_until_finished()
    self._best_value = value
    self._best_value_read = True
    return True

  def restore(self, abstract_state, step: int | None = None, *, best: bool = False):
    """Restores a state saved by `save` (or `save_best`) with the given layout.

    Args:
      abstract_state: Pytree of `jax.ShapeDtypeStruct(shape, dtype, sharding=...)`, e.g.
        `abstract_like(state)` or `jax.eval_shape` of the state initialiser with shardings; the
        restored arrays get these shardings.
      step: Step to restore; None for the newest.
      best: Restore from the best checkpoint instead of the periodic ones.

    Returns:
      `(state, meta)`, `meta` the JSON metadata as a dict.

    Raises:
      FileNotFoundError: If there is no checkpoint, or none at `step`; the message names the
        workdir and the steps that exist.
    """
    manager = self._pick(best)
    manager.wait_until_finished()
    steps = sorted(manager.all_steps())
    kind = "best" if best else "periodic"
    if not steps:
      raise FileNotFoundError(f"no {kind} checkpoint in workdir {self.workdir}")
    if step is None:
      step = steps[-1]
    if int(step) not in steps:
      raise FileNotFoundError(
        f"no {kind} checkpoint at step {step} in workdir {self.workdir}; saved steps: {steps}"
      )
    restored = manager.restore(
      int(step),
      args=ocp.args.Composite(
        **{_STATE: ocp.args.StandardRestore(abstract_state), _META: ocp.args.JsonRestore()}
      ),
    )
    return restored[_STATE], dict(restored[_META] or {})

  def _pick(self, best: bool):
    if not best:
      return self._periodic
    if self._best is None:
      raise ValueError("this Checkpointer was created with keep_best=False")
    return self._best

  @staticmethod
  def _save_args(state, meta: dict):
    return ocp.args.Composite(
      **{_STATE: ocp.args.StandardSave(state), _META: ocp.args.JsonSave(_to_json(meta))}
    )


def _manager_dir(path: str, best: bool) -> str:
  """The Orbax manager folder behind a workdir or a manager folder."""
  sub = os.path.join(path, _BEST_DIR if best else _CHECKPOINTS_DIR)
  return sub if os.path.isdir(sub) else path


def load_params(
  path_or_workdir: str,
  abstract_tree=None,
  *,
  item: str = _STATE,
  best: bool = False,
  step: int | None = None,
):
  """Loads the stored tree of another stage's checkpoint, e.g. for `init_from`.

  Args:
    path_or_workdir: A stage workdir, or the `checkpoints` / `best` folder inside one.
    abstract_tree: None loads every leaf as a host numpy array, independent of how many devices
      wrote it (a typed PRNG key comes back as its raw uint32 data). A pytree of
      `jax.ShapeDtypeStruct` with shardings loads just those leaves as `jax.Array`s; it may be a
      subtree of what is stored, e.g. `{"params": ..., "vq_ema": ...}` out of a full train state.
    item: The composite item to read (`"state"` for checkpoints written by `Checkpointer`).
    best: Read the best checkpoint instead of the latest periodic one.
    step: A particular step instead of the newest.

  Returns:
    The restored pytree (nested dicts for a state that was saved as dicts or dataclasses).

  Raises:
    FileNotFoundError: If the folder holds no checkpoint (or none at `step`).
  """
  directory = _manager_dir(os.path.abspath(os.fspath(path_or_workdir)), best)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no checkpoint folder at {directory}")
  options = ocp.CheckpointManagerOptions(read_only=True, create=False)
  # The JSON handler is registered only so that Orbax does not warn about an unreadable item.
  handlers = {_META: ocp.JsonCheckpointHandler(), item: ocp.PyTreeCheckpointHandler()}
  with ocp.CheckpointManager(directory, options=options, item_handlers=handlers) as manager:
    steps = sorted(manager.all_steps())
    if not steps or (step is not None and int(step) not in steps):
      wanted = "any step" if step is None else f"step {step}"
      raise FileNotFoundError(
        f"no checkpoint at {wanted} in {directory} (from {path_or_workdir}); saved steps: {steps}"
      )
    step = steps[-1] if step is None else int(step)
    if abstract_tree is None:
      stored = manager.item_metadata(step)[item].tree
      restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), stored)
      args = ocp.args.PyTreeRestore(restore_args=restore_args)
    else:
      args = ocp.args.PyTreeRestore(
        item=abstract_tree,
        restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_tree),
        partial_restore=True,
      )
    return manager.restore(step, args=ocp.args.Composite(**{item: args}))[item]


def load_best_or_latest(path_or_workdir: str, abstract_tree=None, *, item: str = _STATE):
  """`load_params` of a workdir's best checkpoint, or of its latest one when it kept no best."""
  try:
    return load_params(path_or_workdir, abstract_tree, item=item, best=True)
  except FileNotFoundError:
    return load_params(path_or_workdir, abstract_tree, item=item)
