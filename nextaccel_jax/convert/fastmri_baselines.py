"""fastMRI U-Net / E2E-VarNet state dicts → Orbax checkpoints of `models.unet` / `models.varnet`.

  python -m nextaccel_jax.convert.fastmri_baselines --kind=unet --ckpt=unet.pt --out=runs/unet0
  python -m nextaccel_jax.convert.fastmri_baselines --kind=varnet --ckpt=varnet.pt \\
      --out=runs/varnet0

The checkpoint is a fastMRI `state_dict` (a Lightning `.ckpt` whose `state_dict` keys carry a
`unet.` or `varnet.` prefix works too, see `strip_prefix`); reading a torch file needs PyTorch,
an `.npz` of the same keys does not (`convert.checkpoints.load_state_dict`). The model sizes are
read off the weight shapes. The Flax parameter paths mirror the torch keys, an integer segment
joined to the name before it with `_` (`down_sample_layers.0.layers.4.weight` →
`down_sample_layers_0/layers_4/kernel`), so the mapping is mechanical: a conv weight
(O, I, kh, kw) and a transposed-conv weight (I, O, kh, kw) both become a kernel by the transpose
(2, 3, 1, 0), `bias` and `dc_weight` are copied. Every torch key must fill exactly one Flax leaf
and every leaf must be filled; anything else is an error that names the key and the shapes.
The output holds `{"params": ...}` as step 0, with the model's fields in the metadata.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from nextaccel_jax.convert import checkpoints
from nextaccel_jax.models import fields as fields_lib
from nextaccel_jax.models import layers, unet, varnet

KINDS = ("unet", "varnet")
# Torch leaf name → Flax leaf name.
_LEAVES = {"weight": "kernel", "bias": "bias", "dc_weight": "dc_weight"}
_INDEXED = re.compile(r"^(.*?)((?:_\d+)+)$")


def torch_key(path: tuple[str, ...]) -> str:
  """The torch key of a Flax leaf path: `("up_conv_3_0", "layers_0", "kernel")` →
  `"up_conv.3.0.layers.0.weight"` (the inverse of `layers.torch_key_path`)."""
  *modules, leaf = path
  parts = []
  for name in modules:
    m = _INDEXED.match(name)
    parts.append(m.group(1) + m.group(2).replace("_", ".") if m else name)
  inverse = {v: k for k, v in _LEAVES.items()}
  return ".".join([*parts, inverse.get(leaf, leaf)])


def _torch_shape(flax_shape) -> tuple[int, ...]:
  """The torch shape of a Flax leaf: a 4-D kernel undoes the transpose (2, 3, 1, 0)."""
  shape = tuple(flax_shape)
  return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape


def _converted(key: str, arr: np.ndarray) -> tuple[tuple[str, ...], np.ndarray]:
  path, leaf = layers.torch_key_path(key)
  if leaf not in _LEAVES:
    return (*path, leaf), arr
  if leaf == "weight" and arr.ndim == 4:
    arr = arr.transpose(2, 3, 1, 0)
  return (*path, _LEAVES[leaf]), arr


def params_from_state_dict(
  state_dict: Mapping[str, np.ndarray], target: Mapping[str, Any], where: str = "state dict"
) -> dict[str, Any]:
  """Fills the Flax `params` tree `target` from fastMRI torch keys (module docstring).

  Args:
    state_dict: torch key → array, without any wrapper prefix.
    target: the model's `params` (arrays or `jax.ShapeDtypeStruct`s); the result has its
      structure, shapes and dtypes.
    where: what to name in error messages (e.g. the file).

  Raises:
    KeyError: torch keys that fill no Flax leaf, or Flax leaves that no torch key fills; each is
      named (with the torch key the leaf expects).
    ValueError: a torch array whose shape does not fit its leaf; names the key, the torch shape,
      the expected torch shape and the Flax leaf.
  """
  flat_target = traverse_util.flatten_dict(dict(target))
  filled: dict[tuple[str, ...], jax.Array] = {}
  unexpected = []
  for key, value in state_dict.items():
    arr = np.asarray(value)
    path, converted = _converted(key, arr)
    if path not in flat_target:
      unexpected.append(key)
      continue
    ref = flat_target[path]
    if tuple(converted.shape) != tuple(ref.shape):
      raise ValueError(
        f"{where}: {key} has shape {tuple(arr.shape)}, the model expects "
        f"{_torch_shape(ref.shape)} (Flax {'/'.join(path)} {tuple(ref.shape)}); do the model "
        "sizes match the checkpoint?"
      )
    filled[path] = jnp.asarray(converted, dtype=ref.dtype)
  missing = [p for p in flat_target if p not in filled]
  problems = []
  if unexpected:
    problems.append(f"torch keys the model has no parameter for: {sorted(unexpected)}")
  if missing:
    names = sorted(
      f"{torch_key(p)} {_torch_shape(flat_target[p].shape)} (Flax {'/'.join(p)})" for p in missing
    )
    problems.append(f"model parameters missing from the checkpoint: {names}")
  if problems:
    raise KeyError(f"{where}: " + "; ".join(problems))
  return traverse_util.unflatten_dict(filled)


def strip_prefix(state_dict: Mapping[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
  """`state_dict` without `prefix` on its keys when every key carries it (a Lightning module's
  `unet.`/`varnet.`), unchanged otherwise."""
  if state_dict and all(k.startswith(prefix) for k in state_dict):
    return {k[len(prefix) :]: v for k, v in state_dict.items()}
  return dict(state_dict)


def _shape(state_dict: Mapping[str, np.ndarray], key: str, where: str) -> tuple[int, ...]:
  if key not in state_dict:
    raise KeyError(f"{where}: {key} is missing; is this a fastMRI checkpoint of that model?")
  return tuple(np.shape(state_dict[key]))


def _count(state_dict: Mapping[str, np.ndarray], pattern: str) -> int:
  found = {m.group(1) for k in state_dict if (m := re.match(pattern, k))}
  return len(found)


def unet_fields(
  state_dict: Mapping[str, np.ndarray], prefix: str = "", where: str = "state dict"
) -> dict[str, int]:
  """`in_chans`, `out_chans`, `chans`, `num_pool_layers` of a U-Net read off its weight shapes."""
  n = _count(state_dict, rf"^{re.escape(prefix)}down_sample_layers\.(\d+)\.")
  if n == 0:
    raise KeyError(f"{where}: no {prefix}down_sample_layers.* keys; is this a fastMRI U-Net?")
  first = _shape(state_dict, f"{prefix}down_sample_layers.0.layers.0.weight", where)
  last = _shape(state_dict, f"{prefix}up_conv.{n - 1}.1.weight", where)
  return dict(in_chans=first[1], out_chans=last[0], chans=first[0], num_pool_layers=n)


def varnet_fields(state_dict: Mapping[str, np.ndarray], where: str = "state dict") -> dict:
  """`VarNet` sizes read off the weight shapes (`estimate_sens` from the presence of `sens_net`)."""
  num_cascades = _count(state_dict, r"^cascades\.(\d+)\.")
  if num_cascades == 0:
    raise KeyError(f"{where}: no cascades.* keys; is this a fastMRI VarNet?")
  cascade = unet_fields(state_dict, "cascades.0.model.unet.", where)
  out = dict(num_cascades=num_cascades, chans=cascade["chans"], pools=cascade["num_pool_layers"])
  if any(k.startswith("sens_net.") for k in state_dict):
    sens = unet_fields(state_dict, "sens_net.norm_unet.unet.", where)
    out.update(sens_chans=sens["chans"], sens_pools=sens["num_pool_layers"])
  else:
    out["estimate_sens"] = False
  return out


def _abstract_params(model, *args) -> dict:
  return jax.eval_shape(model.init, jax.random.key(0), *args)["params"]


def unet_from_state_dict(
  state_dict: Mapping[str, np.ndarray], where: str = "state dict", **overrides
) -> tuple[unet.Unet, dict]:
  """`(model, {"params": ...})` of a fastMRI `Unet` state dict; sizes from the shapes, then
  `overrides` (e.g. `dtype`, `drop_prob`)."""
  sd = strip_prefix(state_dict, "unet.")
  model = unet.from_fields({**unet_fields(sd, where=where), **overrides}, where)
  side = 2**model.num_pool_layers
  target = _abstract_params(model, jnp.zeros((1, side, side, model.in_chans)))
  return model, {"params": params_from_state_dict(sd, target, where)}


def varnet_from_state_dict(
  state_dict: Mapping[str, np.ndarray], where: str = "state dict", **overrides
) -> tuple[varnet.VarNet, dict]:
  """`(model, {"params": ...})` of a fastMRI `VarNet` state dict; sizes from the shapes, then
  `overrides` (e.g. `dtype`, `mask_center`)."""
  sd = strip_prefix(state_dict, "varnet.")
  model = varnet.from_fields({**varnet_fields(sd, where), **overrides}, where)
  # NormUnet pads to multiples of 16; deeper U-Nets need a larger grid.
  side = max(varnet.PAD_MULTIPLE, 2 ** max(model.pools, model.sens_pools))
  k = jnp.zeros((1, 1, side, side, 2))
  target = _abstract_params(model, k, jnp.ones((side, side), bool))
  return model, {"params": params_from_state_dict(sd, target, where)}


def convert_file(kind: str, ckpt: str | os.PathLike, out: str | os.PathLike) -> dict:
  """Converts the fastMRI checkpoint `ckpt` of `kind` into `out`.

  Returns:
    `{"model": the model's fields, "num_params": its parameter count}`.
  """
  if kind not in KINDS:
    raise ValueError(f"kind={kind!r}: choose one of {KINDS}")
  convert = unet_from_state_dict if kind == "unet" else varnet_from_state_dict
  model, variables = convert(checkpoints.load_state_dict(ckpt), where=str(ckpt))
  model_fields = fields_lib.to_json(model)
  checkpoints.save_variables(
    variables,
    out,
    {"source": str(ckpt), "kind": kind, "model": model_fields},
  )
  return {"model": model_fields, "num_params": layers.count_params(variables["params"])}


def _main(argv) -> None:
  from absl import app, flags, logging

  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  f = flags.FLAGS
  # Orbax logs every file operation at INFO; --verbosity still brings it back.
  if not f["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  try:
    summary = convert_file(f.kind, f.ckpt, f.out)
  except (FileNotFoundError, KeyError, ValueError) as e:
    # A KeyError's str() is the repr of its message; its argument reads better.
    message = e.args[0] if isinstance(e, KeyError) and e.args else e
    raise SystemExit(f"nextaccel_jax.convert.fastmri_baselines: {message}") from e
  print(f"{f.kind}: {summary['num_params']:,} parameters, fields {summary['model']}")
  print(f"wrote {f.out}")


def _define_flags() -> None:
  # Defined only when run as a script, so importing this module never registers flags.
  from absl import flags

  flags.DEFINE_enum("kind", None, list(KINDS), "Which fastMRI model the checkpoint holds.")
  flags.DEFINE_string("ckpt", None, "fastMRI state dict (.pt/.pth/.ckpt, or .npz of its keys).")
  flags.DEFINE_string("out", None, "Output Orbax checkpoint directory.")
  flags.mark_flags_as_required(["kind", "ckpt", "out"])


if __name__ == "__main__":
  from absl import app

  _define_flags()
  app.run(_main, argv=sys.argv)
