"""Loop plumbing shared by the stage modules, as small functions (style.md §2 "Entry and stages").

- Logging: `MetricWriter` appends one JSON object per logged step to `workdir/metrics.jsonl` and
  writes `workdir/config.json` (big_vision's writer); `Progress` is a tqdm bar in terminals and
  notebooks and a line every minute in log files.
- Checks and measurements: `tree_norm` for the grad/param/update norms every log line carries,
  `check_finite` for the NaN abort, `StepTimer` and `periodic`.
- Start-up: `compile_train_step` compiles the jitted step ahead of time from abstract inputs,
  prints its memory per device (`step_memory`) and stops with `StepMemoryError` when it cannot
  fit, before any data is loaded; the compiled step is what the loop then runs.

Only process 0 writes files or draws the bar, so stage code calls these on every process alike.
The optimizer policy (schedules, AdamW groups, freezing) is in `nextaccel_jax.optim`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tensorboardX
import tqdm.auto
from absl import logging

from nextaccel_jax import ConfigError, checkpointing, sharding
from nextaccel_jax.data import pipeline


def _is_chief() -> bool:
  return jax.process_index() == 0


# ------------------------------------------------------------------------------------------------
# Metric files


def _json_scalar(name: str, value):
  """A metric value as a JSON-able Python scalar; numpy and JAX numbers become floats."""
  if value is None or isinstance(value, bool | int | float | str):
    return value
  arr = np.asarray(value)
  if arr.size != 1:
    raise ValueError(f"metric {name!r} must be a scalar, got shape {arr.shape}")
  if arr.dtype == np.bool_:
    return bool(arr.reshape(()))
  return float(arr.reshape(()))


class MetricWriter:
  """Appends metric lines `{"step": ..., "split": ..., **scalars}` to a JSONL file.

  Attributes:
    path: The metrics file.
    workdir: The folder of the metrics file and `config.json`.
  """

  def __init__(self, workdir, *, filename: str = "metrics.jsonl", tensorboard: bool = True):
    """Opens `workdir/filename` for appending, so a resumed job continues the same file.

    Args:
      workdir: Stage working directory; created if missing.
      filename: Name of the JSONL file.
      tensorboard: Also write TensorBoard event files into `workdir` (tags `<split>/<name>`),
        so `tensorboard --logdir <pipeline workdir>` shows every stage as a run.
    """
    self.workdir = os.fspath(workdir)
    self.path = os.path.join(self.workdir, filename)
    self._file = None
    self._tensorboard = tensorboard
    self._events = None
    self._purge_step = None
    if _is_chief():
      os.makedirs(self.workdir, exist_ok=True)
      self._file = open(self.path, "a", encoding="utf-8")

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def write(self, step: int, scalars: Mapping[str, object], split: str = "train") -> None:
    """Writes one line.

    Args:
      step: Training step the values belong to.
      scalars: Metric name to scalar (Python, numpy or JAX; None is written as null).
      split: `"train"`, `"validation"`, ...

    Raises:
      ValueError: If a value is not a scalar or a name is `step` or `split`.
    """
    clash = {"step", "split"} & set(scalars)
    if clash:
      raise ValueError(f"metric names {sorted(clash)} are reserved for the line itself")
    record = {"step": int(step), "split": str(split)}
    record.update({str(k): _json_scalar(str(k), v) for k, v in scalars.items()})
    if self._file is None:
      return
    self._file.write(json.dumps(record) + "\n")
    # A crashed job should still leave every line it logged.
    self._file.flush()
    if self._tensorboard:
      if self._events is None:
        # A resumed run purges the events past its restored step, as `drop_after` does here.
        # The suffix keeps a file of a run resumed within the same second from overwriting the
        # previous run's (the default name has one-second resolution).
        self._events = tensorboardX.SummaryWriter(
          self.workdir, purge_step=self._purge_step, filename_suffix=f".{time.time_ns()}"
        )
      for name, value in record.items():
        if name not in ("step", "split") and isinstance(value, int | float):
          self._events.add_scalar(f"{split}/{name}", value, int(step))

  def drop_after(self, step: int) -> int:
    """Removes the lines of steps after `step`, which a resumed run is about to log again.

    A job that stopped past its last checkpoint (killed, or resumed from an older checkpoint
    because the newest was damaged) has logged steps it will now repeat; without this they
    would appear twice. A line cut off mid-write goes too. Returns the number of lines removed.
    """
    if self._file is None:
      return 0
    self._purge_step = int(step) + 1 if step > 0 else None
    self._file.close()
    with open(self.path, encoding="utf-8") as f:
      lines = f.readlines()
    kept = []
    for line in lines:
      try:
        if int(json.loads(line)["step"]) <= step:
          kept.append(line if line.endswith("\n") else line + "\n")
      except (ValueError, KeyError, TypeError):
        continue
    if len(kept) != len(lines):
      tmp = self.path + ".tmp"
      with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
      os.replace(tmp, self.path)
    self._file = open(self.path, "a", encoding="utf-8")
    return len(lines) - len(kept)

  def write_config(self, config) -> None:
    """Writes `workdir/config.json` from a ConfigDict or a plain mapping."""
    if not _is_chief():
      return
    as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    with open(os.path.join(self.workdir, "config.json"), "w", encoding="utf-8") as f:
      json.dump(as_dict, f, indent=2, sort_keys=True, default=str)
      f.write("\n")

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._events is not None:
      self._events.close()
      self._events = None


# ------------------------------------------------------------------------------------------------
# Checks and measurements


def tree_norm(tree) -> jax.Array:
  """Global l2 norm of every leaf, accumulated in float32."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros((), jnp.float32)
  return jnp.sqrt(sum(jnp.sum(jnp.square(jnp.asarray(x, jnp.float32))) for x in leaves))


def apply_gradients(tx, params, opt_state, grads):
  """One optimizer update: `(params, opt_state, norms)`, where `norms` holds the gradient,
  parameter and update l2 norms every stage logs."""
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  norms = {
    "grad_norm": tree_norm(grads),
    "param_norm": tree_norm(params),
    "update_norm": tree_norm(updates),
  }
  return params, opt_state, norms


class NonFiniteLossError(RuntimeError):
  """A logged metric was NaN or infinite.

  Attributes:
    step: Training step at which it happened.
    names: Names of the non-finite metrics.
  """

  def __init__(self, step: int, names: Sequence[str], values: Mapping[str, object] | None = None):
    self.step = int(step)
    self.names = tuple(names)
    shown = ", ".join(f"{n}={(values or {}).get(n, 'non-finite')}" for n in self.names)
    super().__init__(f"non-finite metrics at step {self.step}: {shown}")


def check_finite(metrics: Mapping[str, object], step: int) -> None:
  """Raises if any numeric metric holds NaN or inf.

  Args:
    metrics: Metric name to value (scalars or arrays; non-numeric values are ignored). JAX
      arrays are fetched to the host, so call it where the loop synchronises anyway.
    step: Current training step, reported in the error.

  Raises:
    NonFiniteLossError: Naming the step and every non-finite metric.
  """
  bad, values = [], {}
  for name, value in metrics.items():
    if value is None or isinstance(value, str):
      continue
    arr = np.asarray(value)
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.integer):
      continue
    if not np.all(np.isfinite(arr)):
      bad.append(name)
      values[name] = arr.item() if arr.size == 1 else "array with non-finite entries"
  if bad:
    raise NonFiniteLossError(step, bad, values)


def periodic(step: int, every: int | None) -> bool:
  """Whether a periodic action is due at `step`, steps counted from 1.

  Args:
    step: The step that has just finished (1 for the first).
    every: Period in steps; None or <= 0 never fires.
  """
  if not every or every <= 0 or step <= 0:
    return False
  return step % every == 0


class StepTimer:
  """Seconds per training step, leaving out the first step (which includes compilation).

  Call `tick()` after each step once its results are on the host (for example after
  `jax.device_get` of the metrics); with asynchronous dispatch, earlier ticks would time the
  dispatch rather than the step. Call `skip()` after a pause such as evaluation or saving, so
  the next step does not count the pause.
  """

  def __init__(self, clock: Callable[[], float] = time.perf_counter):
    self._clock = clock
    self._ref: float | None = None
    self._seconds = 0.0
    self._steps = 0

  def tick(self) -> None:
    """Marks the end of one training step."""
    now = self._clock()
    if self._ref is not None:
      self._seconds += now - self._ref
      self._steps += 1
    self._ref = now

  def skip(self) -> None:
    """Excludes the time since the last tick from the measurement."""
    if self._ref is not None:
      self._ref = self._clock()

  @property
  def steps(self) -> int:
    """Steps measured so far."""
    return self._steps

  def seconds_per_step(self) -> float | None:
    """Mean seconds over the measured steps, or None before the second tick."""
    return self._seconds / self._steps if self._steps else None


def _in_notebook() -> bool:
  # A Jupyter or Colab kernel: stderr is no terminal there, yet a widget bar draws fine.
  shell = sys.modules.get("IPython")
  ip = shell.get_ipython() if shell is not None and hasattr(shell, "get_ipython") else None
  return ip is not None and "IPKernelApp" in getattr(ip, "config", {})


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
  """Progress of a stage over its steps, shown by process 0 in whatever the output is.

  A terminal or a notebook gets a tqdm bar (`tqdm.auto`: a widget in Jupyter and Colab).
  Anywhere else (a log file of a SLURM or TPU job, a pipe) a bar would be one endless line, so
  a line like

    aqvae 120/864 (14%) loss 0.1234 l1_loss 0.0959 | 0.82 steps/s, ETA 15m08s

  is written every `every_s` seconds and at the last step, as CLU's `ReportProgress` does.
  """

  def __init__(
    self,
    total: int,
    *,
    initial: int = 0,
    desc: str | None = None,
    enabled: bool | None = None,
    stream=None,
    mode: str | None = None,
    every_s: float = 60.0,
    clock: Callable[[], float] = time.perf_counter,
  ):
    """Creates the display.

    Args:
      total: Last step.
      initial: Step the run starts from (a resumed job).
      desc: Label in front of the bar or line.
      enabled: Force the display on or off; None shows it on process 0.
      stream: Where to write; stderr by default.
      mode: "bar" or "lines"; None picks the bar on a terminal or in a notebook.
      every_s: Seconds between progress lines in "lines" mode.
      clock: Time source (tests pass a fake one).
    """
    stream = sys.stderr if stream is None else stream
    self.enabled = _is_chief() if enabled is None else bool(enabled)
    if mode is None:
      tty = hasattr(stream, "isatty") and stream.isatty()
      mode = "bar" if tty or _in_notebook() else "lines"
    if mode not in ("bar", "lines"):
      raise ValueError(f"Progress mode must be 'bar' or 'lines', got {mode!r}")
    self.mode = mode
    self.total = int(total)
    self.desc = desc or "step"
    self._stream = stream
    self._every_s = float(every_s)
    self._clock = clock
    self._step = int(initial)
    self._start = (clock(), int(initial))
    self._last_line = clock()
    self._postfix: dict[str, str] = {}
    self._bar = None
    if mode == "bar":
      self._bar = tqdm.auto.tqdm(
        total=total,
        initial=initial,
        desc=desc,
        file=stream,
        disable=not self.enabled,
        dynamic_ncols=True,
      )

  def __enter__(self) -> Progress:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def update(self, step: int, **postfix) -> None:
    """Moves to `step` and shows `postfix` values (numbers to 4 significant digits)."""
    step = int(step)
    if postfix:
      self._postfix.update(
        {
          k: f"{float(v):.4g}" if isinstance(v, int | float | np.generic | jax.Array) else str(v)
          for k, v in postfix.items()
        }
      )
    previous, self._step = self._step, step
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.set_postfix(self._postfix, refresh=False)
      self._bar.update(step - previous)
      return
    now = self._clock()
    if step >= self.total or now - self._last_line >= self._every_s:
      self._last_line = now
      print(self.line(now), file=self._stream, flush=True)

  def line(self, now: float | None = None) -> str:
    """The progress line for the current step."""
    now = self._clock() if now is None else now
    t0, s0 = self._start
    done = max(self._step - s0, 0)
    rate = done / (now - t0) if now > t0 and done else None
    pct = 100.0 * self._step / self.total if self.total else 100.0
    text = f"{self.desc} {self._step}/{self.total} ({pct:.0f}%)"
    if self._postfix:
      text += " " + " ".join(f"{k} {v}" for k, v in self._postfix.items())
    if rate:
      eta = (self.total - self._step) / rate
      speed = f"{rate:.3g} steps/s" if rate >= 1 else f"{1 / rate:.3g} s/step"
      text += f" | {speed}, ETA {_duration(eta)}"
    return text

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()


# ------------------------------------------------------------------------------------------------
# Ahead-of-time compilation and memory

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class StepMemory:
  """Bytes per device of a compiled step, from XLA's buffer assignment.

  Donated arguments are counted once (`aliased` is what outputs reuse of the arguments).
  """

  arguments: int
  outputs: int
  aliased: int
  temporaries: int
  code: int = 0

  @property
  def total(self) -> int:
    return max(self.arguments + self.outputs - self.aliased + self.temporaries + self.code, 0)

  def __str__(self) -> str:
    return (
      f"{format_bytes(self.total)} (arguments {format_bytes(self.arguments)}, outputs "
      f"{format_bytes(self.outputs)}, donated {format_bytes(self.aliased)}, temporaries "
      f"{format_bytes(self.temporaries)})"
    )


def format_bytes(n: int) -> str:
  """`n` bytes in GiB from 1 GiB up, else in MiB."""
  return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def step_memory(compiled) -> StepMemory | None:
  """The memory of a `jax.stages.Compiled` per device, or None where XLA does not report it."""
  mem = compiled.memory_analysis()
  if mem is None:
    return None
  return StepMemory(
    arguments=int(mem.argument_size_in_bytes),
    outputs=int(mem.output_size_in_bytes),
    aliased=int(getattr(mem, "alias_size_in_bytes", 0)),
    temporaries=int(mem.temp_size_in_bytes),
    code=int(getattr(mem, "generated_code_size_in_bytes", 0)),
  )


def device_memory_limit() -> int | None:
  """Bytes one local device may allocate, where the runtime says (GPU, TPU); None on CPU."""
  stats = jax.local_devices()[0].memory_stats()
  return int(stats["bytes_limit"]) if stats and stats.get("bytes_limit") else None


class StepMemoryError(ConfigError):
  """The compiled train step needs more memory per device than the budget."""


def compile_train_step(jitted, args: Sequence, *, name: str, memory=None):
  """Compiles `jitted` for `args` ahead of time, prints its memory, checks that it fits.

  Args:
    jitted: A `jax.jit`-wrapped step.
    args: Its positional arguments: arrays or `jax.ShapeDtypeStruct`s with shardings (for the
      batch, `pipeline.train_batch_spec`), so nothing needs to be loaded yet.
    name: The stage, for the printed line and the error.
    memory: A config's `memory` section (`check`, `limit_gib`); None prints only.

  Returns:
    The `jax.stages.Compiled` step, called like `jitted` with arguments laid out like `args`.

  Raises:
    StepMemoryError: When `memory.check` is set and the step needs more than `memory.limit_gib`
      (or the device's own limit when that is 0).
  """
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  seconds = time.perf_counter() - start
  mem = step_memory(compiled)
  limit_gib = float(memory.get("limit_gib", 0.0)) if memory is not None else 0.0
  limit = int(limit_gib * GIB) if limit_gib > 0 else device_memory_limit()
  line = f"{name}: train step compiled in {seconds:.1f} s; "
  line += f"{mem} per device" if mem is not None else "XLA reports no memory analysis"
  line += f" of {format_bytes(limit)}" if limit else " (no device memory limit reported)"
  if _is_chief():
    print(line, flush=True)
  check = bool(memory.get("check", True)) if memory is not None else False
  if check and limit and mem is not None and mem.total > limit:
    raise StepMemoryError(
      f"{name}: the train step needs {format_bytes(mem.total)} per device but only "
      f"{format_bytes(limit)} are available (config.memory.limit_gib, 0 = the device's limit); "
      "lower config.data.batch_size, rematerialise (config.model.remat='full' or 'dots'), "
      "compute in bfloat16 (config.model.dtype) or shard the parameters over an fsdp mesh axis "
      "(--config.mesh=\"(('data', -1), ('fsdp', 8))\")"
    )
  return compiled


# ------------------------------------------------------------------------------------------------
# What a stage builds


@dataclasses.dataclass
class StageStep:
  """A stage's jitted steps laid out on a mesh, and the state they start from (`build_step`).

  `train_and_evaluate` and `testing.stage_step` both get their step from the stage's
  `build_step`, so tests and benchmarks time exactly what training runs.

  Attributes:
    state: The initial train state, laid out by `state_sharding`.
    state_sharding: Its shardings (the `config.sharding` rules).
    train: `(state, batch, *frozen) -> (state, metrics)`, jitted, the state donated.
    frozen: The frozen arguments after the batch, already on the mesh.
    schedule: Learning rate as a function of the 0-based step.
    tx: The optimizer.
    models: The modules the steps close over, by name ("model", "tokenizer", ...).
    evals: The stage's jitted evaluation functions by name.
  """

  state: Any
  state_sharding: Any
  train: Callable
  frozen: tuple
  schedule: Callable
  tx: Any
  models: dict
  evals: dict = dataclasses.field(default_factory=dict)

  def __call__(self, state, batch):
    return self.train(state, batch, *self.frozen)

  def compile(self, config: ml_collections.ConfigDict, mesh, name: str, num_coils: int = 0) -> None:
    """Replaces `train` by its ahead-of-time compiled form (`compile_train_step`) for the
    config's global batch (with `num_coils` coil maps when > 0), printing its memory and
    stopping when it cannot fit."""
    spec = pipeline.train_batch_spec(
      config.data.batch_size, config.data.image_size, mesh, num_coils
    )
    self.train = compile_train_step(
      self.train, (self.state, spec, *self.frozen), name=name, memory=config.get("memory")
    )


def schedule_length(config: ml_collections.ConfigDict, num_records: int) -> tuple[int, int]:
  """`(steps_per_epoch, total_steps)`: `config.num_train_steps`, else `num_epochs` epochs."""
  steps_per_epoch = max(1, num_records // config.data.batch_size)
  return steps_per_epoch, config.num_train_steps or config.num_epochs * steps_per_epoch


def checkpointer(
  config: ml_collections.ConfigDict, workdir, best_metric: str
) -> checkpointing.Checkpointer:
  """The stage's checkpoints: `config.ckpt.max_to_keep` periodic ones and the best by
  `best_metric` (higher is better)."""
  return checkpointing.Checkpointer(
    workdir,
    max_to_keep=config.ckpt.max_to_keep,
    keep_best=True,
    best_metric=best_metric,
    best_mode="max",
  )


def load_frozen_params(path: str, abstract, mesh, config, *, field: str, what: str, best=True):
  """The subtrees `abstract` of a trained run's checkpoint (best, else newest), laid out on the
  mesh by the config's rules for frozen trees; errors name `field` and say `what` must match."""
  try:
    return checkpointing.load_params(
      path,
      sharding.laid_out(abstract, mesh, config, prefix="frozen/"),
      best=best,
      field=field,
      what=f"{field}={path}: {what}",
    )
  except KeyError as e:
    raise ConfigError(f"{field}={path}: {what}: {e}") from e


# ------------------------------------------------------------------------------------------------
# The loop every stage runs


def train_loop(
  *,
  state,
  train_fn: Callable,
  evaluate_fn: Callable,
  loader,
  total_steps: int,
  schedule: Callable,
  ckpt,
  writer: MetricWriter,
  meta: dict,
  best_metric: str,
  log_every: int,
  eval_every: int,
  ckpt_every: int,
  max_steps_per_run: int = 0,
  desc: str = "train",
  postfix: Sequence[str] = ("loss",),
) -> tuple[object, dict]:
  """Runs steps `state.step + 1 … total_steps`, logging, evaluating and checkpointing.

  Args:
    state: The (already restored or initialised) train state; `state.step` is the last step.
    train_fn: `(state, batch) -> (state, metrics)`, the jitted step.
    evaluate_fn: `state -> dict of floats`, one validation pass.
    loader: An iterator of global batches (closed by the caller).
    total_steps: The schedule's length.
    schedule: Learning rate as a function of the 0-based step (logged as `lr`).
    ckpt: A `checkpointing.Checkpointer` with `keep_best`.
    writer: Where train and validation lines go.
    meta: JSON saved next to each checkpoint.
    best_metric: Validation key that picks the best checkpoint (higher is better).
    log_every, eval_every, ckpt_every: Periods in steps; the last step always does all three.
    max_steps_per_run: Stop after this many steps (0 = run to the end) so a time-limited job
      can end cleanly and resume in its next allocation.
    desc: Progress bar label.
    postfix: Train metrics shown on the progress bar.

  Returns:
    `(state, last validation metrics)` (empty when no evaluation ran).
  """
  start = int(state.step)
  stop = total_steps
  if max_steps_per_run:
    stop = min(total_steps, start + max_steps_per_run)
  timer = StepTimer()
  progress = Progress(total_steps, initial=start, desc=desc)
  last: dict = {}
  try:
    for step in range(start + 1, stop + 1):
      state, m = train_fn(state, next(loader))
      m = jax.device_get(m)
      check_finite(m, step)
      timer.tick()
      if periodic(step, log_every) or step == total_steps:
        m = {k: float(v) for k, v in m.items()}
        # The count as the optimizer passes it (int32), so the logged rate is the one applied.
        m["lr"] = float(schedule(jnp.asarray(step - 1, jnp.int32)))
        m["step_time_s"] = timer.seconds_per_step()
        if hasattr(loader, "sampler"):
          m["epoch"] = loader.sampler.epoch(step)
        writer.write(step, m, split="train")
        progress.update(step, **{k: m[k] for k in postfix if k in m})
      if periodic(step, ckpt_every) or step in (stop, total_steps):
        ckpt.save(step, state, meta=meta)
        timer.skip()
      if periodic(step, eval_every) or step == total_steps:
        last = evaluate_fn(state)
        writer.write(step, last, split="validation")
        ckpt.save_best(step, state, last[best_metric], meta=meta)
        timer.skip()
  except NonFiniteLossError:
    # The last good checkpoint stays on disk; say where it is before stopping.
    print(
      f"stopping: non-finite loss; last good checkpoint at step {ckpt.latest_step()}",
      file=sys.stderr,
    )
    raise
  finally:
    progress.close()
  return state, last


def loaders(
  config: ml_collections.ConfigDict,
  train_src,
  val_src,
  mesh,
  start_step: int,
  with_maps: bool = False,
):
  """The sharded train loader (resuming at `start_step`) and the fixed validation loader; both
  batches also carry the coil `maps` with `with_maps`."""
  train = pipeline.TrainLoader(
    train_src,
    global_batch_size=config.data.batch_size,
    mesh=mesh,
    seed=config.seed,
    start_step=start_step,
    single_coil=config.data.single_coil,
    keep_maps=with_maps,
  )
  val = pipeline.EvalLoader(
    val_src,
    global_batch_size=config.eval.batch_size,
    mesh=mesh,
    max_records=config.eval.max_records or None,
    with_maps=with_maps,
  )
  return train, val


def resume(ckpt: checkpointing.Checkpointer, state, workdir):
  """`(state, resumed)`: the workdir's newest checkpoint that restores (damaged newer ones are
  set aside, `Checkpointer.restore_newest_intact`), else `state` as is."""
  restored = ckpt.restore_newest_intact(checkpointing.abstract_like(state))
  if restored is None:
    return state, False
  state, _, start = restored
  logging.info("resumed from %s at step %d", workdir, start)
  return state, True


def run_stage(
  config: ml_collections.ConfigDict,
  workdir,
  *,
  step: StageStep,
  state,
  ckpt: checkpointing.Checkpointer,
  splits: tuple,
  mesh,
  evaluate: Callable,
  meta: dict,
  best_metric: str,
  desc: str,
  postfix: Sequence[str],
  summary: str,
  written_config: ml_collections.ConfigDict | None = None,
  with_maps: bool = False,
) -> dict:
  """The end of every training stage: `config.json`, the loaders, `train_loop` with the periods
  the config holds (`log_every`, `eval.every`, `ckpt.every`, `max_steps_per_run`).

  Args:
    config: The stage config.
    workdir: The stage's folder.
    step: From the stage's `build_step` (compiled).
    state: Where training continues (restored or initialised).
    ckpt: The stage's checkpointer.
    splits: `(train, validation)` sources.
    mesh: The device mesh.
    evaluate: `(state, validation loader) -> dict of floats`, one validation pass.
    meta: JSON saved next to each checkpoint.
    best_metric: Validation key that picks the best checkpoint (higher is better).
    desc: Progress label.
    postfix: Train metrics shown on the progress bar.
    summary: What the stage trains, for the log line (e.g. "student: 1,234 params").
    written_config: What `config.json` records, when it differs from `config`.
    with_maps: Batches carry the coil maps (`loaders`).

  Closes the loaders, checkpointer and writer whatever happens, and writes the last validation
  metrics to `workdir/final_metrics.json`. Returns those metrics (empty when none ran).
  """
  train_src, val_src = splits
  steps_per_epoch, total_steps = schedule_length(config, len(train_src))
  writer = MetricWriter(workdir)
  dropped = writer.drop_after(int(state.step))
  if dropped:
    logging.info("%s: dropped %d lines past step %d", writer.path, dropped, int(state.step))
  writer.write_config(config if written_config is None else written_config)
  logging.info(
    "%s, %d steps (%d per epoch), batch %d on %d devices",
    summary,
    total_steps,
    steps_per_epoch,
    config.data.batch_size,
    jax.device_count(),
  )
  loader, val_loader = loaders(config, train_src, val_src, mesh, int(state.step), with_maps)
  try:
    _, last = train_loop(
      state=state,
      train_fn=step,
      evaluate_fn=lambda s: evaluate(s, val_loader),
      loader=loader,
      total_steps=total_steps,
      schedule=step.schedule,
      ckpt=ckpt,
      writer=writer,
      meta=meta,
      best_metric=best_metric,
      log_every=config.log_every,
      eval_every=config.eval.every,
      ckpt_every=config.ckpt.every,
      max_steps_per_run=config.max_steps_per_run,
      desc=desc,
      postfix=postfix,
    )
  finally:
    loader.close()
    ckpt.close()
    writer.close()
  if last and _is_chief():
    path = os.path.join(os.fspath(workdir), "final_metrics.json")
    with open(path, "w", encoding="utf-8") as f:
      json.dump(last, f, indent=2)
    print(f"{desc}: {headline(last)} (all in {path})", flush=True)
  return last


def headline(metrics: Mapping[str, float]) -> str:
  """The metrics a reader looks at first, on one line: the overall ones, not those per mask
  family or per scale, nor the negated copies that pick the best checkpoint."""
  keys = [
    k for k in metrics if k.count("/") <= 1 and "/scale_" not in k and not k.startswith("neg_")
  ]
  return ", ".join(f"{k} {float(metrics[k]):.4g}" for k in keys)


# ------------------------------------------------------------------------------------------------
# Runs of several stages (the pipeline, the ablations)


def load_run_state(path: str | os.PathLike) -> dict:
  """The JSON record of a multi-stage run (`{"stages": {name: {"done", "wall_s", "config"}}}`),
  empty when the file does not exist yet."""
  path = os.fspath(path)
  if not os.path.exists(path):
    return {"stages": {}}
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ConfigError(f"{path}: not valid JSON ({e}); delete it to rerun every stage") from e


def write_run_state(path: str | os.PathLike, state: dict) -> None:
  """Writes the record atomically, so an interrupted write never leaves half a file."""
  path = os.fspath(path)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(json.dumps(state, indent=2, default=str))
  os.replace(tmp, path)
