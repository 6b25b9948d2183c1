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
tables per protocol × family like the paper's),
`per_slice.csv`, `metrics.json` and `final_metrics.json` (the flat metrics; the second marks the
stage as complete), and `figures/<family>.png` (+ `figures/<family>_levels.png`).
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

from nextaccel_jax import export, inference, losses, sharding
from nextaccel_jax.data import fastmri, masks, pipeline
from nextaccel_jax.evaluation import dists_metric, evaluators, lpips_metric, report
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
    raise ValueError("config.models is missing: name → workdir or export folder")
  out = []
  for name, source in models.items():
    if not isinstance(source, str):
      raise ValueError(f"config.models.{name} must be a path string, got {source!r}")
    if name == report.ZERO_FILLED or "/" in name:
      raise ValueError(
        f"config.models.{name}: the name must not be {report.ZERO_FILLED!r} or hold '/'"
      )
    if source:
      out.append((name, source))
  if not out:
    names = ", ".join(f"config.models.{n}" for n in models.keys()) or "config.models.<name>"
    raise ValueError(
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
    raise ValueError(f"config.decoding is empty; choose from {', '.join(DECODINGS)}")
  if len(set(names)) != len(names):
    raise ValueError(f"config.decoding lists a variant twice: {names}")
  s = config.sampling
  if not s.temperature > 0:
    raise ValueError(f"config.sampling.temperature must be positive, got {s.temperature}")
  out = []
  for name in names:
    if name == "argmax":
      out.append((name, inference.ARGMAX))
    elif name == "multinomial":
      out.append((name, inference.SamplingConfig(greedy=False, temperature=s.temperature)))
    elif name == "top_k":
      if s.top_k < 1:
        raise ValueError(f"config.sampling.top_k must be >= 1 for top_k decoding, got {s.top_k}")
      out.append(
        (name, inference.SamplingConfig(greedy=False, temperature=s.temperature, top_k=s.top_k))
      )
    elif name == "top_p":
      if not 0.0 < s.top_p < 1.0:
        raise ValueError(
          f"config.sampling.top_p must be in (0, 1) for top_p decoding, got {s.top_p}"
        )
      out.append(
        (name, inference.SamplingConfig(greedy=False, temperature=s.temperature, top_p=s.top_p))
      )
    elif name == "top_k_top_p":
      if s.top_k < 1 or not 0.0 < s.top_p < 1.0:
        raise ValueError(
          "config.sampling.top_k must be >= 1 and config.sampling.top_p in (0, 1) for "
          f"top_k_top_p decoding, got {s.top_k} and {s.top_p}"
        )
      both = inference.SamplingConfig(
        greedy=False, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p
      )
      out.append((name, both))
    else:
      raise ValueError(f"config.decoding has unknown variant {name!r}; choose from {DECODINGS}")
  return out


def _settings(config: ml_collections.ConfigDict) -> tuple[tuple[str, ...], ...]:
  """Validated `(families, protocols, lpips_nets)`."""
  try:
    families = tuple(masks.canonical_family(f) for f in config.families)
  except ValueError as e:
    raise ValueError(f"config.families: {e}") from e
  if not families or len(set(families)) != len(families):
    raise ValueError(f"config.families must list distinct mask families, got {config.families}")
  protocols = tuple(config.protocols)
  bad = [p for p in protocols if p not in np_metrics.PROTOCOLS]
  if bad or not protocols:
    raise ValueError(
      f"config.protocols must be a non-empty subset of {np_metrics.PROTOCOLS}, got {protocols}"
    )
  nets = tuple(config.lpips_nets)
  bad = [n for n in nets if n not in lpips_metric.NETS]
  if bad:
    raise ValueError(f"config.lpips_nets has unknown nets {bad}; choose from {lpips_metric.NETS}")
  return families, protocols, nets


def _check_batch(batch_size: int, mesh) -> None:
  devices = sharding.batch_divisor(mesh)
  if batch_size < 1 or batch_size % devices:
    raise ValueError(
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
      raise ValueError(
        f"record {i} of the split has no field {e}; rebuild the dataset with the current "
        "fastmri_brain_multiscale builder"
      ) from e
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
    raise ValueError(f"config.max_records must be >= 0 (0 = all), got {config.max_records}")
  chief = jax.process_index() == 0
  if chief:
    workdir.mkdir(parents=True, exist_ok=True)

  source, dataset, data_dir = data_stage.open_split(config, workdir, config.split)
  num = len(source) if not config.max_records else min(config.max_records, len(source))
  if num == 0:
    raise ValueError(f"split {config.split!r} of {dataset} in {data_dir} has no records")
  names = contrast_names(source)
  slices = slice_table(source, num, names)
  order = sorted(slices, key=lambda r: (slices[r]["file_name"], slices[r]["slice_index"]))

  recs = {}
  for name, src in models:
    try:
      rec = export.load_reconstructor(src, config.tokenizer_from)
    except Exception as e:
      e.add_note(f"while loading config.models.{name}={src}")
      raise
    is_transformer = isinstance(rec, inference.Reconstructor)
    if is_transformer and getattr(rec.transformer, "role", "student") != "student":
      raise ValueError(
        f"config.models.{name}={src} is a {rec.transformer.role}; its context is the fully "
        "sampled image, so it cannot reconstruct from R = 32 alone. Evaluate students."
      )
    recs[name] = _replicate(rec, mesh)

  dc = config.get("data_consistency")
  consistency = None
  if dc is not None and dc.enabled:
    consistency = inference.ConsistencyConfig(iterations=int(dc.iterations), phase=dc.phase)
    if consistency.phase not in inference.DC_PHASES or consistency.iterations < 1:
      raise ValueError(
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

  num_fig = max(0, int(config.figures.num_slices))
  fig_records = set(order[:num_fig])
  # The per-scale decodings come from the first token model (a baseline has none).
  first_model = next((m for m, _ in models if m not in baselines), None)
  want_levels = bool(config.figures.levels) and num_fig > 0 and first_model is not None
  figs = {f: {"input": {}, "target": {}, "recon": {}, "levels": {}, "diag": {}} for f in families}
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
      for i, fam, r in rows:
        if r in fig_records:
          figs[fam]["input"][r] = zero[i]
          figs[fam]["target"][r] = target[i]
      has_fig = any(r in fig_records for _, _, r in rows)
      for name in diag_models:
        out = recs[name].diagnose(batch["levels"], batch["family"])
        for mode in ("teacher_forced", "rollout"):
          correct = sharding.to_host(out[f"{mode}_correct_BL"])
          diag_acc[name].add(f"{mode}/accuracy", correct, valid.astype(bool))
        for diag in inference.DIAGNOSTICS:
          pred = sharding.to_host(magnitude(out[diag]))
          diag_scorer.add(f"{name}/{diag}", pred[idx], target[idx], fams, row_records)
          if name == diag_models[0]:
            for i, fam, r in rows:
              if r in fig_records:
                figs[fam]["diag"].setdefault(diag, {})[r] = pred[i]
      for name, rec in recs.items():
        for dec, sampling in decodings[: 1 if name in baselines else None]:
          rng = None if sampling.greedy else jax.random.fold_in(jax.random.key(config.seed), k)
          levels = want_levels and has_fig and (name, dec) == (first_model, first_decoding)
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
            for i, fam, r in rows:
              if r in fig_records and dec == first_decoding:
                figs[fam]["recon"].setdefault(row_model, {})[r] = pred[i]
          if levels:
            for i, fam, r in rows:
              if r in fig_records:
                figs[fam]["levels"][r] = levels_BKHW[i]
      bar.update(k + 1)
  scores = scorer.scores()
  metrics = report.summarize(scores, slices)
  diag_metrics = report.summarize(diag_scorer.scores(), slices)
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
    )
    (workdir / "report.md").write_text(text)
    report.write_csv(workdir / "per_slice.csv", scores, slices)
    _write_figures(workdir / "figures", figs, order[:num_fig], slices, want_levels, first_model)
    blob = json.dumps(metrics, indent=2)
    (workdir / "metrics.json").write_text(blob)
    (workdir / "final_metrics.json").write_text(blob)
    logging.info("evaluation report written to %s (%.1f s)", workdir / "report.md", wall)
  return metrics


def _write_figures(folder, figs, records, slices, want_levels: bool, first_model: str):
  if not records:
    return
  folder.mkdir(parents=True, exist_ok=True)
  labels = [_row_label(slices[r]) for r in records]
  for family, f in figs.items():
    recons = {m: np.stack([by_rec[r] for r in records]) for m, by_rec in f["recon"].items()}
    inputs = np.stack([f["input"][r] for r in records])
    target = np.stack([f["target"][r] for r in records])
    report.family_figure(
      folder / f"{family}.png", inputs, recons, target, row_labels=labels, title=family
    )
    if f["diag"]:
      report.family_figure(
        folder / f"{family}_diagnostics.png",
        inputs,
        {d: np.stack([f["diag"][d][r] for r in records]) for d in f["diag"]},
        target,
        row_labels=labels,
        title=f"{family}: {first_model}, tokenizer ceiling → teacher-forced → rollout",
      )
    if want_levels and f["levels"]:
      levels = np.stack([f["levels"][r] for r in records])
      k = levels.shape[1]
      report.levels_figure(
        folder / f"{family}_levels.png",
        inputs,
        levels,
        target,
        level_names=LEVEL_NAMES if k == len(LEVEL_NAMES) else (),
        row_labels=labels,
        title=f"{family}: {first_model}, cumulative token scales",
      )


train_and_evaluate = run
