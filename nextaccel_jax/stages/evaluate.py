"""The evaluation stage: trained models against the zero-filled baseline at R = 32.

Design: decisions.md §7.

  python -m nextaccel_jax.main --config=configs/eval.py:demo --workdir=runs/eval \
      --config.models.base=runs/student --config.models.distilled=runs/distill

Every model of `config.models` (a stage-2/3 workdir or an export folder, see
`export.load_reconstructor`) reconstructs every slice of `config.split` from its R = 32 image
under each mask family and each decoding variant (argmax, or sampling with a seed fixed per
batch). A U-Net or E2E-VarNet baseline workdir (`stages/baseline.py`) is a row too: one forward
pass per batch (E2E-VarNet reads the measured R = 32 k-space, formed from the batch's maps as in
training), no decoding variants. The
magnitudes are scored against the fully sampled level with PSNR, SSIM, NMSE, LPIPS and DISTS
(`config.dists`, when dists-pytorch is installed) under the `paper` protocol (per slice) and the
`fastmri` protocol (per volume, grouped by `file_name`). The zero-filled R = 32 image is the
baseline row.

The loader visits each family's records sorted by (file_name, slice_index), so a volume's slices
arrive together and are scored as soon as the last one is in; only the open volumes and the
figure slices stay in host memory.

Writes into the workdir: `report.md` (which row wins each metric per family and protocol, then
tables per protocol × family like the paper's, then links to the figures) and `report.html` (the
same page with the figures embedded), `per_slice.csv`, `metrics.json` and `final_metrics.json`
(the flat metrics; the second marks the stage as complete), and under `figures/`:
`<family>.png` (every model's reconstruction and error map beside the R = 32 input and mask),
`<family>_<model>_levels.png` (a token model's cumulative per-scale decodings) and
`<family>_<model>_diagnostics.png` (its decodes of ever less true information). The figure
slices are `figure_records`: spread over the split's contrasts and volumes.
"""

from __future__ import annotations

import json
import os
import pathlib
import time
from collections.abc import Mapping, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging

from nextaccel_jax import ConfigError, export, inference, losses, sharding
from nextaccel_jax.data import fastmri, masks, pipeline
from nextaccel_jax.evaluation import curves, dists_metric, evaluators, lpips_metric, report
from nextaccel_jax.evaluation import metrics as np_metrics
from nextaccel_jax.models import transformer as transformer_lib
from nextaccel_jax.stages import common
from nextaccel_jax.stages import data as data_stage

# "top_k_top_p" keeps a token only if it passes both filters (the paper's top-p 0.96 + top-k 900).
DECODINGS = ("argmax", "multinomial", "top_k", "top_p", "top_k_top_p")
# Rows of a model with its measured R = 32 samples enforced (config.data_consistency).
DC_SUFFIX = "+DC"
LEVEL_NAMES = ("Q32", "+Q16", "+Q8", "+Q4", "+Q2", "+QFS")
# The scales a transformer predicts (Q32 is given).
SCALE_NAMES = ("Q16", "Q8", "Q4", "Q2", "QFS")


# ------------------------------------------------------------------------------------------------
# Models and settings


def model_sources(config: ml_collections.ConfigDict) -> list[tuple[str, str]]:
  """The non-empty `(name, source)` entries of `config.models`, in order."""
  models = config.get("models")
  if models is None:
    raise ConfigError("config.models is missing: name → workdir or export folder")
  out = []
  for name, source in models.items():
    if not isinstance(source, str):
      raise ConfigError(f"config.models.{name} must be a path string, got {source!r}")
    if name == report.ZERO_FILLED or "/" in name:
      raise ConfigError(
        f"config.models.{name}: the name must not be {report.ZERO_FILLED!r} or hold '/'"
      )
    if source:
      out.append((name, source))
  if not out:
    names = ", ".join(f"config.models.{n}" for n in models.keys()) or "config.models.<name>"
    raise ConfigError(
      f"config.models has no model to evaluate: set at least one of {names} to a stage-2/3 "
      "workdir or export folder, e.g. --config.models.base=runs/student"
    )
  return out


def sampling_variants(
  config: ml_collections.ConfigDict,
) -> list[tuple[str, inference.SamplingConfig]]:
  """`(name, SamplingConfig)` of each entry of `config.decoding`."""
  decoding = config.decoding
  names = (decoding,) if isinstance(decoding, str) else tuple(decoding)
  if not names:
    raise ConfigError(f"config.decoding is empty; choose from {', '.join(DECODINGS)}")
  if len(set(names)) != len(names):
    raise ConfigError(f"config.decoding lists a variant twice: {names}")
  s = config.sampling
  if not s.temperature > 0:
    raise ConfigError(f"config.sampling.temperature must be positive, got {s.temperature}")
  out = []
  for name in names:
    if name == "argmax":
      out.append((name, inference.ARGMAX))
    elif name == "multinomial":
      out.append((name, inference.SamplingConfig(greedy=False, temperature=s.temperature)))
    elif name == "top_k":
      if s.top_k < 1:
        raise ConfigError(f"config.sampling.top_k must be >= 1 for top_k decoding, got {s.top_k}")
      out.append(
        (name, inference.SamplingConfig(greedy=False, temperature=s.temperature, top_k=s.top_k))
      )
    elif name == "top_p":
      if not 0.0 < s.top_p < 1.0:
        raise ConfigError(
          f"config.sampling.top_p must be in (0, 1) for top_p decoding, got {s.top_p}"
        )
      out.append(
        (name, inference.SamplingConfig(greedy=False, temperature=s.temperature, top_p=s.top_p))
      )
    elif name == "top_k_top_p":
      if s.top_k < 1 or not 0.0 < s.top_p < 1.0:
        raise ConfigError(
          "config.sampling.top_k must be >= 1 and config.sampling.top_p in (0, 1) for "
          f"top_k_top_p decoding, got {s.top_k} and {s.top_p}"
        )
      both = inference.SamplingConfig(
        greedy=False, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p
      )
      out.append((name, both))
    else:
      raise ConfigError(f"config.decoding has unknown variant {name!r}; choose from {DECODINGS}")
  return out


def _settings(config: ml_collections.ConfigDict) -> tuple[tuple[str, ...], ...]:
  """Validated `(families, protocols, lpips_nets)`."""
  try:
    families = tuple(masks.canonical_family(f) for f in config.families)
  except ValueError as e:
    raise ConfigError(f"config.families: {e}") from e
  if not families or len(set(families)) != len(families):
    raise ConfigError(f"config.families must list distinct mask families, got {config.families}")
  protocols = tuple(config.protocols)
  bad = [p for p in protocols if p not in np_metrics.PROTOCOLS]
  if bad or not protocols:
    raise ConfigError(
      f"config.protocols must be a non-empty subset of {np_metrics.PROTOCOLS}, got {protocols}"
    )
  nets = tuple(config.lpips_nets)
  bad = [n for n in nets if n not in lpips_metric.NETS]
  if bad:
    raise ConfigError(f"config.lpips_nets has unknown nets {bad}; choose from {lpips_metric.NETS}")
  return families, protocols, nets


def _check_batch(batch_size: int, mesh) -> None:
  devices = sharding.batch_divisor(mesh)
  if batch_size < 1 or batch_size % devices:
    raise ConfigError(
      f"config.batch_size={batch_size} must be a positive multiple of the {devices} devices of "
      "the data mesh axis"
    )


def _replicate(rec, mesh):
  """Places the variables on every device, next to the sharded batches."""
  repl = sharding.replicated(mesh)
  if isinstance(rec, inference.BaselineReconstructor):
    rec.variables = jax.device_put(rec.variables, repl)
    return rec
  rec.tokenizer_variables = jax.device_put(rec.tokenizer_variables, repl)
  rec.transformer_variables = jax.device_put(rec.transformer_variables, repl)
  return rec


# ------------------------------------------------------------------------------------------------
# Data


def contrast_names(source) -> tuple[str, ...]:
  """Names of the dataset's `contrast` ClassLabel (the builder's contrast groups if unknown)."""
  info = getattr(source, "dataset_info", None)
  try:
    return tuple(info.features["contrast"].names)
  except (AttributeError, KeyError, TypeError):
    return tuple(fastmri.CONTRAST_GROUPS)


def slice_table(source, num_records: int, names: Sequence[str]) -> dict[int, dict]:
  """`{record: {"file_name", "slice_index", "contrast"}}` of the first `num_records` records."""
  out = {}
  for i in range(num_records):
    ex = source[i]
    try:
      contrast = int(ex["contrast"])
      out[i] = {
        "file_name": pipeline.as_text(ex["file_name"]),
        "slice_index": int(ex["slice_index"]),
        "contrast": names[contrast] if 0 <= contrast < len(names) else str(contrast),
      }
    except KeyError as e:
      raise ConfigError(
        f"record {i} of the split has no field {e}; rebuild the dataset with the current "
        "fastmri_brain_multiscale builder"
      ) from e
  return out


def figure_records(
  slices: Mapping[int, dict], num: int, contrast_order: Sequence[str] = ()
) -> list[int]:
  """Up to `num` records for the figures, spread over volumes and contrasts.

  Slices are handed out in passes; each pass gives every volume with slices left one more, the
  contrast groups interleaved (the first volume of each group by file name, then the second,
  ...; groups in `contrast_order`, then the others by name), until `num` are chosen. So every
  volume is shown before any shows two slices. A volume given k of its m slices (sorted by
  `slice_index`) contributes the evenly spaced ones at positions `(2i + 1) · m // 2k`: its middle
  slice for k = 1, where the brain is largest. The result is ordered by contrast, file name and
  slice index, and does not depend on the records' order.
  """
  volumes: dict[str, dict[str, list[int]]] = {}
  for r in sorted(slices, key=lambda r: (slices[r]["file_name"], slices[r]["slice_index"])):
    info = slices[r]
    volumes.setdefault(info["contrast"], {}).setdefault(info["file_name"], []).append(r)
  rank = {c: i for i, c in enumerate(contrast_order)}
  contrasts = sorted(volumes, key=lambda c: (rank.get(c, len(rank)), c))
  groups = [sorted(volumes[c].items()) for c in contrasts]
  taken = dict.fromkeys((v for g in groups for v, _ in g), 0)
  left = min(max(num, 0), len(slices))
  depth = 0
  while left:
    for j in range(max(len(g) for g in groups)):
      for g in groups:
        if left and j < len(g) and len(g[j][1]) > depth:
          taken[g[j][0]] += 1
          left -= 1
    depth += 1
  out = []
  for g in groups:
    for v, recs in g:
      k = taken[v]
      out += [recs[(2 * i + 1) * len(recs) // (2 * k)] for i in range(k)]
  return out


# ------------------------------------------------------------------------------------------------
# Scoring


def _sampling_note(s: inference.SamplingConfig) -> str:
  if s.greedy:
    return ""
  parts = [f"T = {s.temperature:g}"]
  if s.top_k:
    parts.append(f"k = {s.top_k}")
  if s.top_p:
    parts.append(f"p = {s.top_p:g}")
  return f" ({', '.join(parts)})"


def _row_label(info: dict) -> str:
  name = info["file_name"].removeprefix("file_brain_").removesuffix(".h5")
  return f"{name}/{info['slice_index']} {info['contrast']}"


_r32_kspace = jax.jit(pipeline.r32_kspace, static_argnums=1)


def baseline_inputs(rec: inference.BaselineReconstructor, batch: dict) -> dict:
  """What a baseline reads beside the R = 32 image: E2E-VarNet's measured R = 32 k-space and
  mask, formed from the batch's fully sampled level and maps as in training; nothing for the
  U-Net."""
  if not rec.reads_kspace:
    return {}
  fields = ("levels", "mask_levels") + (() if rec.single_coil else ("maps",))
  kspace, mask = _r32_kspace({k: batch[k] for k in fields}, rec.single_coil)
  return {"kspace_BVHW2": kspace, "mask_BHW": mask}


# ------------------------------------------------------------------------------------------------
# Stage


def run(
  config: ml_collections.ConfigDict,
  workdir: str | os.PathLike,
  header_notes: Mapping[str, str] | None = None,
) -> dict:
  """Evaluates `config.models` on `config.split`; writes the report files and returns the flat
  metrics (keys like `distilled/argmax/gaussian_2d/paper/ssim` and `zero_filled/...`).

  `header_notes` are further `{field: text}` lines of the report's header (the pipeline's
  training budgets)."""
  start_time = time.time()
  workdir = pathlib.Path(workdir)
  models = model_sources(config)
  decodings = sampling_variants(config)
  families, protocols, nets = _settings(config)
  # DISTS needs trained weights that only dists-pytorch ships: without them the report says so
  # rather than failing a run that only lacks this one column.
  want_dists = bool(config.get("dists", False))
  dists_note = dists_metric.status() if want_dists else "off"
  use_dists = dists_note == "on"
  if want_dists and not use_dists:
    logging.warning("DISTS is %s", dists_note)
  mesh = sharding.mesh_from_config(config)
  _check_batch(config.batch_size, mesh)
  if config.max_records < 0:
    raise ConfigError(f"config.max_records must be >= 0 (0 = all), got {config.max_records}")
  chief = jax.process_index() == 0
  if chief:
    workdir.mkdir(parents=True, exist_ok=True)

  source, dataset, data_dir = data_stage.open_split(config, workdir, config.split)
  num = len(source) if not config.max_records else min(config.max_records, len(source))
  if num == 0:
    raise ConfigError(f"split {config.split!r} of {dataset} in {data_dir} has no records")
  names = contrast_names(source)
  slices = slice_table(source, num, names)
  order = sorted(slices, key=lambda r: (slices[r]["file_name"], slices[r]["slice_index"]))

  recs = {}
  for name, src in models:
    try:
      # An export carries its own tokenizer; the override is for training workdirs.
      rec = export.load_reconstructor(src, "" if _is_export(src) else config.tokenizer_from)
    except Exception as e:
      e.add_note(f"while loading config.models.{name}={src}")
      raise
    is_transformer = isinstance(rec, inference.Reconstructor)
    if is_transformer and getattr(rec.transformer, "role", "student") != "student":
      raise ConfigError(
        f"config.models.{name}={src} is a {rec.transformer.role}; its context is the fully "
        "sampled image, so it cannot reconstruct from R = 32 alone. Evaluate students."
      )
    recs[name] = _replicate(rec, mesh)

  dc = config.get("data_consistency")
  consistency = None
  if dc is not None and dc.enabled:
    consistency = inference.ConsistencyConfig(iterations=int(dc.iterations), phase=dc.phase)
    if consistency.phase not in inference.DC_PHASES or consistency.iterations < 1:
      raise ConfigError(
        f"config.data_consistency: phase must be one of {inference.DC_PHASES} and iterations "
        f">= 1, got {consistency.phase!r} and {consistency.iterations}"
      )
  row_models = [m for m, _ in models]
  if consistency is not None:
    row_models += [m + DC_SUFFIX for m, _ in models]
  # U-Net / E2E-VarNet rows: one forward pass each, no decoding variants.
  baselines = {n for n, r in recs.items() if isinstance(r, inference.BaselineReconstructor)}
  kspace_maps = any(recs[n].reads_kspace and not recs[n].single_coil for n in baselines)
  loader = pipeline.EvalLoader(
    source,
    global_batch_size=config.batch_size,
    mesh=mesh,
    families=families,
    max_records=num,
    with_maps=consistency is not None or kspace_maps,
  )
  # Volume order within each family, so volumes complete early and leave memory (the loader's
  # own order is the split's, which TFDS shuffles).
  loader.items = [(f, i) for f in loader.families for i in order]

  fig_list = figure_records(slices, int(config.figures.num_slices), names)
  fig_records = set(fig_list)
  # Every token model's per-scale decodings (a baseline has none).
  want_levels = bool(config.figures.levels) and bool(fig_list)
  figs = {
    f: {"input": {}, "target": {}, "mask": {}, "recon": {}, "levels": {}, "diag": {}}
    for f in families
  }
  # Diagnostics (where quality is lost) of every transformer model, first protocol and LPIPS net.
  diag_models = [m for m, _ in models if m not in baselines] if config.get("diagnostics") else []
  diag_scorer = evaluators.ImageScores(protocols[:1], nets[:1], slices)
  diag_acc = {
    m: evaluators.ScaleMeans(transformer_lib.sequence_layout(recs[m].transformer.patch_nums))
    for m in diag_models
  }
  first_decoding = decodings[0][0]
  scorer = evaluators.ImageScores(protocols, nets, slices, dists=use_dists)
  magnitude = jax.jit(losses.magnitude)

  logging.info(
    "evaluating %s × %s on %d slices × %d families of %s/%s (%d batches of %d)",
    [m for m, _ in models],
    [d for d, _ in decodings],
    num,
    len(families),
    dataset,
    config.split,
    len(loader),
    config.batch_size,
  )
  with common.Progress(len(loader), desc="evaluate") as bar:
    for k, batch in enumerate(loader):
      valid = sharding.to_host(batch["valid"])
      record = sharding.to_host(batch["record"])
      fam_ids = sharding.to_host(batch["family"])
      rows = [(i, masks.FAMILIES[int(fam_ids[i])], int(record[i])) for i in np.flatnonzero(valid)]
      x_r32 = batch["levels"][:, 0]
      if consistency is not None:
        mask32 = batch["mask_levels"] == 0
      zero = sharding.to_host(magnitude(x_r32))
      target = sharding.to_host(magnitude(batch["levels"][:, -1]))
      idx = [i for i, _, _ in rows]
      fams = [fam for _, fam, _ in rows]
      row_records = [r for _, _, r in rows]
      scorer.add(report.ZERO_FILLED, zero[idx], target[idx], fams, row_records)
      fig_rows = [(i, fam, r) for i, fam, r in rows if r in fig_records]
      if fig_rows:
        sampled = sharding.to_host(batch["mask_levels"]) == 0
      for i, fam, r in fig_rows:
        figs[fam]["input"][r] = zero[i]
        figs[fam]["target"][r] = target[i]
        figs[fam]["mask"][r] = sampled[i]
      for name in diag_models:
        out = recs[name].diagnose(batch["levels"], batch["family"])
        for mode in ("teacher_forced", "rollout"):
          correct = sharding.to_host(out[f"{mode}_correct_BL"])
          diag_acc[name].add(f"{mode}/accuracy", correct, valid.astype(bool))
        for diag in inference.DIAGNOSTICS:
          pred = sharding.to_host(magnitude(out[diag]))
          diag_scorer.add(f"{name}/{diag}", pred[idx], target[idx], fams, row_records)
          for i, fam, r in fig_rows:
            figs[fam]["diag"].setdefault(name, {}).setdefault(diag, {})[r] = pred[i]
      for name, rec in recs.items():
        for dec, sampling in decodings[: 1 if name in baselines else None]:
          rng = None if sampling.greedy else jax.random.fold_in(jax.random.key(config.seed), k)
          levels = want_levels and bool(fig_rows) and name not in baselines
          levels = levels and dec == first_decoding
          if name in baselines:
            out = rec.reconstruct(x_r32, batch["family"], **baseline_inputs(rec, batch))
          else:
            out = rec.reconstruct(
              x_r32, batch["family"], rng=rng, sampling=sampling, return_intermediates=levels
            )
          if levels:
            x_hat, aux = out
            levels_BKHW = sharding.to_host(magnitude(aux["levels_BKHW2"]))
          else:
            x_hat = out
          variants = [(name, x_hat)]
          if consistency is not None:
            x_dc = rec.data_consistent(x_hat, x_r32, mask32, batch["maps"], consistency)
            variants.append((name + DC_SUFFIX, x_dc))
          for row_model, x in variants:
            pred = sharding.to_host(magnitude(x))
            row = report.row_name(row_model, dec)
            scorer.add(row, pred[idx], target[idx], fams, row_records)
            if dec == first_decoding:
              for i, fam, r in fig_rows:
                figs[fam]["recon"].setdefault(row_model, {})[r] = pred[i]
          if levels:
            for i, fam, r in fig_rows:
              figs[fam]["levels"].setdefault(name, {})[r] = levels_BKHW[i]
      bar.update(k + 1)
  scores = scorer.scores()
  metrics = report.summarize(scores, slices)
  diag_scores = diag_scorer.scores()
  diag_metrics = report.summarize(diag_scores, slices)
  for name, acc in diag_acc.items():
    for mode in ("teacher_forced", "rollout"):
      diag_metrics.update({f"{name}/{k}": v for k, v in acc.result(f"{mode}/accuracy").items()})
  metrics.update({f"diagnostics/{k}": v for k, v in diag_metrics.items()})
  wall = time.time() - start_time

  num_volumes = len({info["file_name"] for info in slices.values()})
  present = {info["contrast"] for info in slices.values()}
  contrasts = [c for c in names if c in present] + sorted(present - set(names))
  metric_names = ("psnr", "ssim") + tuple(f"lpips_{n}" for n in nets)
  metric_names += ("dists",) if use_dists else ()
  sampling_note = ", ".join(f"{d}{_sampling_note(s)}" for d, s in decodings)
  header = {
    "Dataset": f"{dataset} ({data_dir})",
    "Split": config.split,
    "Slices": f"{num} per family (volumes: {num_volumes}), {len(families)} families, R = 32 input",
    "Models": "; ".join(
      f"{n} ← `{s}`" + (f" ({type(recs[n].model).__name__} baseline)" if n in baselines else "")
      for n, s in models
    ),
    "Tokenizer override": config.tokenizer_from or "none",
    "Decoding": sampling_note,
    "Data consistency": (
      f"rows `<model>{DC_SUFFIX}`: {consistency.iterations} steps on the R = 32 samples, "
      f"{consistency.phase} phase"
      if consistency is not None
      else "off"
    ),
    "Seed": str(config.seed),
    "LPIPS": ", ".join(nets) or "off",
    "DISTS": dists_note,
    "Devices": f"{jax.device_count()} × {jax.devices()[0].platform}",
    "Wall time": f"{wall:.1f} s",
    **dict(header_notes or {}),
  }
  if chief:
    figures = _write_figures(
      workdir / "figures", figs, fig_list, slices, scores, diag_scores, protocols, first_decoding
    )
    exported = {n: export.read_meta(s) for n, s in models if _is_export(s)}
    trained = _write_curves(
      workdir / "figures", training_runs(models, config.tokenizer_from, exported)
    )
    if trained:
      figures = {**figures, "Training curves": trained}
    text = report.render_report(
      metrics,
      header=header,
      models=row_models,
      decodings=[d for d, _ in decodings],
      single_decoding=[m for m in row_models if m.removesuffix(DC_SUFFIX) in baselines],
      diagnostics=report.diagnostics_section(
        diag_metrics,
        diag_models,
        families,
        protocols[0],
        ("psnr", "ssim") + tuple(f"lpips_{n}" for n in nets[:1]),
        SCALE_NAMES,
      )
      if diag_models
      else "",
      families=families,
      protocols=protocols,
      contrasts=contrasts,
      metric_names=metric_names,
      figures=report.figures_section(figures) if figures else "",
    )
    (workdir / "report.md").write_text(text)
    report.write_html(workdir / "report.html", text)
    report.write_csv(workdir / "per_slice.csv", scores, slices)
    blob = json.dumps(metrics, indent=2)
    (workdir / "metrics.json").write_text(blob)
    (workdir / "final_metrics.json").write_text(blob)
    print(f"{console_summary(text)}\nreport: {workdir / 'report.md'}", flush=True)
  return metrics


def training_runs(
  models: list[tuple[str, str]], tokenizer_from: str | None, exported: dict[str, dict]
) -> dict[str, str]:
  """`{label: workdir}` of the training runs behind the evaluated rows, whose curves the report
  shows: the tokenizer, each model's workdir (an export's is the one it records), in order and
  each once; runs without a `metrics.jsonl` are left out."""
  found: dict[str, str] = {}
  candidates = [("tokenizer", tokenizer_from or exported_tokenizer(exported))]
  for name, src in models:
    meta = (exported.get(name) or {}).get("meta") or {}
    candidates.append((name, meta.get("transformer_from") or src))
  for label, path in candidates:
    if not path:
      continue
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isfile(os.path.join(path, "metrics.jsonl")) and path not in found.values():
      found[label] = path
  return found


def exported_tokenizer(exported: dict[str, dict]) -> str | None:
  """The stage-1 workdir an export records, when a model came from one."""
  for record in exported.values():
    path = (record.get("meta") or {}).get("tokenizer_from")
    if path:
      return path
  return None


def _is_export(source: str) -> bool:
  # As `export.load_reconstructor` tells them apart: a training workdir has a config.json.
  path = os.path.expanduser(source)
  return os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json"))


def _write_curves(folder: pathlib.Path, runs: dict[str, str]) -> list[tuple[str, str]]:
  out = []
  for label, path in runs.items():
    png = folder / f"curves_{label}.png"
    if curves.plot_training_curves(os.path.join(path, "metrics.jsonl"), png, f"{label}: {path}"):
      out.append((f"{label} ({path})", f"figures/{png.name}"))
  return out


def console_summary(report_text: str) -> str:
  """The report's first section (the winners per family and protocol), for the console."""
  sections = report_text.split("\n## ")
  return "## " + sections[1].strip() if len(sections) > 1 else report_text.strip()


def _write_figures(
  folder: pathlib.Path,
  figs: Mapping[str, dict],
  records: Sequence[int],
  slices: Mapping[int, dict],
  scores: Mapping,
  diag_scores: Mapping,
  protocols: Sequence[str],
  decoding: str,
) -> dict[str, list[tuple[str, str]]]:
  """Writes each family's grids of the figure `records`: the reconstructions of every row model,
  and per token model its cumulative scales and diagnostics; returns
  `{family: [(caption, path relative to the workdir)]}` for the report.

  The panels carry the stage's own per-slice scores: `paper` where it was scored (else the first
  protocol); the diagnostics were scored under the first protocol only.
  """
  if not records:
    return {}
  folder.mkdir(parents=True, exist_ok=True)
  labels = [_row_label(slices[r]) for r in records]
  protocol = "paper" if "paper" in protocols else protocols[0]
  out = {}

  def stack(by_record):
    return np.stack([by_record[r] for r in records])

  def scored(rows, family, source, proto):
    return {k: report.slice_scores(source, row, family, records, proto) for k, row in rows}

  for family, f in figs.items():
    items = out.setdefault(family, [])
    inputs, target = stack(f["input"]), stack(f["target"])
    recons = {m: stack(by_rec) for m, by_rec in f["recon"].items()}
    rows = [(report.ZERO_FILLED, report.ZERO_FILLED)]
    rows += [(m, report.row_name(m, decoding)) for m in recons]
    name = f"{family}.png"
    report.family_figure(
      folder / name,
      inputs,
      recons,
      target,
      row_labels=labels,
      title=f"{family}: reconstructions from R = 32 (decoding: {decoding})",
      scores=scored(rows, family, scores, protocol),
      mask_SHW=stack(f["mask"]),
      protocol=protocol,
    )
    items.append(
      (f"Reconstructions and error maps (decoding: {decoding})", f"{folder.name}/{name}")
    )
    for model in dict.fromkeys([*f["levels"], *f["diag"]]):
      if model in f["levels"]:
        levels = stack(f["levels"][model])
        k = levels.shape[1]
        name = f"{family}_{model}_levels.png"
        report.levels_figure(
          folder / name,
          inputs,
          levels,
          target,
          level_names=LEVEL_NAMES if k == len(LEVEL_NAMES) else (),
          row_labels=labels,
          title=f"{family}: {model}, cumulative token scales (decoding: {decoding})",
        )
        items.append((f"{model}: cumulative token scales", f"{folder.name}/{name}"))
      if model in f["diag"]:
        by_diag = f["diag"][model]
        rows = [(d, f"{model}/{d}") for d in by_diag]
        panel_scores = scored(rows, family, diag_scores, protocols[0])
        zero = [(report.ZERO_FILLED, report.ZERO_FILLED)]
        panel_scores |= scored(zero, family, scores, protocols[0])
        name = f"{family}_{model}_diagnostics.png"
        report.family_figure(
          folder / name,
          inputs,
          {d: stack(by_rec) for d, by_rec in by_diag.items()},
          target,
          row_labels=labels,
          title=f"{family}: {model}, tokenizer ceiling → teacher-forced → rollout",
          scores=panel_scores,
          protocol=protocols[0],
        )
        items.append((f"{model}: where quality is lost", f"{folder.name}/{name}"))
  return out


train_and_evaluate = run
