"""All stages in order with the paths between them wired up (`configs/pipeline.py`, `demo.py`).

Layout of the workdir:

  tensorflow_datasets/   the built dataset (unless config.data_dir or $TFDS_DATA_DIR is set)
  data/ aqvae/ student/ teacher/ distill/ unet/ export/ evaluate/   one folder per stage
  pipeline.json          per stage: done, wall time, the config it ran with
  pipeline.md            the wall-time table, the U-Net's budget and where the report is

The U-Net baseline (`unet/`) trains on the same data for a fixed number of steps and is a row of
the report; its wall time is reported next to stage 1 + student's, its budget.

A finished stage is skipped on the next run; an interrupted one resumes from its checkpoints. When
the config of a finished stage has since changed, the run names the fields (`plan_reruns`): fields
that only change how a run is logged, checkpointed or validated (`RUN_ONLY_FIELDS`) keep the
stage; any other change trains the stage again, and every stage built on it, after moving the
previous folders aside to `<stage>.before-<time>` (kept, never deleted).
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import time

import ml_collections

from nextaccel_jax import ConfigError, export
from nextaccel_jax.stages import (
  baseline,
  common,
  evaluate,
  stage1_aqvae,
  stage2_transformer,
  stage3_distill,
)
from nextaccel_jax.stages import data as data_stage

STEPS = ("data", "aqvae", "student", "teacher", "distill", "unet", "export", "evaluate")
# The U-Net baseline may train for at most the wall time of these steps together (it gets a fixed
# step count per preset; pipeline.md and the report's header give both times).
BUDGET_STEPS = ("aqvae", "student")
_STATE_FILE = "pipeline.json"


# Stage config fields that change how a run is logged, checkpointed, resumed or validated, not
# the weights it trains (dotted prefixes of the flattened config). A finished training stage whose
# config differs only in these is kept; the evaluation is cheap and re-runs on any change.
RUN_ONLY_FIELDS = (
  "log_every",
  "ckpt.",
  "max_steps_per_run",
  "memory.",
  "eval.every",
  "eval.batch_size",
  "eval.max_records",
  "eval.lpips_nets",
  "data.num_workers",
  "data.build",
)


def depends_on(config: ml_collections.ConfigDict) -> dict[str, tuple[str, ...]]:
  """The steps each step reads the results of (what `stage_configs` wires between them)."""
  return {
    "data": (),
    "aqvae": ("data",),
    "student": ("data", "aqvae"),
    "teacher": ("data", "aqvae") + (("student",) if config.teacher_from_student else ()),
    "distill": ("data", "aqvae", "student", "teacher"),
    "unet": ("data",),
    "export": ("aqvae", "distill"),
    "evaluate": ("data", "aqvae", "student", "export", "unet"),
  }


def _flat(tree, prefix: str = "") -> dict:
  if not isinstance(tree, dict):
    return {prefix.rstrip("."): tree}
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, f"{prefix}{k}."))
  return out


def changed_fields(old: dict, new: dict) -> dict[str, tuple]:
  """`{field: (old, new)}` of the dotted fields that differ (a missing one is None)."""
  a, b = _flat(old or {}), _flat(new)
  return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


def trains_differently(step: str, field: str) -> bool:
  """Whether a change of `field` in the config of `step` changes what the step produces."""
  return step == "evaluate" or not any(
    field == f.rstrip(".") or (f.endswith(".") and field.startswith(f)) for f in RUN_ONLY_FIELDS
  )


def plan_reruns(state: dict, configs: dict[str, dict], depends: dict, steps) -> tuple[dict, dict]:
  """Which finished steps to run again, and which to keep with their record updated.

  Args:
    state: The `pipeline.json` record.
    configs: Each step's config as it would run now (plain dicts, as recorded).
    depends: `depends_on(config)`.
    steps: The steps of this run, in order.

  Returns:
    `(redo, keep)`: `redo` maps a finished step to why it runs again (its changed fields, or the
    earlier step it builds on that runs again); `keep` maps a finished step whose config changed
    only in `RUN_ONLY_FIELDS` to those fields.
  """
  redo: dict[str, str] = {}
  keep: dict[str, dict] = {}
  for name in steps:
    record = state["stages"].get(name, {})
    if not record.get("done"):
      continue
    changed = changed_fields(record.get("config"), configs[name])
    matters = {f: v for f, v in changed.items() if trains_differently(name, f)}
    upstream = [d for d in depends[name] if d in redo]
    if matters:
      redo[name] = ", ".join(f"config.{name}.{f}: {v[0]!r} → {v[1]!r}" for f, v in matters.items())
    elif upstream:
      redo[name] = f"it builds on {', '.join(upstream)}, which runs again"
    elif changed:
      keep[name] = changed
  return redo, keep


def _set_aside(folder: pathlib.Path) -> pathlib.Path | None:
  if not folder.exists():
    return None
  aside = folder.with_name(f"{folder.name}.before-{time.strftime('%Y%m%d-%H%M%S')}")
  n = 1
  while aside.exists():
    aside = folder.with_name(f"{folder.name}.before-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
    n += 1
  folder.rename(aside)
  return aside


def _copy(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(config.to_dict())


def stage_configs(config: ml_collections.ConfigDict, workdir) -> dict:
  """Each step's config with the shared data dir and the previous stages' workdirs filled in."""
  root = pathlib.Path(workdir).absolute()
  data_dir = (
    os.path.expanduser(config.data_dir)
    if config.data_dir
    else data_stage.data_dir_for(config.data, root)
  )
  d = lambda name: os.fspath(root / name)
  out = {}
  for name in ("data", "aqvae", "student", "teacher", "distill", "unet", "evaluate"):
    c = _copy(config[name])
    c.data.data_dir = data_dir
    if "seed" in c:
      c.seed = config.seed
    out[name] = c
  # Only the pipeline's first stage builds; a later stage finding no dataset is a real error.
  for name in ("aqvae", "student", "teacher", "distill", "unet", "evaluate"):
    out[name].data.build = False
  for name in ("student", "teacher", "distill"):
    out[name].tokenizer_from = d("aqvae")
  if config.teacher_from_student:
    out["teacher"].init_from = d("student")
  out["distill"].init_from = d("student")
  out["distill"].teacher_from = d("teacher")
  out["export"] = ml_collections.ConfigDict(
    {"transformer_from": d("distill"), "tokenizer_from": d("aqvae"), "best": config.export.best}
  )
  ev = out["evaluate"]
  ev.tokenizer_from = d("aqvae")
  ev.models = ml_collections.ConfigDict({"base": d("student"), "distilled": d("export")})
  if "unet" in config.steps:
    ev.models.unet = d("unet")
  return out


def _run_export(config: ml_collections.ConfigDict, workdir) -> dict:
  # A re-run replaces a half-written export from an interrupted one.
  path = export.export_from_workdirs(
    os.fspath(workdir),
    transformer_from=config.transformer_from,
    tokenizer_from=config.tokenizer_from,
    best=config.best,
    overwrite=True,
  )
  return {"export": path}


def _stage_fn(name: str):
  return {
    "data": data_stage.run,
    "aqvae": stage1_aqvae.train_and_evaluate,
    "student": stage2_transformer.train_and_evaluate,
    "teacher": stage2_transformer.train_and_evaluate,
    "distill": stage3_distill.train_and_evaluate,
    "unet": baseline.train_and_evaluate,
    "export": _run_export,
    "evaluate": evaluate.run,
  }[name]


def budget_notes(state: dict) -> dict[str, str]:
  """`{"<baseline> budget": text}`: each finished baseline's wall time next to that of the
  `BUDGET_STEPS` together, as `pipeline.json` records them (empty until both are known)."""
  walls = {n: float(s["wall_s"]) for n, s in state["stages"].items() if s.get("done")}
  if not all(n in walls for n in BUDGET_STEPS):
    return {}
  budget = sum(walls[n] for n in BUDGET_STEPS)
  out = {}
  for name in ("unet",):
    if name in walls:
      verdict = "within" if walls[name] <= budget else "over"
      out[f"{name} budget"] = (
        f"{walls[name] / 60:.1f} min of training against {budget / 60:.1f} min for "
        f"{' + '.join(BUDGET_STEPS)} ({verdict} budget; wall times from pipeline.json)"
      )
  return out


def _summary(state: dict, root: pathlib.Path) -> str:
  lines = ["# Pipeline", "", "| stage | wall time | status |", "|---|---|---|"]
  total = 0.0
  for name, s in state["stages"].items():
    wall = float(s.get("wall_s", 0.0))
    total += wall
    lines.append(f"| {name} | {wall / 60:.1f} min | {'done' if s.get('done') else 'incomplete'} |")
  lines.append(f"| **all** | **{total / 60:.1f} min** | |")
  budget = budget_notes(state)
  if budget:
    lines.append("")
    lines += [f"- {k}: {v}" for k, v in budget.items()]
  report = root / "evaluate" / "report.md"
  if report.exists():
    lines += ["", f"Report: `{report}`"]
  return "\n".join(lines) + "\n"


def run(config: ml_collections.ConfigDict, workdir) -> dict:
  """Runs `config.steps` in order; returns the evaluation metrics when the last step ran."""
  root = pathlib.Path(workdir).absolute()
  root.mkdir(parents=True, exist_ok=True)
  unknown = [s for s in config.steps if s not in STEPS]
  if unknown:
    raise ConfigError(f"config.steps: unknown step(s) {unknown}; choose from {STEPS}")
  configs = stage_configs(config, root)
  state_path = root / _STATE_FILE
  state = common.load_run_state(state_path)
  result: dict = {}
  as_recorded = {n: json.loads(json.dumps(configs[n].to_dict(), default=str)) for n in configs}
  redo, keep = plan_reruns(state, as_recorded, depends_on(config), config.steps)
  for name, fields in keep.items():
    listed = ", ".join(f"{f} ({a!r} → {b!r})" for f, (a, b) in fields.items())
    print(f"[pipeline] {name}: kept; only run settings changed: {listed}")
    state["stages"][name]["config"] = as_recorded[name]
  for name, why in redo.items():
    aside = _set_aside(root / name)
    kept = f"; the previous run is in {aside}" if aside else ""
    print(f"[pipeline] {name}: runs again ({why}){kept}")
    del state["stages"][name]
  if keep or redo:
    common.write_run_state(state_path, state)
  begun = time.perf_counter()
  for k, name in enumerate(config.steps, 1):
    tag = f"[pipeline {k}/{len(config.steps)}]"
    cfg = as_recorded[name]
    record = state["stages"].get(name, {})
    if record.get("done"):
      print(f"{tag} {name}: done before ({record['wall_s'] / 60:.1f} min), skipped")
      continue
    so_far = (time.perf_counter() - begun) / 60
    print(f"{tag} {name} → {root / name} ({so_far:.1f} min into this run)", flush=True)
    start = time.perf_counter()
    fn = _stage_fn(name)
    if name == "evaluate":
      fn = functools.partial(fn, header_notes=budget_notes(state))
    out = fn(configs[name], os.fspath(root / name))
    wall = float(record.get("wall_s", 0.0)) + time.perf_counter() - start
    state["stages"][name] = {"done": True, "wall_s": wall, "config": cfg}
    common.write_run_state(state_path, state)
    print(f"{tag} {name}: finished in {wall / 60:.1f} min", flush=True)
    if name == "evaluate":
      result = out
  summary = _summary(state, root)
  (root / "pipeline.md").write_text(summary)
  # The summary ends with the report's path; the report itself (tables per family, protocol
  # and model, figures) is read in a Markdown viewer, not scrolled past in a console.
  print(summary)
  return result
