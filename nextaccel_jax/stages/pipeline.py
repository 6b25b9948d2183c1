"""All stages in order with the paths between them wired up (`configs/pipeline.py`, `demo.py`).

Layout of the workdir:

  tensorflow_datasets/   the built dataset (unless config.data_dir or $TFDS_DATA_DIR is set)
  data/ aqvae/ student/ teacher/ distill/ unet/ export/ evaluate/   one folder per stage
  pipeline.json          per stage: done, wall time, the config it ran with
  pipeline.md            the wall-time table, the U-Net's budget and where the report is

The U-Net baseline (`unet/`) trains on the same data for a fixed number of steps and is a row of
the report; its wall time is reported next to stage 1 + student's, its budget.

A finished stage is skipped on the next run; an interrupted one resumes from its checkpoints. A
finished stage whose config has since changed is refused rather than silently reused.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import time

import ml_collections
from absl import logging

from nextaccel_jax import export
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
    raise ValueError(f"config.steps: unknown step(s) {unknown}; choose from {STEPS}")
  configs = stage_configs(config, root)
  state_path = root / _STATE_FILE
  state = common.load_run_state(state_path)
  result: dict = {}
  for name in config.steps:
    cfg = configs[name].to_dict()
    record = state["stages"].get(name, {})
    if record.get("done"):
      if json.loads(json.dumps(cfg, default=str)) != record.get("config"):
        raise ValueError(
          f"{root / name} finished with a different config than config.{name} now gives; "
          f"use a new --workdir, or delete {root / name} and its entry in {state_path} to redo it"
        )
      print(f"[pipeline] {name}: done before ({record['wall_s'] / 60:.1f} min), skipped")
      continue
    print(f"[pipeline] {name} → {root / name}", flush=True)
    start = time.perf_counter()
    fn = _stage_fn(name)
    if name == "evaluate":
      fn = functools.partial(fn, header_notes=budget_notes(state))
    out = fn(configs[name], os.fspath(root / name))
    wall = float(record.get("wall_s", 0.0)) + time.perf_counter() - start
    state["stages"][name] = {"done": True, "wall_s": wall, "config": cfg}
    common.write_run_state(state_path, state)
    logging.info("pipeline: %s finished in %.1f min", name, wall / 60)
    print(f"[pipeline] {name}: finished in {wall / 60:.1f} min", flush=True)
    if name == "evaluate":
      result = out
  summary = _summary(state, root)
  (root / "pipeline.md").write_text(summary)
  print(summary)
  report = root / "evaluate" / "report.md"
  if report.exists():
    print(report.read_text())
  return result
