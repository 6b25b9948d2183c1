"""Flax modules from plain fields and back: what configs, `config.json` and exports hold.

A module's *fields* are its dataclass attributes minus Flax's own (`parent`, `name`). Configs and
JSON carry them with sequences as lists and dtypes as names ("bfloat16"); `build` turns such a
mapping into the module (tuples and dtypes restored) and names the offending field when one is
unknown, and `to_json` is its inverse, checked to round-trip.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

# Module fields that hold dtypes: stored as their names, e.g. "bfloat16".
DTYPE_FIELDS = ("dtype", "param_dtype")
# Dataclass fields of every Flax module that are not configuration.
_MODULE_INTERNALS = ("parent", "name")


def module_fields(module) -> dict[str, Any]:
  """The configuration fields of a Flax module: the kwargs that rebuild it."""
  return {
    f.name: getattr(module, f.name)
    for f in dataclasses.fields(module)
    if f.name not in _MODULE_INTERNALS
  }


def field_names(cls) -> set[str]:
  """The configuration field names of a Flax module class."""
  return {f.name for f in dataclasses.fields(cls)} - set(_MODULE_INTERNALS)


def tuplify(value):
  """Lists (nested too, inside mappings) as tuples, the form module fields hold."""
  if isinstance(value, list | tuple):
    return tuple(tuplify(v) for v in value)
  if isinstance(value, Mapping):
    return {k: tuplify(v) for k, v in value.items()}
  return value


def _listify(value):
  if isinstance(value, list | tuple):
    return [_listify(v) for v in value]
  if isinstance(value, Mapping):
    return {str(k): _listify(v) for k, v in value.items()}
  if isinstance(value, np.generic):
    return value.item()
  return value


def build(cls, fields: Mapping[str, Any], where: str = ""):
  """`cls(**fields)` with lists as tuples and dtype names as dtypes.

  Args:
    cls: A Flax module class.
    fields: Its fields, e.g. a config section (a ConfigDict is a mapping) or JSON.
    where: What to name in error messages (e.g. "config.model" or an export path).

  Raises:
    ValueError: A field that `cls` does not have, or a dtype field that is not a dtype; the
      message names `where`, the field and the valid fields.
  """
  where = where or f"{cls.__name__} fields"
  valid = field_names(cls)
  unknown = sorted(set(fields) - valid)
  if unknown:
    raise ValueError(
      f"{where}: {', '.join(map(repr, unknown))} {'is' if len(unknown) == 1 else 'are'} not "
      f"{'a field' if len(unknown) == 1 else 'fields'} of {cls.__name__}; valid fields: "
      f"{', '.join(sorted(valid))}"
    )
  kwargs = {}
  for name, value in fields.items():
    value = tuplify(value)
    if name in DTYPE_FIELDS and value is not None:
      try:
        value = jnp.dtype(value)
      except TypeError as e:
        raise ValueError(f"{where}: {name}={value!r} is not a dtype") from e
    kwargs[name] = value
  return cls(**kwargs)


def to_json(module) -> dict[str, Any]:
  """Every configuration field of `module` as JSON values (dtype names, lists for sequences).

  Raises:
    ValueError: If a field does not survive JSON, i.e. `build` would not rebuild an equal module.
  """
  out = {}
  for name, value in module_fields(module).items():
    if name in DTYPE_FIELDS and value is not None:
      value = jnp.dtype(value).name
    out[name] = _listify(value)
  where = f"{type(module).__name__} fields"
  try:
    rebuilt = build(type(module), json.loads(json.dumps(out)), where)
  except TypeError as e:
    raise ValueError(f"{where} cannot be stored as JSON: {e}") from e
  if rebuilt != module:
    changed = [n for n, v in module_fields(module).items() if getattr(rebuilt, n) != v]
    raise ValueError(f"{where} do not survive JSON: {', '.join(changed)}")
  return out
