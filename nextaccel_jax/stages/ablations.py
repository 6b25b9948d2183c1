"""The paper's component ablations (Table 4): stage-2 variants from one stage-1 run, evaluated
alike and reported in the table's layout (`configs/ablations.py`).

  python -m nextaccel_jax.main --config=configs/ablations.py:demo --workdir=runs/ablations \
      --config.tokenizer_from=runs/demo/aqvae

Layout of the workdir:

  aqvae/                  the stage-1 run, only when config.tokenizer_from is empty
  train/<variant>/        one stage-2 student per entry of config.variants
  evaluate/<variant>/     its evaluation (the evaluate stage: report.md, per_slice.csv, ...)
  ablations.json          per step: done, wall time, the config it ran with
  report.md               Table 4: rows = variants, a column group per mask family
  metrics.json            the evaluations' flat metrics, merged

Every variant is `config.student` with its overrides and reads the same tokenizer, dataset and
split, so the rows differ only in the transformer. As in the paper, every component ablation is
decoded by argmax, the base model's deterministic decoding; the reference variant is also
decoded by sampling (`config.reference_decodings`, the seed fixed per batch), the table's
"Base (Multinomial Sampling)" and "Base (Top-p, Top-k)" rows.

A finished step is skipped on the next run and an interrupted training resumes from its own
checkpoints; a finished step whose config has since changed is refused rather than reused.
"""

from __future__ import annotations

import json
import os
import pathlib
import time

import ml_collections
from absl import logging
from flax import traverse_util

from nextaccel_jax import ConfigError, checkpointing
from nextaccel_jax.evaluation import report
from nextaccel_jax.models import fields as fields_lib
from nextaccel_jax.models import transformer as transformer_lib
from nextaccel_jax.stages import common, evaluate, stage1_aqvae, stage2_transformer
from nextaccel_jax.stages import data as data_stage

STATE_FILE = "ablations.json"
# Row labels as the paper prints them; other variants show their name.
VARIANT_LABELS = {
  "base": "Base",
  "no_cross_attention": "w/o Cross-Attention",
  "no_token_hierarchy": "w/o Token Hierarchy",
  "frozen_encoder": "w/o Trainable Encoder",
}
DECODING_LABELS = {
  "argmax": "Argmax Decoding",
  "multinomial": "Multinomial Sampling",
  "top_k": "Top-k = {k}",
  "top_p": "Top-p = {p}",
  "top_k_top_p": "Top-p = {p}, Top-k = {k}",
}


def _copy(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(config.to_dict())


# ------------------------------------------------------------------------------------------------
# Settings


def variant_names(config: ml_collections.ConfigDict) -> list[str]:
  """`config.variants` in order, checked: the reference among them, names usable as rows."""
  names = list(config.variants.keys())
  if config.reference not in names:
    raise ConfigError(
      f"config.reference={config.reference!r} is not one of config.variants ({', '.join(names)})"
    )
  for name in names:
    if "/" in name or name == report.ZERO_FILLED:
      raise ConfigError(
        f"config.variants.{name}: a variant name must not hold '/' or be {report.ZERO_FILLED!r}"
      )
  return names


def variant_config(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """`config.student` with `config.variants[name]` on top.

  Every override must name a field of `config.student`, or under `model.` a field of the
  transformer (`NextAccelTransformer`), so a typo stops the run before anything trains.
  """
  out = _copy(config.student)
  overrides = config.variants[name].to_dict()
  known = set(traverse_util.flatten_dict(out.to_dict(), sep="."))
  known |= {f"model.{f}" for f in fields_lib.field_names(transformer_lib.NextAccelTransformer)}
  for key in traverse_util.flatten_dict(overrides, sep="."):
    if key not in known:
      raise ConfigError(
        f"config.variants.{name}.{key}: neither config.student nor the transformer has a field "
        f"{key} to override"
      )
  out.update(overrides)
  if out.model.role != "student":
    raise ConfigError(f"config.variants.{name}: the ablations train students, not {out.model.role}")
  return out


def tokenizer_dir(config: ml_collections.ConfigDict, root: pathlib.Path) -> str:
  """The stage-1 workdir every variant reads: `config.tokenizer_from`, else `<workdir>/aqvae`."""
  if not config.tokenizer_from:
    return os.fspath(root / "aqvae")
  path = checkpointing.existing_dir(
    config.tokenizer_from,
    "config.tokenizer_from",
    "point it at a stage-1 workdir, e.g. runs/demo/aqvae, or leave it empty to train one",
  )
  return os.path.abspath(path)


def shared_data_dir(config: ml_collections.ConfigDict, root: pathlib.Path, tok_dir: str) -> str:
  """`config.data_dir`; else the dir the `tokenizer_from` run read, while it exists (so its
  dataset is not built again); else `$TFDS_DATA_DIR` or `<workdir>/tensorflow_datasets`."""
  if config.data_dir:
    return os.path.abspath(os.path.expanduser(config.data_dir))
  if config.tokenizer_from:
    run = checkpointing.read_run_config(tok_dir, required=False) or {}
    given = (run.get("data") or {}).get("data_dir", "")
    # Resolved the way the stage-1 run resolved it.
    candidate = data_stage.data_dir_for(
      ml_collections.ConfigDict({"data": {"data_dir": given}}), tok_dir
    )
    if os.path.isdir(candidate):
      return os.path.abspath(candidate)
  return os.path.abspath(data_stage.data_dir_for(config.student, root))


def stage_configs(config: ml_collections.ConfigDict, workdir) -> dict:
  """Each step's config, in running order: `aqvae` (without `tokenizer_from`), then per variant
  `train/<variant>` and `evaluate/<variant>`."""
  root = pathlib.Path(workdir).absolute()
  names = variant_names(config)
  tok_dir = tokenizer_dir(config, root)
  data_dir = shared_data_dir(config, root, tok_dir)
  out = {}
  if not config.tokenizer_from:
    out["aqvae"] = _copy(config.aqvae)
  for name in names:
    train = variant_config(config, name)
    train.tokenizer_from = tok_dir
    out[f"train/{name}"] = train
    ev = _copy(config.evaluate)
    ev.tokenizer_from = tok_dir
    ev.models = ml_collections.ConfigDict({name: os.fspath(root / "train" / name)}, sort_keys=False)
    extra = tuple(config.reference_decodings) if name == config.reference else ()
    ev.decoding = ("argmax", *extra)
    out[f"evaluate/{name}"] = ev
  # Only the first step builds the dataset; a later one finding none is a real error.
  for i, c in enumerate(out.values()):
    c.data.data_dir = data_dir
    c.data.build = bool(c.data.build) and i == 0
  return out


def stage_function(name: str):
  """What runs step `name`: `(config, workdir) -> metrics`."""
  kind = name.split("/")[0]
  return {
    "aqvae": stage1_aqvae.train_and_evaluate,
    "train": stage2_transformer.train_and_evaluate,
    "evaluate": evaluate.run,
  }[kind]


# ------------------------------------------------------------------------------------------------
# The table


def table_rows(config: ml_collections.ConfigDict) -> list[tuple[str, str]]:
  """`(row name, label)` in the paper's order: every other variant (argmax), then the reference
  with each sampled decoding, the reference's argmax last."""
  names = variant_names(config)
  ref = config.reference
  s = config.evaluate.sampling

  def label(name: str, decoding: str) -> str:
    text = DECODING_LABELS.get(decoding, decoding).format(k=s.top_k, p=f"{s.top_p:g}")
    return f"{VARIANT_LABELS.get(name, name)} ({text})"

  rows = [(report.row_name(n, "argmax"), VARIANT_LABELS.get(n, n)) for n in names if n != ref]
  rows += [(report.row_name(ref, d), label(ref, d)) for d in config.reference_decodings]
  rows.append((report.row_name(ref, "argmax"), label(ref, "argmax")))
  return rows


def render(config: ml_collections.ConfigDict, metrics: dict, header: dict) -> str:
  """`report.md`: the header lines and one Table-4 table per metric protocol."""
  ev = config.evaluate
  metric_names = ("psnr", "ssim") + tuple(f"lpips_{n}" for n in ev.lpips_nets[:1])
  rows = table_rows(config)
  lines = ["# Ablations (paper Table 4)", ""]
  lines += [f"- **{k}**: {v}" for k, v in header.items()]
  lines += [
    "",
    "Means over all contrasts per mask family at R = 32 (the `paper` protocol scores slices, "
    "`fastmri` volumes); best value per column in bold.",
  ]
  for protocol in ev.protocols:
    lines += ["", f"## Protocol `{protocol}`", ""]
    lines.append(
      report.ablation_table(
        metrics,
        [r for r, _ in rows],
        [label for _, label in rows],
        tuple(ev.families),
        protocol,
        metric_names,
      )
    )
  return "\n".join(lines) + "\n"


def _header(config, configs: dict, root: pathlib.Path, metrics: dict) -> dict:
  names = variant_names(config)
  ev = config.evaluate
  ref_row = report.row_name(config.reference, "argmax")
  counts = {f: metrics.get(f"{ref_row}/{f}/paper/n") for f in ev.families}
  counts = {f: n for f, n in counts.items() if n is not None}
  first = configs[f"evaluate/{names[0]}"]
  s = ev.sampling
  return {
    "Tokenizer": f"`{first.tokenizer_from}` (one stage-1 run for every row)",
    "Dataset": f"{data_stage.dataset_name(first)} (`{first.data.data_dir}`), split "
    f"`{ev.split}`, slices per family: "
    + (", ".join(f"{f} {int(n)}" for f, n in counts.items()) or "–"),
    "Variants": "; ".join(f"{n} ← `{root / 'train' / n}`" for n in names),
    "Decoding": f"argmax for every variant; {config.reference} also "
    + ", ".join(config.reference_decodings)
    + f" (T = {s.temperature:g}, k = {s.top_k}, p = {s.top_p:g}, seed {ev.seed} per batch)",
  }


# ------------------------------------------------------------------------------------------------
# Stage


def run(config: ml_collections.ConfigDict, workdir) -> dict:
  """Runs every step not yet done, writes `report.md` and `metrics.json`; returns the merged
  evaluation metrics (keys like `no_token_hierarchy/argmax/radial/paper/ssim`)."""
  root = pathlib.Path(workdir).absolute()
  root.mkdir(parents=True, exist_ok=True)
  configs = stage_configs(config, root)
  state_path = root / STATE_FILE
  state = common.load_run_state(state_path)
  for name, cfg in configs.items():
    recorded = json.loads(json.dumps(cfg.to_dict(), default=str))
    record = state["stages"].get(name, {})
    if record.get("done"):
      if recorded != record.get("config"):
        raise ConfigError(
          f"{root / name} finished with a different config than it would get now; use a new "
          f"--workdir, or delete {root / name} and its entry in {state_path} to redo it"
        )
      print(f"[ablations] {name}: done before ({record['wall_s'] / 60:.1f} min), skipped")
      continue
    print(f"[ablations] {name} → {root / name}", flush=True)
    start = time.perf_counter()
    stage_function(name)(cfg, os.fspath(root / name))
    wall = float(record.get("wall_s", 0.0)) + time.perf_counter() - start
    state["stages"][name] = {"done": True, "wall_s": wall, "config": recorded}
    common.write_run_state(state_path, state)
    logging.info("ablations: %s finished in %.1f min", name, wall / 60)

  metrics: dict = {}
  for name in variant_names(config):
    path = root / "evaluate" / name / "metrics.json"
    metrics.update(json.loads(path.read_text()))
  text = render(config, metrics, _header(config, configs, root, metrics))
  (root / "report.md").write_text(text)
  (root / "metrics.json").write_text(json.dumps(metrics, indent=2))
  print(text)
  return metrics


train_and_evaluate = run
