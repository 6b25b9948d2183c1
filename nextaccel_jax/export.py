"""Inference exports: one Orbax directory with everything `Reconstructor` needs, nothing else.

  # From the workdirs of a training run (best checkpoints; --latest for the newest periodic one):
  python -m nextaccel_jax.export --transformer_from=runs/distill --out=runs/export \
      [--tokenizer_from=runs/aqvae] [--latest] [--overwrite]

  rec = inference.Reconstructor.from_export("runs/export")
  x_hat_BHW2 = rec.reconstruct(x_r32_BHW2, family_B)

`export` writes one from in-memory models, `export_from_workdirs` from training workdirs;
`load_export` and `load_workdirs` return the same `Exported` (modules, variables, metadata).

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
import os
import shutil
import sys
import uuid
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from nextaccel_jax.data import masks, transforms
from nextaccel_jax.models import aqvae as aqvae_lib
from nextaccel_jax.models import transformer as transformer_lib

FORMAT = "nextaccel_jax.export"
VERSION = 1
SUPPORTED_VERSIONS = (1,)

_TOKENIZER = "tokenizer"
_TRANSFORMER = "transformer"
_META = "export"
# Module fields that hold dtypes: stored as their names, e.g. "bfloat16".
_DTYPE_FIELDS = ("dtype", "param_dtype")
# Dataclass fields of every Flax module that are not configuration.
_MODULE_INTERNALS = ("parent", "name")

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
# Module fields <-> JSON


def module_fields(module) -> dict[str, Any]:
  """The configuration fields of a Flax module: the kwargs that rebuild it."""
  return {
    f.name: getattr(module, f.name)
    for f in dataclasses.fields(module)
    if f.name not in _MODULE_INTERNALS
  }


def _tuplify(value):
  if isinstance(value, list | tuple):
    return tuple(_tuplify(v) for v in value)
  if isinstance(value, Mapping):
    return {k: _tuplify(v) for k, v in value.items()}
  return value


def _listify(value):
  if isinstance(value, list | tuple):
    return [_listify(v) for v in value]
  if isinstance(value, Mapping):
    return {str(k): _listify(v) for k, v in value.items()}
  if isinstance(value, np.generic):
    return value.item()
  return value


def _build_module(cls, fields: Mapping[str, Any], where: str):
  """`cls(**fields)`, lists as tuples and dtype names as dtypes; errors name `where`."""
  valid = {f.name for f in dataclasses.fields(cls)} - set(_MODULE_INTERNALS)
  unknown = sorted(set(fields) - valid)
  if unknown:
    raise ValueError(
      f"{where}: {', '.join(map(repr, unknown))} {'is' if len(unknown) == 1 else 'are'} not "
      f"{'a field' if len(unknown) == 1 else 'fields'} of {cls.__name__}; valid fields: "
      f"{', '.join(sorted(valid))}"
    )
  kwargs = {}
  for name, value in fields.items():
    value = _tuplify(value)
    if name in _DTYPE_FIELDS and value is not None:
      try:
        value = jnp.dtype(value)
      except TypeError as e:
        raise ValueError(f"{where}: {name}={value!r} is not a dtype") from e
    kwargs[name] = value
  return cls(**kwargs)


def fields_to_json(module) -> dict[str, Any]:
  """Every configuration field of `module` as JSON values (dtype names, lists for sequences).

  Raises:
    ValueError: if a field does not survive JSON, i.e. `module_from_json` would not rebuild an
      equal module.
  """
  out = {}
  for name, value in module_fields(module).items():
    if name in _DTYPE_FIELDS and value is not None:
      value = jnp.dtype(value).name
    out[name] = _listify(value)
  where = f"{type(module).__name__} fields"
  try:
    rebuilt = _build_module(type(module), json.loads(json.dumps(out)), where)
  except TypeError as e:
    raise ValueError(f"{where} cannot be stored as JSON: {e}") from e
  if rebuilt != module:
    changed = [n for n, v in module_fields(module).items() if getattr(rebuilt, n) != v]
    raise ValueError(f"{where} do not survive JSON: {', '.join(changed)}")
  return out


def module_from_json(cls, fields: Mapping[str, Any], where: str = ""):
  """Rebuilds a module of class `cls` from `fields_to_json` output.

  Args:
    cls: `AQVAE` or `NextAccelTransformer` (any Flax module class).
    fields: the JSON fields.
    where: what to name in error messages (e.g. the export path and item).
  """
  return _build_module(cls, fields, where or f"{cls.__name__} fields")


def transformer_kwargs(model_fields: Mapping[str, Any], tokenizer_fields: Mapping[str, Any]):
  """Completes transformer fields the way `stages.transformer.make_model` does.

  The context encoder's sizes, `vocab_size`, `z_channels` and `patch_nums` come from the
  tokenizer (`context_encoder_fields`); fields already present must agree with it. `dtype` may be
  a name; `param_dtype` defaults to float32.

  Raises:
    ValueError: if a given field disagrees with the tokenizer (names the field).
  """
  fields = dict(_tuplify(dict(model_fields)))
  derived = transformer_lib.context_encoder_fields(dict(_tuplify(dict(tokenizer_fields))))
  for name, value in derived.items():
    if name in fields and _tuplify(fields[name]) != _tuplify(value):
      raise ValueError(
        f"transformer field {name}={fields[name]!r} disagrees with the tokenizer, which gives "
        f"{value!r}"
      )
    fields[name] = value
  if fields.get("dtype") is not None:
    fields["dtype"] = jnp.dtype(fields["dtype"])
  fields.setdefault("param_dtype", jnp.float32)
  return fields


# ------------------------------------------------------------------------------------------------
# Shapes


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


def _shapes(tree) -> dict[str, tuple[int, ...]]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_path_str(path): tuple(getattr(x, "shape", np.shape(x))) for path, x in leaves}


def _check_shapes(actual, expected, what: str) -> None:
  """Raises a ValueError naming the paths where `actual` and `expected` differ in shape."""
  got, want = _shapes(actual), _shapes(expected)
  problems = [f"{p} missing (expected {want[p]})" for p in want if p not in got]
  problems += [f"{p} unexpected (shape {got[p]})" for p in got if p not in want]
  problems += [
    f"{p} has shape {got[p]}, expected {want[p]}" for p in want if p in got and got[p] != want[p]
  ]
  if problems:
    shown = "; ".join(problems[:6])
    more = f"; and {len(problems) - 6} more" if len(problems) > 6 else ""
    raise ValueError(f"{what}: {shown}{more}")


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


def _host_restore_args(abstract):
  return jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), abstract)


def _to_device(tree):
  # Uncommitted arrays, like `jnp.asarray` of host data: a restore onto a fixed device would
  # commit them there, and jit compiles committed arguments as a different program.
  return jax.tree.map(jnp.asarray, tree)


def _count(tree) -> int:
  return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))


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
    raise ValueError(f"norm must be one of {', '.join(NORM_DESCRIPTIONS)} or None, got {norm!r}")
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
    raise ValueError(f"{what} must be JSON-serialisable: {e}") from e


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
    raise ValueError(f"meta['norm']: {e}") from e
  return {
    "format": FORMAT,
    "version": VERSION,
    "image_size": int(image_size),
    "tokenizer": fields_to_json(tokenizer),
    "transformer": fields_to_json(transformer),
    "num_params": {
      "tokenizer": _count(tokenizer_variables["params"]),
      "transformer": _count(transformer_params),
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
    raise ValueError(f"image_size must be a positive int, got {image_size!r}")
  tokenizer = module_from_json(aqvae_lib.AQVAE, dict(tokenizer_fields), "tokenizer_fields")
  try:
    kwargs = transformer_kwargs(transformer_fields, module_fields(tokenizer))
  except ValueError as e:
    raise ValueError(f"transformer_fields: {e}") from e
  transformer = module_from_json(transformer_lib.NextAccelTransformer, kwargs, "transformer_fields")
  if not isinstance(tokenizer_variables, Mapping) or not {"params", "vq_ema"} <= set(
    tokenizer_variables
  ):
    got = list(tokenizer_variables) if isinstance(tokenizer_variables, Mapping) else "no mapping"
    raise ValueError(f'tokenizer_variables must hold "params" and "vq_ema", got {got}')
  tok_vars = {k: tokenizer_variables[k] for k in ("params", "vq_ema")}
  params = _bare_params(transformer_params)
  _check_shapes(
    tok_vars,
    _abstract_tokenizer(tokenizer, int(image_size)),
    "tokenizer_variables do not match tokenizer_fields",
  )
  _check_shapes(
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
    tokenizer_fields: `AQVAE` kwargs (e.g. `module_fields(tokenizer)`, or `config.tokenizer` of a
      training run with the dtype overrides of `stages.transformer.make_tokenizer`).
    tokenizer_variables: the tokenizer's `{"params", "vq_ema"}` (other collections are dropped).
    transformer_fields: `NextAccelTransformer` kwargs, e.g. `module_fields(model)` or
      `config.model`; missing context-encoder fields are derived from the tokenizer as
      `stages.transformer.make_model` does.
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
    raise ValueError("export runs in a single process (it writes host copies of the arrays)")
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
    raise FileNotFoundError(f"export {path}: no such directory")
  if not os.path.isdir(os.path.join(path, _META)):
    hint = (
      " (it looks like a training workdir: use export_from_workdirs or Reconstructor.from_workdirs)"
      if _looks_like_workdir(path)
      else ""
    )
    raise ValueError(
      f"{path} is not a nextaccel_jax export: it has no '{_META}' metadata item{hint}"
    )
  with _checkpointer() as ckptr:
    try:
      record = ckptr.restore(path, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()}))
    except (ValueError, FileNotFoundError, json.JSONDecodeError) as e:
      raise ValueError(f"{path} is not a readable nextaccel_jax export: {e}") from e
  record = record[_META]
  if not isinstance(record, Mapping) or record.get("format") != FORMAT:
    got = record.get("format") if isinstance(record, Mapping) else type(record).__name__
    raise ValueError(f"{path} is not a nextaccel_jax export: format {got!r}, expected {FORMAT!r}")
  version = record.get("version")
  if version not in SUPPORTED_VERSIONS:
    raise ValueError(
      f"export {path} has format version {version!r}; this nextaccel_jax reads version(s) "
      f"{', '.join(map(str, SUPPORTED_VERSIONS))}"
    )
  for key in ("image_size", "tokenizer", "transformer"):
    if key not in record:
      raise ValueError(f"export {path}: metadata lacks {key!r}")
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
  tokenizer = module_from_json(aqvae_lib.AQVAE, record["tokenizer"], f"export {path}: tokenizer")
  transformer = module_from_json(
    transformer_lib.NextAccelTransformer, record["transformer"], f"export {path}: transformer"
  )
  want_tok = _abstract_tokenizer(tokenizer, image_size)
  want_tr = {"params": _abstract_transformer(transformer, image_size)}
  with _checkpointer() as ckptr:
    stored = ckptr.metadata(path).item_metadata
    for item, want in ((_TOKENIZER, want_tok), (_TRANSFORMER, want_tr)):
      tree = stored[item] if item in stored.keys() else None
      if tree is None:
        raise ValueError(f"export {path}: the '{item}' item is missing")
      _check_shapes(tree.tree, want, f"export {path}: '{item}' arrays do not match its fields")
    restored = ckptr.restore(
      path,
      args=ocp.args.Composite(
        **{
          _TOKENIZER: ocp.args.PyTreeRestore(restore_args=_host_restore_args(want_tok)),
          _TRANSFORMER: ocp.args.PyTreeRestore(restore_args=_host_restore_args(want_tr)),
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


@dataclasses.dataclass(frozen=True)
class _Checkpoint:
  workdir: str
  directory: str
  kind: str
  step: int
  stored: Any
  meta: dict


def _manager(directory: str):
  options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
  handlers = {"meta": ocp.JsonCheckpointHandler(), "state": ocp.PyTreeCheckpointHandler()}
  return ocp.CheckpointManager(directory, options=options, item_handlers=handlers)


def _find_checkpoint(workdir: str, best: bool, flag: str) -> _Checkpoint:
  """The checkpoint to read: best (if asked and kept), else the newest periodic one.

  A folder without `best/` or `checkpoints/` is read as an Orbax manager folder itself.
  """
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"{flag}={workdir}: no such directory")
  best_dir = os.path.join(workdir, "best")
  periodic_dir = os.path.join(workdir, "checkpoints")
  if os.path.isdir(best_dir) or os.path.isdir(periodic_dir):
    candidates = ([("best", best_dir)] if best else []) + [("latest", periodic_dir)]
  else:
    candidates = [("latest", workdir)]
  for kind, directory in candidates:
    if not os.path.isdir(directory):
      continue
    with _manager(directory) as manager:
      steps = sorted(manager.all_steps())
      if not steps:
        continue
      step = steps[-1]
      stored = manager.item_metadata(step)
      if "state" not in stored.keys() or stored["state"] is None:
        raise ValueError(f"{flag}={workdir}: the checkpoint at {directory}/{step} has no 'state'")
      try:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      except (ValueError, KeyError, FileNotFoundError):
        meta = None
    return _Checkpoint(workdir, directory, kind, step, stored["state"].tree, dict(meta or {}))
  looked = ", ".join(d for _, d in candidates)
  raise FileNotFoundError(f"{flag}={workdir}: no checkpoint (looked in {looked})")


def _restore_subtree(ckpt: _Checkpoint, abstract, what: str):
  """Checks the stored shapes against `abstract` (a subtree of the state), then restores it."""
  stored = ckpt.stored
  missing = [k for k in abstract if not isinstance(stored, Mapping) or k not in stored]
  if missing:
    raise ValueError(
      f"{what}: the checkpoint state at {ckpt.directory}/{ckpt.step} has no "
      f"{', '.join(map(repr, missing))}"
    )
  _check_shapes({k: stored[k] for k in abstract}, abstract, what)
  args = ocp.args.PyTreeRestore(
    item=abstract, restore_args=_host_restore_args(abstract), partial_restore=True
  )
  with _manager(ckpt.directory) as manager:
    restored = manager.restore(ckpt.step, args=ocp.args.Composite(state=args))
  return _to_device(restored["state"])


def _read_config(workdir: str) -> tuple[dict, str]:
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"transformer_from={workdir}: no config.json at {path} (a stage-2/3 training workdir "
      "writes one)"
    )
  try:
    with open(path, encoding="utf-8") as f:
      config = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON: {e}") from e
  if not isinstance(config, dict):
    raise ValueError(f"{path}: expected a JSON object, got {type(config).__name__}")
  if config.get("stage") == "aqvae":
    raise ValueError(
      f"{path}: stage 'aqvae' is the tokenizer; transformer_from wants a stage-2/3 workdir "
      "(pass the stage-1 workdir as tokenizer_from)"
    )
  for key in ("model", "tokenizer"):
    if not isinstance(config.get(key), dict):
      raise ValueError(f"{path}: missing field config.{key} (a JSON object)")
  size = (config.get("data") or {}).get("image_size")
  if not isinstance(size, int) or size <= 0:
    raise ValueError(f"{path}: config.data.image_size must be a positive int, got {size!r}")
  return config, path


def _make_modules(config: dict, config_path: str):
  """The tokenizer and transformer exactly as the training stage builds them."""
  # Imported here: the stage pulls in the data pipeline and metrics, which loading an export
  # never needs.
  from nextaccel_jax.stages import transformer as stage

  cfg = ml_collections.ConfigDict(
    {"model": _tuplify(config["model"]), "tokenizer": _tuplify(config["tokenizer"])}
  )
  try:
    tokenizer = stage.make_tokenizer(cfg)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{config_path}: config.tokenizer does not build an AQVAE: {e}") from e
  try:
    transformer = stage.make_model(cfg)
  except (TypeError, ValueError) as e:
    raise ValueError(
      f"{config_path}: config.model does not build a NextAccelTransformer: {e}"
    ) from e
  return tokenizer, transformer


def _builder_norm(name) -> str | None:
  """The `norm` of a named `fastmri_brain_multiscale` builder config (None if unknown)."""
  if not name:
    return None
  from nextaccel_jax.data import fastmri_brain_multiscale as fbm

  for cfg in fbm.BUILDER_CONFIGS:
    if cfg.name == name:
      return cfg.norm
  return None


def _resolve_tokenizer_from(tokenizer_from, config, config_path, meta) -> str:
  if tokenizer_from:
    path = os.path.abspath(os.path.expanduser(os.fspath(tokenizer_from)))
    if not os.path.isdir(path):
      raise FileNotFoundError(f"tokenizer_from={path}: no such directory (a stage-1 workdir)")
    return path
  recorded = [p for p in (config.get("tokenizer_from"), meta.get("tokenizer_from")) if p]
  if not recorded:
    raise ValueError(
      f"{config_path} records no tokenizer_from: pass the stage-1 workdir as tokenizer_from "
      "(--tokenizer_from)"
    )
  # config.json keeps the path as given (relative to the training job's cwd); the checkpoint's
  # metadata keeps it absolute.
  tried = []
  for p in recorded:
    path = os.path.abspath(os.path.expanduser(p))
    if os.path.isdir(path):
      return path
    tried.append(path)
  raise FileNotFoundError(
    f"tokenizer workdir not found: {config_path} records tokenizer_from={recorded[0]!r} "
    f"(tried {', '.join(dict.fromkeys(tried))}); pass tokenizer_from (--tokenizer_from)"
  )


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
    raise FileNotFoundError(f"transformer_from={workdir}: no such directory (a stage-2/3 workdir)")
  config, config_path = _read_config(workdir)
  image_size = int(config["data"]["image_size"])
  tokenizer, transformer = _make_modules(config, config_path)
  t_ckpt = _find_checkpoint(workdir, best, "transformer_from")
  tok_dir = _resolve_tokenizer_from(tokenizer_from, config, config_path, t_ckpt.meta)
  k_ckpt = _find_checkpoint(tok_dir, best, "tokenizer_from")

  where = f"transformer_from={workdir} ({t_ckpt.kind} checkpoint, step {t_ckpt.step})"
  params = _restore_subtree(
    t_ckpt,
    {"params": _abstract_transformer(transformer, image_size)},
    f"{where}: the stored params do not match config.model of {config_path}",
  )["params"]
  where = f"tokenizer_from={tok_dir} ({k_ckpt.kind} checkpoint, step {k_ckpt.step})"
  tok_vars = _restore_subtree(
    k_ckpt,
    _abstract_tokenizer(tokenizer, image_size),
    f"{where}: the stored tokenizer does not match config.tokenizer of {config_path}",
  )
  data = config.get("data") or {}
  builder_config = data.get("builder_config")
  meta = {
    "norm": _builder_norm(builder_config),
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
    tokenizer_fields=module_fields(ex.tokenizer),
    tokenizer_variables=ex.tokenizer_variables,
    transformer_fields=module_fields(ex.transformer),
    transformer_params=ex.transformer_params,
    image_size=ex.meta["image_size"],
    meta=ex.meta["meta"],
    overwrite=overwrite,
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
  except (FileNotFoundError, FileExistsError, ValueError) as e:
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
  "data_conventions",
  "describe",
  "export",
  "export_from_workdirs",
  "fields_to_json",
  "load_export",
  "load_workdirs",
  "module_fields",
  "module_from_json",
  "read_meta",
  "transformer_kwargs",
)
