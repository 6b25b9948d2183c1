"""Initialises the next-acceleration-scale transformer from VAR's `var_d16.pth` (var_spec.md §3.2,
§6.6).

  python -m nextaccel_jax.convert.var_transformer --var=var_d16.pth \\
      --target=runs/transformer_init --out=runs/var_d16_transformer

VAR's self-attention blocks, FFNs, adaLN layers, `word_embed` and output head have the same
parameters as ours (paths differ only in `blocks.{i}` → `blocks_{i}`, `ada_lin.1` → `ada_lin`, and
Linear weights are transposed). What VAR does not have keeps the target's values: the
cross-attention (whose output projection is zeroed by default, so the converted model starts as
VAR's model plus a context that has no effect yet), the context encoder, and the tables whose
shape follows our sequence (`pos_1LC`, `lvl_embed`; VAR's `pos_start` has no counterpart).
`class_emb` rows are copied only for the VAR classes named in `class_rows`.

Reading the `.pth` file needs PyTorch; the conversion itself works on numpy arrays.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from flax import traverse_util

from nextaccel_jax import checkpointing
from nextaccel_jax.convert import checkpoints

# VAR tables sized by VAR's own sequence (680 tokens, 10 scales): re-initialised (spec §6.6).
REINIT_TORCH_KEYS = ("pos_start", "pos_1LC", "lvl_embed.weight")
# Buffers: the level index, the attention mask and the constant zero key bias.
_BUFFER_PATTERNS = (r"lvl_1L", r"attn_bias_for_masking", r"blocks\.\d+\.attn\.zero_k_bias")


def _flax_path(torch_key: str) -> tuple[tuple[str, ...], bool] | None:
  """Our path for a VAR key and whether the array is a Linear weight (to transpose)."""
  parts = torch_key.split(".")
  if parts[0] == "class_emb":
    return None
  out: list[str] = []
  for p in parts:
    if p.isdigit():
      if out and out[-1] == "ada_lin":
        continue  # `ada_lin = Sequential(SiLU, Linear)`: index 1 is the Linear
      out[-1] = f"{out[-1]}_{p}"
    else:
      out.append(p)
  leaf = out[-1]
  if leaf == "weight":
    return (*out[:-1], "kernel"), True
  return tuple(out), False


def from_var_state_dict(
  state_dict: Mapping[str, np.ndarray],
  target_params: Mapping[str, Any],
  *,
  class_rows: Sequence[int] | None = None,
  zero_cross_proj: bool = True,
) -> tuple[dict, dict]:
  """Copies VAR's transformer weights into our parameter tree.

  Args:
    state_dict: VAR key → numpy array (`blocks.0.attn.mat_qkv.weight`, …).
    target_params: an initialised `NextAccelTransformer` params tree (bare or `{"params": …}`)
      of the same depth, width and heads; leaves VAR lacks keep these values.
    class_rows: VAR class ids whose `class_emb` rows become our mask-family embeddings (one per
      family, in order); None keeps our initialisation.
    zero_cross_proj: zero every cross-attention output projection (VAR's behaviour at step 0).

  Returns:
    `(params, report)` with params wrapped like `target_params`; report lists `filled` paths,
    `kept` (our leaves left at the target's value), `reinitialised` and `ignored_buffers` (VAR
    keys skipped on purpose) and `unused_torch_keys` (anything else VAR had).

  Raises:
    ValueError: a VAR array does not fit the target's shape (e.g. another depth or width).
  """
  wrapped = isinstance(target_params, Mapping) and "params" in target_params
  params = target_params["params"] if wrapped else target_params
  flat = {k: np.array(v) for k, v in traverse_util.flatten_dict(dict(params)).items()}
  filled: set[tuple[str, ...]] = set()
  reinit, buffers, unused = [], [], []

  for key, value in state_dict.items():
    arr = np.asarray(value, np.float32)
    if key in REINIT_TORCH_KEYS:
      reinit.append(key)
      continue
    if any(re.fullmatch(p, key) for p in _BUFFER_PATTERNS):
      buffers.append(key)
      continue
    if key == "class_emb.weight":
      if class_rows is None:
        reinit.append(key)
        continue
      path, arr = ("class_emb", "embedding"), arr[np.asarray(class_rows)]
    else:
      mapped = _flax_path(key)
      if mapped is None:
        unused.append(key)
        continue
      path, is_linear = mapped
      if is_linear:
        arr = arr.T
    if path not in flat:
      unused.append(key)
      continue
    if arr.shape != flat[path].shape:
      raise ValueError(f"{key}: shape {arr.shape} does not fit {'/'.join(path)} {flat[path].shape}")
    flat[path] = arr.astype(flat[path].dtype)
    filled.add(path)

  if zero_cross_proj:
    for path in flat:
      if "cross_attn" in path and "proj" in path:
        flat[path] = np.zeros_like(flat[path])
  out = traverse_util.unflatten_dict(flat)
  report = {
    "filled": sorted("/".join(p) for p in filled),
    "kept": sorted("/".join(p) for p in flat if p not in filled and p[0] != "context_encoder"),
    "reinitialised": sorted(reinit),
    "ignored_buffers": sorted(buffers),
    "unused_torch_keys": sorted(unused),
  }
  return ({"params": out} if wrapped else out), report


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--var", required=True, help="path to var_d16.pth")
  p.add_argument("--target", required=True, help="checkpoint with initialised {'params': ...}")
  p.add_argument("--out", required=True, help="output checkpoint directory")
  p.add_argument("--class_rows", default="", help="comma-separated VAR class ids, one per family")
  args = p.parse_args(argv)
  target = checkpointing.load_params(args.target)
  target = target["params"] if "params" in target else target
  rows = [int(r) for r in args.class_rows.split(",") if r] or None
  params, report = from_var_state_dict(
    checkpoints.load_state_dict(args.var), {"params": target}, class_rows=rows
  )
  checkpoints.save_variables(params, args.out, {"source": str(args.var), "report": report})
  print(json.dumps({k: v for k, v in report.items() if k not in ("filled", "kept")}, indent=2))
  print(f"{len(report['filled'])} leaves from VAR, {len(report['kept'])} kept; wrote {args.out}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
