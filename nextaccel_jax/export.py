"""Inference exports: one Orbax directory with everything `Reconstructor` needs, nothing else.

  # From the workdirs of a training run (best checkpoints; --latest for the newest periodic one):
  python -m nextaccel_jax.export --transformer_from=runs/distill --out=runs/export \
      [--tokenizer_from=runs/aqvae] [--latest] [--overwrite]

  rec = export.load_reconstructor("runs/export")  # or a stage-2/3 workdir: "runs/distill"
  x_hat_BHW2 = rec.reconstruct(x_r32_BHW2, family_B)

`export` writes one from in-memory models, `export_from_workdirs` from training workdirs;
`load_export` and `load_workdirs` return the same `Exported` (modules, variables, metadata), and
`load_reconstructor` an `inference.Reconstructor` from either, or an
`inference.BaselineReconstructor` from a U-Net / E2E-VarNet workdir (`load_baseline`). Workdirs
are read through `checkpointing`'s reader of trained runs; the modules are built by the models'
`from_fields`.

An export is a `Composite` Orbax checkpoint (written to a temporary folder and renamed on commit,
so a failed export never looks like a finished one) with three items:

- `tokenizer`: the stage-1 AQ-VAE's `{"params", "vq_ema"}` (PyTreeSave, host float32 arrays);
- `transformer`: the stage-2/3 transformer's `{"params"}`;
- `export`: JSON metadata (JsonSave, stored as `export/metadata`):

    format        "nextaccel_jax.export"
    version       1
    image_size    side of the square image grid H = W
    tokenizer     every field of the `AQVAE` (the kwargs that rebuild it; dtypes as names,
                  sequences as lists)
    transformer   every field of the `NextAccelTransformer`, the context-encoder fields derived
                  from the tokenizer included
    num_params    {"tokenizer": n, "transformer": n}
    data          the conventions of the inputs: layout, the R = 32 input image, mask families
                  and their ids, accelerations, FFT convention, normalisation (`data_conventions`)
    meta          free-form JSON given at export (e.g. the source workdirs and steps)

Loading rebuilds both modules from the metadata and restores the arrays against the shapes those
modules produce, so a mismatch is reported by parameter path rather than by Orbax.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import logging
import os
import shutil
import sys
import uuid
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from nextaccel_jax import ConfigError, MissingInputError, SetupError, checkpointing, inference
from nextaccel_jax.data import fastmri_brain_multiscale, masks, transforms
from nextaccel_jax.models import aqvae as aqvae_lib
from nextaccel_jax.models import fields as fields_lib
from nextaccel_jax.models import layers
from nextaccel_jax.models import transformer as transformer_lib

FORMAT = "nextaccel_jax.export"
VERSION = 1
SUPPORTED_VERSIONS = (1,)

# `config.stage` of a baseline run (U-Net, E2E-VarNet): read by `load_baseline`, not exported.
BASELINE_STAGE = "baseline"

_TOKENIZER = "tokenizer"
_TRANSFORMER = "transformer"
_META = "export"

NORM_DESCRIPTIONS = {
  "fs_max": "each slice divided by the largest magnitude of its fully sampled coil-combined image",
  "r32": "each slice divided by the largest magnitude of its R = 32 image (first mask family's "
  "evaluation mask)",
  "none": "no per-slice scaling",
}


@dataclasses.dataclass(frozen=True)
class Exported:
  """The models and variables of an export (or of a pair of training workdirs).

  Attributes:
    tokenizer: the stage-1 `AQVAE`.
    tokenizer_variables: its `{"params", "vq_ema"}`.
    transformer: the stage-2/3 `NextAccelTransformer`.
    transformer_params: its bare params (no `{"params": ...}` wrapper).
    meta: the export metadata (see the module docstring).
  """

  tokenizer: aqvae_lib.AQVAE
  tokenizer_variables: dict
  transformer: transformer_lib.NextAccelTransformer
  transformer_params: dict
  meta: dict


# ------------------------------------------------------------------------------------------------
# Shapes


# Shapes only (immutable); tracing a paper-size init takes seconds, and export, load and the
# workdir loaders each need it.
@functools.lru_cache(maxsize=8)
def _abstract_tokenizer(tokenizer: aqvae_lib.AQVAE, image_size: int) -> dict:
  tree = jax.eval_shape(lambda: aqvae_lib.init_variables(tokenizer, jax.random.key(0), image_size))
  return {"params": tree["params"], "vq_ema": tree["vq_ema"]}


@functools.lru_cache(maxsize=8)
def _abstract_transformer(transformer: transformer_lib.NextAccelTransformer, image_size: int):
  tree = jax.eval_shape(
    lambda: transformer_lib.init_params(transformer, jax.random.key(0), image_size)
  )
  return tree["params"]


def _host_args(abstract):
  return jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), abstract)


def _to_device(tree):
  # Uncommitted arrays, like `jnp.asarray` of host data: a restore onto a fixed device would
  # commit them there, and jit compiles committed arguments as a different program.
  return jax.tree.map(jnp.asarray, tree)


def _plain(tree):
  """Nested plain dicts (FrozenDicts and ConfigDicts included) with host numpy leaves."""
  if isinstance(tree, Mapping):
    return {str(k): _plain(v) for k, v in tree.items()}
  return np.asarray(jax.device_get(tree))


# ------------------------------------------------------------------------------------------------
# Metadata


def data_conventions(
  image_size: int,
  *,
  norm: str | None = None,
  builder_config: str | None = None,
  single_coil: bool | None = None,
) -> dict[str, Any]:
  """The input conventions inference relies on, as recorded in an export's `data`.

  Args:
    image_size: side of the square grid.
    norm: the training data's per-slice normalisation (`"fs_max"`, `"r32"`, `"none"`), or None
      when unknown.
    builder_config: the `fastmri_brain_multiscale` builder config of the training data.
    single_coil: whether the R = 32 inputs were formed single-coil (None: unknown).
  """
  if norm is not None and norm not in NORM_DESCRIPTIONS:
    raise ConfigError(f"norm must be one of {', '.join(NORM_DESCRIPTIONS)} or None, got {norm!r}")
  return {
    "layout": f"float32 [B, {image_size}, {image_size}, 2]: (real, imag) of the complex "
    "coil-combined image",
    "input": "zero-filled R = 32 image: sum_c conj(S_c) ifft2c(M_32 * fft2c(S_c x)) with the "
    "coil maps S_c (SENSE-1), or ifft2c(M_32 * fft2c(x)) when single_coil",
    "single_coil": single_coil,
    "input_acceleration": transforms.ACCELERATIONS[0],
    "accelerations": list(transforms.ACCELERATIONS),
    "mask_families": {name: i for i, name in enumerate(masks.FAMILIES)},
    "family_input": "int32 [B]: id (mask_families) of the family that drew the R = 32 mask",
    "fft": "centred orthonormal: fft2c(x) = fftshift(fft2(ifftshift(x), norm='ortho')) over "
    "(H, W); DC at (H // 2, W // 2)",
    "norm": norm,
    "norm_description": NORM_DESCRIPTIONS.get(norm, "unknown: not recorded at export"),
    "builder_config": builder_config,
    "output": "same layout and normalisation as the input",
  }


def _check_json(meta, what: str):
  try:
    return json.loads(json.dumps(meta, allow_nan=True))
  except (TypeError, ValueError) as e:
    raise ConfigError(f"{what} must be JSON-serialisable: {e}") from e


def _record(tokenizer, tokenizer_variables, transformer, transformer_params, image_size, meta):
  meta = _check_json(dict(meta or {}), "meta")
  try:
    data = data_conventions(
      int(image_size),
      norm=meta.get("norm"),
      builder_config=meta.get("builder_config"),
      single_coil=meta.get("single_coil"),
    )
  except ValueError as e:
    raise ConfigError(f"meta['norm']: {e}") from e
  return {
    "format": FORMAT,
    "version": VERSION,
    "image_size": int(image_size),
    "tokenizer": fields_lib.to_json(tokenizer),
    "transformer": fields_lib.to_json(transformer),
    "num_params": {
      "tokenizer": layers.count_params(tokenizer_variables["params"]),
      "transformer": layers.count_params(transformer_params),
    },
    "data": data,
    "meta": meta,
  }


def _bare_params(tree):
  if isinstance(tree, Mapping) and "params" in tree:
    return tree["params"]
  return tree


def _prepare(
  tokenizer_fields, tokenizer_variables, transformer_fields, transformer_params, image_size
):
  """Builds both modules, checks the variables against them; returns `Exported` (no meta)."""
  if not isinstance(image_size, int | np.integer) or image_size <= 0:
    raise ConfigError(f"image_size must be a positive int, got {image_size!r}")
  tokenizer = aqvae_lib.from_fields(tokenizer_fields, "tokenizer_fields")
  transformer = transformer_lib.from_fields(transformer_fields, tokenizer, "transformer_fields")
  if not isinstance(tokenizer_variables, Mapping) or not {"params", "vq_ema"} <= set(
    tokenizer_variables
  ):
    got = list(tokenizer_variables) if isinstance(tokenizer_variables, Mapping) else "no mapping"
    raise ConfigError(f'tokenizer_variables must hold "params" and "vq_ema", got {got}')
  tok_vars = {k: tokenizer_variables[k] for k in ("params", "vq_ema")}
  params = _bare_params(transformer_params)
  checkpointing.check_shapes(
    tok_vars,
    _abstract_tokenizer(tokenizer, int(image_size)),
    "tokenizer_variables do not match tokenizer_fields",
  )
  checkpointing.check_shapes(
    params,
    _abstract_transformer(transformer, int(image_size)),
    "transformer_params do not match transformer_fields",
  )
  return Exported(tokenizer, tok_vars, transformer, params, {})


# ------------------------------------------------------------------------------------------------
# Writing


def _checkpointer():
  # Handlers are named up front: without them Orbax reports no metadata for the array items.
  handlers = {
    _TOKENIZER: ocp.PyTreeCheckpointHandler(),
    _TRANSFORMER: ocp.PyTreeCheckpointHandler(),
    _META: ocp.JsonCheckpointHandler(),
  }
  return ocp.Checkpointer(ocp.CompositeCheckpointHandler(**handlers))


def _is_nonempty(path: str) -> bool:
  return os.path.lexists(path) and (not os.path.isdir(path) or bool(os.listdir(path)))


def _check_target(path: str, overwrite: bool) -> None:
  """Refuses a non-empty `path` unless `overwrite`, and never replaces something not an export."""
  if not _is_nonempty(path):
    return
  if not overwrite:
    raise FileExistsError(f"export path {path} exists and is not empty; pass overwrite=True")
  # A mistyped --out must not wipe a training workdir or anything else.
  if not os.path.isdir(os.path.join(path, _META)):
    raise FileExistsError(
      f"export path {path} exists and is not a nextaccel_jax export; overwrite only replaces "
      "exports, so remove it yourself or pick another path"
    )


def export(
  path: str | os.PathLike,
  *,
  tokenizer_fields: Mapping[str, Any],
  tokenizer_variables,
  transformer_fields: Mapping[str, Any],
  transformer_params,
  image_size: int,
  meta: Mapping[str, Any] | None = None,
  overwrite: bool = False,
) -> str:
  """Writes an inference export.

  Args:
    path: the export directory (local filesystem); its parent is created if needed.
    tokenizer_fields: `AQVAE` fields (e.g. `fields.module_fields(tokenizer)`, or `config.tokenizer`
      of a training run).
    tokenizer_variables: the tokenizer's `{"params", "vq_ema"}` (other collections are dropped).
    transformer_fields: `NextAccelTransformer` fields, e.g. `fields.module_fields(model)` or
      `config.model`; the context-encoder fields are derived from the tokenizer
      (`transformer.from_fields`).
    transformer_params: the transformer's params, bare or as `{"params": ...}`.
    image_size: side of the square image grid the models were trained on.
    meta: JSON-able provenance stored under `meta`. Its keys `norm`, `builder_config` and
      `single_coil` also fill the data conventions (`data_conventions`).
    overwrite: replace an existing export at `path` (never a directory that is not an export);
      the old export is removed only once the new one is complete.

  Returns:
    The absolute export path.

  Raises:
    FileExistsError: if `path` exists and is not empty, unless `overwrite` and it is an export.
    ValueError: if a field is unknown, the variables do not match the fields (names the
      parameter path), or `meta` is not JSON.
  """
  path = os.path.abspath(os.path.expanduser(os.fspath(path)))
  _check_target(path, overwrite)
  if jax.process_count() > 1:
    raise ConfigError("export runs in a single process (it writes host copies of the arrays)")
  ex = _prepare(
    tokenizer_fields, tokenizer_variables, transformer_fields, transformer_params, image_size
  )
  record = _record(
    ex.tokenizer, ex.tokenizer_variables, ex.transformer, ex.transformer_params, image_size, meta
  )
  args = ocp.args.Composite(
    **{
      _TOKENIZER: ocp.args.PyTreeSave(_plain(ex.tokenizer_variables)),
      _TRANSFORMER: ocp.args.PyTreeSave({"params": _plain(ex.transformer_params)}),
      _META: ocp.args.JsonSave(record),
    }
  )
  parent, name = os.path.split(path)
  os.makedirs(parent, exist_ok=True)
  # Written beside the target and renamed into place, so that `overwrite` keeps the previous
  # export until the new one is complete.
  token = uuid.uuid4().hex[:8]
  staging = os.path.join(parent, f".{name}.staging-{token}")
  trash = os.path.join(parent, f".{name}.old-{token}")
  moved_old = False
  try:
    with _checkpointer() as ckptr:
      ckptr.save(staging, args=args)
    if os.path.lexists(path):
      os.rename(path, trash)
      moved_old = True
    os.rename(staging, path)
  except BaseException:
    if moved_old and not os.path.lexists(path):
      os.rename(trash, path)
    raise
  finally:
    # The glob also catches Orbax's own temporary folder of an interrupted save.
    for leftover in [*glob.glob(glob.escape(staging) + "*"), trash]:
      if os.path.isdir(leftover) and not os.path.islink(leftover):
        shutil.rmtree(leftover, ignore_errors=True)
      elif os.path.lexists(leftover):
        os.remove(leftover)
  return path


# ------------------------------------------------------------------------------------------------
# Reading an export


def _looks_like_workdir(path: str) -> bool:
  return any(os.path.exists(os.path.join(path, p)) for p in ("config.json", "checkpoints", "best"))


def read_meta(path: str | os.PathLike) -> dict:
  """The JSON metadata of an export, validated (format and version); reads no arrays.

  Raises:
    FileNotFoundError: if `path` does not exist.
    ValueError: if `path` is not an export or its format version is unknown.
  """
  path = os.path.abspath(os.path.expanduser(os.fspath(path)))
  if not os.path.isdir(path):
    raise MissingInputError(f"export {path}: no such directory")
  if not os.path.isdir(os.path.join(path, _META)):
    hint = (
      " (it looks like a training workdir: use export_from_workdirs or load_reconstructor)"
      if _looks_like_workdir(path)
      else ""
    )
    raise ConfigError(
      f"{path} is not a nextaccel_jax export: it has no '{_META}' metadata item{hint}"
    )
  with _checkpointer() as ckptr:
    try:
      record = ckptr.restore(path, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))
    except (ValueError, FileNotFoundError, json.JSONDecodeError) as e:
      raise ConfigError(f"{path} is not a readable nextaccel_jax export: {e}") from e
  record = record[_META]
  if not isinstance(record, Mapping) or record.get("format") != FORMAT:
    got = record.get("format") if isinstance(record, Mapping) else type(record).__name__
    raise ConfigError(f"{path} is not a nextaccel_jax export: format {got!r}, expected {FORMAT!r}")
  version = record.get("version")
  if version not in SUPPORTED_VERSIONS:
    raise ConfigError(
      f"export {path} has format version {version!r}; this nextaccel_jax reads version(s) "
      f"{', '.join(map(str, SUPPORTED_VERSIONS))}"
    )
  for key in ("image_size", "tokenizer", "transformer"):
    if key not in record:
      raise ConfigError(f"export {path}: metadata lacks {key!r}")
  return dict(record)


def load_export(path: str | os.PathLike) -> Exported:
  """Loads an export written by `export`: both modules and their variables (uncommitted arrays
  on the default device).

  Raises:
    FileNotFoundError: if `path` does not exist.
    ValueError: if `path` is not an export, its version is unknown, a stored field is not a
      field of the module in this version, or the arrays do not match the fields.
  """
  path = os.path.abspath(os.path.expanduser(os.fspath(path)))
  record = read_meta(path)
  image_size = int(record["image_size"])
  tokenizer = fields_lib.build(aqvae_lib.AQVAE, record["tokenizer"], f"export {path}: tokenizer")
  transformer = fields_lib.build(
    transformer_lib.NextAccelTransformer, record["transformer"], f"export {path}: transformer"
  )
  want_tok = _abstract_tokenizer(tokenizer, image_size)
  want_tr = {"params": _abstract_transformer(transformer, image_size)}
  with _checkpointer() as ckptr:
    stored = ckptr.metadata(path).item_metadata
    for item, want in ((_TOKENIZER, want_tok), (_TRANSFORMER, want_tr)):
      tree = stored[item] if item in stored.keys() else None
      if tree is None:
        raise ConfigError(f"export {path}: the '{item}' item is missing")
      checkpointing.check_shapes(
        tree.tree, want, f"export {path}: '{item}' arrays do not match its fields"
      )
    restored = ckptr.restore(
      path,
      args=ocp.args.Composite(
        **{
          _TOKENIZER: ocp.args.PyTreeRestore(restore_args=_host_args(want_tok)),
          _TRANSFORMER: ocp.args.PyTreeRestore(restore_args=_host_args(want_tr)),
        }
      ),
    )
  return Exported(
    tokenizer=tokenizer,
    tokenizer_variables=_to_device(dict(restored[_TOKENIZER])),
    transformer=transformer,
    transformer_params=_to_device(restored[_TRANSFORMER]["params"]),
    meta=record,
  )


# ------------------------------------------------------------------------------------------------
# Reading training workdirs


def _read_config(workdir: str) -> tuple[dict, str]:
  """The stage-2/3 run's config.json, checked for what rebuilding its models needs."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise MissingInputError(
      f"transformer_from={workdir}: no config.json at {path} (a stage-2/3 training workdir "
      "writes one)"
    )
  config = checkpointing.read_run_config(workdir)
  if config.get("stage") == "aqvae":
    raise ConfigError(
      f"{path}: stage 'aqvae' is the tokenizer; transformer_from wants a stage-2/3 workdir "
      "(pass the stage-1 workdir as tokenizer_from)"
    )
  if config.get("stage") == BASELINE_STAGE:
    raise ConfigError(
      f"{path}: a {config.get('model_name')} baseline run; an export holds a tokenizer and a "
      "transformer, while a baseline is read from its workdir (load_reconstructor, or "
      "config.models.<name>=<workdir> in the evaluation)"
    )
  for key in ("model", "tokenizer"):
    if not isinstance(config.get(key), dict):
      raise ConfigError(f"{path}: missing field config.{key} (a JSON object)")
  size = (config.get("data") or {}).get("image_size")
  if not isinstance(size, int) or size <= 0:
    raise ConfigError(f"{path}: config.data.image_size must be a positive int, got {size!r}")
  return config, path


def _make_modules(config: dict, config_path: str):
  """The tokenizer and transformer exactly as the training stage builds them."""
  try:
    tokenizer = aqvae_lib.from_fields(
      config["tokenizer"], f"{config_path}: config.tokenizer", remat=False
    )
  except (TypeError, ValueError) as e:
    raise ConfigError(f"{config_path}: config.tokenizer does not build an AQVAE: {e}") from e
  try:
    transformer = transformer_lib.from_fields(
      config["model"], tokenizer, f"{config_path}: config.model"
    )
  except (TypeError, ValueError) as e:
    raise ConfigError(
      f"{config_path}: config.model does not build a NextAccelTransformer: {e}"
    ) from e
  return tokenizer, transformer


def builder_norm(name) -> str | None:
  """The `norm` of a named `fastmri_brain_multiscale` builder config (None if unknown)."""
  for cfg in fastmri_brain_multiscale.BUILDER_CONFIGS:
    if name and cfg.name == name:
      return cfg.norm
  return None


def load_workdirs(
  transformer_from: str | os.PathLike,
  tokenizer_from: str | os.PathLike | None = None,
  *,
  best: bool = True,
) -> Exported:
  """The models and variables of a stage-2/3 workdir and its stage-1 tokenizer workdir.

  Args:
    transformer_from: the stage-2/3 workdir (`config.json` plus `best/` and/or `checkpoints/`).
    tokenizer_from: the stage-1 workdir; None uses the `tokenizer_from` recorded by the run.
    best: read each workdir's best checkpoint (its newest periodic one when it kept no best);
      False reads the newest periodic checkpoints.

  Returns:
    `Exported` whose `meta` is what `export` would write, with the sources under `meta.meta`.

  Raises:
    FileNotFoundError: a missing workdir, config.json or checkpoint.
    ValueError: config fields that do not build the models, or checkpoints whose shapes do not
      match them (names the parameter path).
  """
  workdir = os.path.abspath(os.path.expanduser(os.fspath(transformer_from)))
  if not os.path.isdir(workdir):
    raise MissingInputError(f"transformer_from={workdir}: no such directory (a stage-2/3 workdir)")
  config, config_path = _read_config(workdir)
  image_size = int(config["data"]["image_size"])
  tokenizer, transformer = _make_modules(config, config_path)
  t_ckpt = checkpointing.find_checkpoint(workdir, best=best, field="transformer_from")
  tok_dir = checkpointing.resolve_tokenizer_from(
    tokenizer_from, config, t_ckpt.meta, where=config_path, how="tokenizer_from (--tokenizer_from)"
  )
  k_ckpt = checkpointing.find_checkpoint(tok_dir, best=best, field="tokenizer_from")

  where = f"transformer_from={workdir} ({t_ckpt.describe()})"
  params = _to_device(
    checkpointing.restore_checkpoint(
      t_ckpt,
      {"params": _abstract_transformer(transformer, image_size)},
      to_host=True,
      what=f"{where}: the stored params do not match config.model of {config_path}",
    )
  )["params"]
  where = f"tokenizer_from={tok_dir} ({k_ckpt.describe()})"
  tok_vars = _to_device(
    checkpointing.restore_checkpoint(
      k_ckpt,
      _abstract_tokenizer(tokenizer, image_size),
      to_host=True,
      what=f"{where}: the stored tokenizer does not match config.tokenizer of {config_path}",
    )
  )
  data = config.get("data") or {}
  builder_config = data.get("builder_config")
  meta = {
    "norm": builder_norm(builder_config),
    "builder_config": builder_config,
    "single_coil": data.get("single_coil"),
    "stage": config.get("stage"),
    "role": config["model"].get("role"),
    "transformer_from": workdir,
    "transformer_checkpoint": t_ckpt.kind,
    "transformer_step": t_ckpt.step,
    "tokenizer_from": tok_dir,
    "tokenizer_checkpoint": k_ckpt.kind,
    "tokenizer_step": k_ckpt.step,
  }
  tok_vars = {"params": tok_vars["params"], "vq_ema": tok_vars["vq_ema"]}
  record = _record(tokenizer, tok_vars, transformer, params, image_size, meta)
  return Exported(tokenizer, tok_vars, transformer, params, record)


def export_from_workdirs(
  path: str | os.PathLike,
  *,
  transformer_from: str | os.PathLike,
  tokenizer_from: str | os.PathLike | None = None,
  best: bool = True,
  overwrite: bool = False,
) -> str:
  """Exports a stage-2/3 workdir and its tokenizer (see `load_workdirs` and `export`).

  Returns:
    The absolute export path.
  """
  out = os.path.abspath(os.path.expanduser(os.fspath(path)))
  # Checked before the (possibly large) checkpoints are read.
  _check_target(out, overwrite)
  ex = load_workdirs(transformer_from, tokenizer_from, best=best)
  return export(
    out,
    tokenizer_fields=fields_lib.module_fields(ex.tokenizer),
    tokenizer_variables=ex.tokenizer_variables,
    transformer_fields=fields_lib.module_fields(ex.transformer),
    transformer_params=ex.transformer_params,
    image_size=ex.meta["image_size"],
    meta=ex.meta["meta"],
    overwrite=overwrite,
  )


def load_baseline(
  workdir: str | os.PathLike, *, best: bool = True
) -> inference.BaselineReconstructor:
  """An `inference.BaselineReconstructor` of a baseline training workdir (`stages/baseline.py`).

  The module is rebuilt from the run's `config.json` (`model_name`, `model`) and its params are
  read from the best checkpoint (newest periodic where none was kept, or with `best=False`),
  shapes checked first.

  Raises:
    FileNotFoundError: A missing workdir, config.json or checkpoint.
    ValueError: A config that is not a baseline run's or does not build its model, or stored
      params that do not match it (names the parameter path).
  """
  workdir = os.path.abspath(os.path.expanduser(os.fspath(workdir)))
  config = checkpointing.read_run_config(workdir)
  where = os.path.join(workdir, "config.json")
  if config.get("stage") != BASELINE_STAGE:
    raise ConfigError(f"{where}: stage {config.get('stage')!r} is not a baseline run")
  size = (config.get("data") or {}).get("image_size")
  if not isinstance(size, int) or size <= 0:
    raise ConfigError(f"{where}: config.data.image_size must be a positive int, got {size!r}")
  if not isinstance(config.get("model"), dict):
    raise ConfigError(f"{where}: missing field config.model (a JSON object)")
  single_coil = bool((config.get("data") or {}).get("single_coil"))
  model = inference.make_baseline(
    str(config.get("model_name")),
    config["model"],
    f"{where}: config.model",
    single_coil=single_coil,
  )
  ckpt = checkpointing.find_checkpoint(workdir, best=best, field="baseline workdir")
  abstract = jax.eval_shape(lambda: inference.init_baseline(model, jax.random.key(0), size))
  params = checkpointing.restore_checkpoint(
    ckpt,
    {"params": abstract},
    to_host=True,
    what=f"{workdir} ({ckpt.describe()}): the stored params do not match config.model of {where}",
  )["params"]
  return inference.BaselineReconstructor(model, _to_device(params), single_coil=single_coil)


def load_reconstructor(
  source: str | os.PathLike,
  tokenizer_from: str | os.PathLike | None = None,
  *,
  best: bool = True,
  sampling: inference.SamplingConfig = inference.ARGMAX,
) -> inference.Reconstructor | inference.BaselineReconstructor:
  """An `inference.Reconstructor` from an export folder or a stage-2/3 training workdir, or an
  `inference.BaselineReconstructor` from a baseline workdir (told apart by its `config.json`).

  Args:
    source: An export written by `export`, or a workdir holding `config.json` (its best
      checkpoint is used, or its newest periodic one with `best=False`).
    tokenizer_from: Stage-1 workdir overriding the one a workdir's config.json names; exports
      carry their tokenizer and baselines have none, so it is ignored for them.
    best: For a workdir, read its best checkpoints (newest periodic where none was kept).
    sampling: The reconstructor's default token selection.

  Raises:
    FileNotFoundError: If `source` does not exist.
    ValueError: As `load_export`, `load_workdirs` and `load_baseline`.
  """
  path = os.path.expanduser(os.fspath(source))
  if not os.path.exists(path):
    raise MissingInputError(f"{source}: no such stage-2/3 workdir or export folder")
  if os.path.isfile(os.path.join(path, "config.json")):
    if checkpointing.read_run_config(path).get("stage") == BASELINE_STAGE:
      return load_baseline(path, best=best)
    ex = load_workdirs(path, tokenizer_from or None, best=best)
  else:
    if tokenizer_from:
      logging.info("%s is an export with its own tokenizer; tokenizer_from is ignored", source)
    ex = load_export(path)
  return inference.Reconstructor(
    ex.tokenizer, ex.tokenizer_variables, ex.transformer, ex.transformer_params, sampling
  )


# ------------------------------------------------------------------------------------------------
# Command line


def describe(record: Mapping[str, Any]) -> str:
  """A few lines summarising export metadata (sources, sizes, data conventions)."""
  meta, tr, n = record.get("meta") or {}, record["transformer"], record.get("num_params") or {}
  lines = [f"format {record['format']} v{record['version']}, image size {record['image_size']}"]
  lines.append(
    f"transformer: depth {tr.get('depth')}, width {tr.get('width')}, "
    f"{n.get('transformer', '?'):,} params"
    + (
      f" from {meta['transformer_from']} ({meta.get('transformer_checkpoint')} checkpoint, "
      f"step {meta.get('transformer_step')})"
      if "transformer_from" in meta
      else ""
    )
  )
  lines.append(
    f"tokenizer: vocab {record['tokenizer'].get('vocab_size')}, "
    f"{n.get('tokenizer', '?'):,} params"
    + (
      f" from {meta['tokenizer_from']} ({meta.get('tokenizer_checkpoint')} checkpoint, "
      f"step {meta.get('tokenizer_step')})"
      if "tokenizer_from" in meta
      else ""
    )
  )
  data = record.get("data") or {}
  lines.append(
    f"data: norm {data.get('norm')} ({data.get('builder_config')}), families "
    f"{data.get('mask_families')}"
  )
  return "\n".join(lines)


def _main(argv) -> None:
  from absl import app, flags, logging

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  # Orbax logs every file operation at INFO; --verbosity still brings it back.
  if not f["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  try:
    path = export_from_workdirs(
      f.out,
      transformer_from=f.transformer_from,
      tokenizer_from=f.tokenizer_from or None,
      best=not f.latest,
      overwrite=f.overwrite,
    )
  except (SetupError, FileExistsError) as e:
    raise SystemExit(f"nextaccel_jax.export: {e}") from e
  print(f"wrote {path}\n{describe(read_meta(path))}")


def _define_flags() -> None:
  # Defined only when run as a script, so importing this module never registers flags.
  from absl import flags

  flags.DEFINE_string("transformer_from", None, "Stage-2/3 workdir (holds config.json).")
  flags.DEFINE_string("out", None, "Export directory to write.")
  flags.DEFINE_string(
    "tokenizer_from", None, "Stage-1 workdir; default: the one recorded in config.json."
  )
  flags.DEFINE_bool("latest", False, "Use the newest periodic checkpoints instead of the best.")
  flags.DEFINE_bool("overwrite", False, "Replace an existing export at --out.")
  flags.mark_flags_as_required(["transformer_from", "out"])


if __name__ == "__main__":
  from absl import app

  _define_flags()
  app.run(_main, argv=sys.argv)


__all__ = (
  "FORMAT",
  "VERSION",
  "Exported",
  "builder_norm",
  "data_conventions",
  "describe",
  "export",
  "export_from_workdirs",
  "load_baseline",
  "load_export",
  "load_reconstructor",
  "load_workdirs",
  "read_meta",
)
