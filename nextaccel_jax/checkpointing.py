"""Orbax checkpoints of a stage's train state: periodic saves, the best model, and `init_from`.

One stage writes into its workdir:

- `checkpoints/<step>/`: periodic checkpoints, the last `max_to_keep` of them, each a
  `Composite(state=StandardSave, meta=JsonSave)`.
- `best/<step>/`: exactly one checkpoint, the best so far by the validation metric; its value
  sits in the JSON metadata so a resumed job keeps comparing against it.

The resume order of a stage (style.md §2 "Checkpointing") is: (1) `Checkpointer.restore` of the
workdir's own latest step, (2) `load_params` of the previous stage's workdir (`config.init_from`),
which returns the stored tree without needing its full structure, (3) scratch.

Trained runs are read by one reader: `find_checkpoint` locates a run's best (or newest) checkpoint
and its metadata, `restore_checkpoint` reads all of it or only the subtrees a later stage needs
(checking their shapes first, naming the leaf paths), `read_run_config` gives the run's
`config.json` and `resolve_tokenizer_from` the stage-1 workdir a stage-2/3 run was trained with.
Later stages, the export and the evaluation all load through these.

Every process must call `save`, `save_best` and `restore` with the same arguments: Orbax writes
each array shard from the process that holds it, and the JSON metadata from process 0 only.
"""

from __future__ import annotations

import dataclasses
import json
import logging as std_logging
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from nextaccel_jax import ConfigError, MissingInputError

_STATE = "state"
_META = "meta"
_CHECKPOINTS_DIR = "checkpoints"
_BEST_DIR = "best"
# Where `restore_newest_intact` keeps checkpoints that no longer restore.
DAMAGED_DIR = "damaged_checkpoints"


class _ReadOnlyNotice(std_logging.Filter):
  """Drops Orbax's "Given directory is read only" warning: every plain read of a finished run
  (`find_checkpoint`, `load_params`, the export) opens its folder read-only on purpose."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return "Given directory is read only" not in record.getMessage()


std_logging.getLogger("absl").addFilter(_ReadOnlyNotice())


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0] if text else ''}"[:300]


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
      raise ConfigError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
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
      raise MissingInputError(f"no {kind} checkpoint in workdir {self.workdir}")
    if step is None:
      step = steps[-1]
    if int(step) not in steps:
      raise MissingInputError(
        f"no {kind} checkpoint at step {step} in workdir {self.workdir}; saved steps: {steps}"
      )
    restored = manager.restore(
      int(step),
      args=ocp.args.Composite(
        **{_STATE: ocp.args.StandardRestore(abstract_state), _META: ocp.args.JsonRestore()}
      ),
    )
    return restored[_STATE], dict(restored[_META] or {})

  def restore_newest_intact(self, abstract_state):
    """Restores the newest periodic checkpoint that reads back, setting damaged newer ones aside.

    A checkpoint that fails to restore while an older one restores is damaged (a write cut off,
    a file lost): it is moved to `workdir/damaged_checkpoints/<step>` (kept, never deleted) with a
    warning naming its step and path, and the run goes on from the older one. When no
    checkpoint restores, the cause is more likely the state layout (a changed config) than
    damage, so nothing is moved and the error lists what each step gave.

    Args:
      abstract_state: As for `restore`.

    Returns:
      `(state, meta, step)`, or None when there is no periodic checkpoint.

    Raises:
      ConfigError: No checkpoint restores.
    """
    self._periodic.wait_until_finished()
    steps = sorted(self._periodic.all_steps(), reverse=True)
    failed: list[tuple[int, Exception]] = []
    for step in steps:
      try:
        state, meta = self.restore(abstract_state, step)
      except Exception as e:  # noqa: BLE001 - Orbax and TensorStore raise many kinds on damage.
        failed.append((step, e))
        continue
      for bad, error in failed:
        self._set_aside(bad, error, step)
      if failed:
        self._periodic.reload()
      return state, meta, step
    if not failed:
      return None
    tried = "; ".join(f"step {s}: {_first_line(e)}" for s, e in failed)
    raise ConfigError(
      f"no checkpoint in {self.workdir}/{_CHECKPOINTS_DIR} restores into this run's state "
      f"(a changed config, or every checkpoint damaged): {tried}"
    )

  def _set_aside(self, step: int, error: Exception, fallback: int) -> None:
    source = os.path.join(self.workdir, _CHECKPOINTS_DIR, str(step))
    aside = os.path.join(self.workdir, DAMAGED_DIR, str(step))
    if jax.process_index() == 0:
      os.makedirs(os.path.dirname(aside), exist_ok=True)
      if os.path.exists(aside):
        aside = f"{aside}.{len(os.listdir(os.path.dirname(aside)))}"
      os.replace(source, aside)
    multihost_utils.sync_global_devices(f"checkpoint {step} set aside")
    logging.warning(
      "checkpoint step %d at %s does not restore (%s); moved it to %s and resumed from step %d",
      step,
      source,
      _first_line(error),
      aside,
      fallback,
    )

  def _pick(self, best: bool):
    if not best:
      return self._periodic
    if self._best is None:
      raise ConfigError("this Checkpointer was created with keep_best=False")
    return self._best

  @staticmethod
  def _save_args(state, meta: dict):
    return ocp.args.Composite(
      **{_STATE: ocp.args.StandardSave(state), _META: ocp.args.JsonSave(_to_json(meta))}
    )


# ------------------------------------------------------------------------------------------------
# Reading trained runs: the one reader every later stage, the export and the evaluation use.


@dataclasses.dataclass(frozen=True)
class StoredCheckpoint:
  """One saved checkpoint of a run, as `find_checkpoint` located it (no arrays read yet).

  Attributes:
    source: The path it was asked for (a workdir or an Orbax manager folder).
    directory: The Orbax manager folder holding it.
    kind: `"best"` or `"latest"` (the newest periodic checkpoint, or a step asked for).
    step: Its step.
    tree: The stored state's metadata tree (leaves carry `.shape` and `.dtype`).
    meta: Its JSON metadata (`{}` when it has none).
  """

  source: str
  directory: str
  kind: str
  step: int
  tree: Any
  meta: dict

  def describe(self) -> str:
    return f"{self.kind} checkpoint, step {self.step}"


def _read_manager(directory: str):
  options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
  # Named handlers: without them Orbax reports no metadata for the items.
  handlers = {_META: ocp.JsonCheckpointHandler(), _STATE: ocp.PyTreeCheckpointHandler()}
  return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def find_checkpoint(
  path: str | os.PathLike, *, best: bool = True, step: int | None = None, field: str = "path"
) -> StoredCheckpoint:
  """The checkpoint of a run to read: its best one (when `best` and it kept one), else its
  newest periodic one, or the periodic one at `step`.

  Args:
    path: A stage workdir (`best/` and/or `checkpoints/` inside), or an Orbax manager folder.
    best: Prefer the best checkpoint.
    step: A particular periodic step (then `best` is ignored).
    field: What to call `path` in errors, e.g. "config.tokenizer_from".

  Raises:
    FileNotFoundError: No such directory, or no checkpoint (at `step`) in it; names the folders
      looked in and the saved steps.
    ValueError: The checkpoint holds no state item.
  """
  source = os.path.abspath(os.path.expanduser(os.fspath(path)))
  if not os.path.isdir(source):
    raise MissingInputError(f"{field}={path}: no such directory")
  best_dir = os.path.join(source, _BEST_DIR)
  periodic_dir = os.path.join(source, _CHECKPOINTS_DIR)
  if os.path.isdir(best_dir) or os.path.isdir(periodic_dir):
    use_best = best and step is None
    candidates = ([("best", best_dir)] if use_best else []) + [("latest", periodic_dir)]
  else:
    candidates = [("latest", source)]
  seen = []
  for kind, directory in candidates:
    if not os.path.isdir(directory):
      continue
    with _read_manager(directory) as manager:
      steps = sorted(manager.all_steps())
      seen.append(f"{directory}: steps {steps}")
      if not steps or (step is not None and int(step) not in steps):
        continue
      found = steps[-1] if step is None else int(step)
      stored = manager.item_metadata(found)
      if _STATE not in stored.keys() or stored[_STATE] is None:
        raise ConfigError(f"{field}={path}: the checkpoint at {directory}/{found} has no 'state'")
      try:
        meta = manager.restore(found, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        meta = meta[_META]
      except (ValueError, KeyError, FileNotFoundError):
        meta = None
    return StoredCheckpoint(path, directory, kind, found, stored[_STATE].tree, dict(meta or {}))
  at = "" if step is None else f" at step {step}"
  looked = "; ".join(seen) or ", ".join(d for _, d in candidates)
  raise MissingInputError(f"{field}={path}: no checkpoint{at} (looked in {looked})")


def _path_str(path) -> str:
  parts = []
  for p in path:
    if isinstance(p, jax.tree_util.DictKey):
      parts.append(str(p.key))
    elif isinstance(p, jax.tree_util.SequenceKey):
      parts.append(str(p.idx))
    elif isinstance(p, jax.tree_util.GetAttrKey):
      parts.append(p.name)
    else:
      parts.append(str(p))
  return "/".join(parts)


def tree_shapes(tree) -> dict[str, tuple[int, ...]]:
  """`{"a/b/kernel": shape}` of every leaf (arrays, `ShapeDtypeStruct`s or Orbax metadata)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_path_str(path): tuple(getattr(x, "shape", np.shape(x))) for path, x in leaves}


def check_shapes(actual, expected, what: str) -> None:
  """Raises a ValueError naming the paths where `actual` and `expected` differ in shape."""
  got, want = tree_shapes(actual), tree_shapes(expected)
  problems = [f"{p} missing (expected {want[p]})" for p in want if p not in got]
  problems += [f"{p} unexpected (shape {got[p]})" for p in got if p not in want]
  problems += [
    f"{p} has shape {got[p]}, expected {want[p]}" for p in want if p in got and got[p] != want[p]
  ]
  if problems:
    shown = "; ".join(problems[:6])
    more = f"; and {len(problems) - 6} more" if len(problems) > 6 else ""
    raise ConfigError(f"{what}: {shown}{more}")


def _host_args(tree):
  return jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)


def restore_checkpoint(
  ckpt: StoredCheckpoint, abstract=None, *, to_host: bool = False, what: str = ""
):
  """Reads the arrays of a located checkpoint.

  Args:
    ckpt: From `find_checkpoint`.
    abstract: None reads the whole stored state as host numpy arrays, independent of how many
      devices wrote it (a typed PRNG key comes back as its raw uint32 data). A mapping of
      subtrees of the state (e.g. `{"params": ..., "vq_ema": ...}` out of a train state) reads
      only those, after checking their shapes against the stored ones: as `jax.Array`s laid out
      by the leaves' shardings (`jax.ShapeDtypeStruct(..., sharding=...)`), or as host numpy
      arrays with `to_host`.
    to_host: Read `abstract`'s leaves as host numpy arrays (ignoring any shardings).
    what: The start of the error message for a mismatch (default: names the checkpoint).

  Raises:
    ValueError: A requested subtree is missing or its shapes differ (names the leaf paths).
  """
  with _read_manager(ckpt.directory) as manager:
    if abstract is None:
      args = ocp.args.PyTreeRestore(restore_args=_host_args(ckpt.tree))
    else:
      what = what or f"{ckpt.source} ({ckpt.describe()})"
      stored = ckpt.tree
      missing = [k for k in abstract if not isinstance(stored, Mapping) or k not in stored]
      if missing:
        raise ConfigError(
          f"{what}: the checkpoint state at {ckpt.directory}/{ckpt.step} has no "
          f"{', '.join(map(repr, missing))}"
        )
      check_shapes({k: stored[k] for k in abstract}, abstract, what)
      restore_args = (
        _host_args(abstract) if to_host else ocp.checkpoint_utils.construct_restore_args(abstract)
      )
      args = ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args, partial_restore=True)
    return manager.restore(ckpt.step, args=ocp.args.Composite(**{_STATE: args}))[_STATE]


def load_params(
  path_or_workdir: str | os.PathLike,
  abstract_tree=None,
  *,
  best: bool = False,
  step: int | None = None,
  field: str = "path",
  what: str = "",
):
  """`restore_checkpoint(find_checkpoint(...))`: the stored tree of a run, e.g. for `init_from`.

  Args:
    path_or_workdir: A stage workdir, or the `checkpoints` / `best` folder inside one.
    abstract_tree: None (everything, host numpy) or the subtrees to read (see
      `restore_checkpoint`).
    best: Read the best checkpoint where the run kept one (else its newest periodic one).
    step: A particular periodic step instead of the newest.
    field: What to call the path in errors.
    what: The start of the error message for a shape mismatch.

  Raises:
    FileNotFoundError: If the folder holds no checkpoint (or none at `step`).
    ValueError: If the stored shapes do not match `abstract_tree`.
  """
  ckpt = find_checkpoint(path_or_workdir, best=best, step=step, field=field)
  return restore_checkpoint(ckpt, abstract_tree, what=what)


def existing_dir(value: str, field: str, hint: str) -> str:
  """`value` with `~` expanded, checked to be a directory.

  Raises:
    ValueError: If `value` is empty (the message says what the field wants: `hint`).
    FileNotFoundError: If it is not a directory.
  """
  if not value:
    raise ConfigError(f"{field} is empty: {hint}")
  path = os.path.expanduser(os.fspath(value))
  if not os.path.isdir(path):
    raise MissingInputError(f"{field}={value}: no such directory ({hint})")
  return path


def read_run_config(workdir: str | os.PathLike, *, required: bool = True) -> dict:
  """The `config.json` a stage wrote into its workdir, as a dict.

  Raises:
    FileNotFoundError: If there is none and `required` (otherwise `{}` is returned).
    ValueError: If it is not a JSON object.
  """
  path = os.path.join(os.fspath(workdir), "config.json")
  if not os.path.isfile(path):
    if not required:
      return {}
    raise MissingInputError(f"{workdir}: no config.json at {path} (a training workdir writes one)")
  try:
    with open(path, encoding="utf-8") as f:
      config = json.load(f)
  except json.JSONDecodeError as e:
    raise ConfigError(f"{path} is not valid JSON: {e}") from e
  if not isinstance(config, dict):
    raise ConfigError(f"{path}: expected a JSON object, got {type(config).__name__}")
  return config


def resolve_tokenizer_from(
  explicit: str | os.PathLike | None,
  run_config: Mapping[str, Any],
  run_meta: Mapping[str, Any] | None = None,
  *,
  where: str,
  flag: str = "tokenizer_from",
  how: str = "tokenizer_from",
) -> str:
  """The stage-1 workdir of a stage-2/3 run: `explicit` if given, else the one the run recorded.

  Args:
    explicit: An override (checked to be a directory); empty or None uses the recorded one.
    run_config: The run's `config.json` (its `tokenizer_from` is kept as given, relative to the
      training job's working directory).
    run_meta: The run's checkpoint metadata (its `tokenizer_from` is absolute).
    where: What recorded it (e.g. the path of the config.json), for errors.
    flag: The name of the override, for errors.
    how: How the user passes the override (e.g. a command-line flag), for errors.

  Raises:
    ValueError: Nothing given and nothing recorded.
    FileNotFoundError: The given or recorded folder does not exist.
  """
  if explicit:
    path = os.path.abspath(os.path.expanduser(os.fspath(explicit)))
    if not os.path.isdir(path):
      raise MissingInputError(f"{flag}={path}: no such directory (a stage-1 workdir)")
    return path
  recorded = [
    p for p in (run_config.get("tokenizer_from"), (run_meta or {}).get("tokenizer_from")) if p
  ]
  if not recorded:
    raise ConfigError(f"{where} records no tokenizer_from: pass the stage-1 workdir as {how}")
  tried = []
  for p in recorded:
    path = os.path.abspath(os.path.expanduser(p))
    if os.path.isdir(path):
      return path
    tried.append(path)
  raise MissingInputError(
    f"tokenizer workdir not found: {where} records tokenizer_from={recorded[0]!r} "
    f"(tried {', '.join(dict.fromkeys(tried))}); pass {how}"
  )
