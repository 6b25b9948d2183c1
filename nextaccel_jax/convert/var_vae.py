"""VAR's VQ-VAE checkpoint → an Orbax checkpoint that stage 1 starts from (var_spec.md §1.7).

  python -m nextaccel_jax.convert.var_vae --vae=vae_ch160v4096z32.pth --out=runs/var_vae
  python -m nextaccel_jax.main --config=configs/aqvae.py:paper --workdir=runs/aqvae \\
      --config.init_from=runs/var_vae

The checkpoint is VAR's public `vae_ch160v4096z32.pth` (FoundationVision/VAR on the Hugging
Face hub); reading it needs PyTorch (`pip install torch`), which the package itself does not
depend on. The parameter paths of `models.aqvae.AQVAE` mirror VAR's keys, an integer segment
joined to the name before it with `_`, so the mapping is mechanical: a conv weight
(O, I, kh, kw) becomes `kernel` (kh, kw, I, O), a norm weight `scale`, the codebook goes to the
`vq_ema` collection. The conversion report lists torch keys nothing used and Flax leaves left at
their initial value; only the FiLM layers and the label embedding are expected there.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from nextaccel_jax.convert import checkpoints
from nextaccel_jax.models import aqvae, layers

# VAR buffers that carry no model state: a usage monitor of the quantizer.
IGNORED_TORCH_KEYS = ("quantize.ema_vocab_hit_SV",)


# Flax parameter leaves that have no PyTorch counterpart and keep the target's (zero) init.
_FLAX_ONLY = ("film", "label_embed")


def params_from_torch(
  state_dict: Mapping[str, np.ndarray],
  prefix: str,
  target: Mapping[str, Any],
  flax_only: Sequence[str] = _FLAX_ONLY,
) -> tuple[dict[str, Any], set[str]]:
  """Maps one sub-tree of a VAR PyTorch state dict onto a Flax parameter tree (§1.7).

  A key `prefix + "a.0.b.weight"` goes to the Flax path `a_0/b/<leaf>`: a conv weight
  (O, I, kh, kw) becomes `kernel` (kh, kw, I, O), a Linear weight (out, in) becomes `kernel`
  (in, out), a norm weight becomes `scale`, an Embedding weight becomes `embedding` unchanged;
  `bias` stays `bias`. Arrays are copied and cast to the dtype of the target leaf.

  Args:
    state_dict: torch key → array (e.g. `{k: v.numpy() for k, v in sd.items()}`).
    prefix: the sub-tree to convert, e.g. `"encoder."` or `"decoder."`; other keys are ignored.
    target: the module's `params` collection, whose structure and shapes the result follows.
      Leaves whose path has a segment in `flax_only` may be absent from torch; those keep the
      target's values, so they must be arrays (any other leaf may be a ShapeDtypeStruct).
    flax_only: path segments of Flax-only parameters (FiLM, label embedding).

  Returns:
    `(params, used_keys)`: the filled tree and the torch keys consumed.

  Raises:
    KeyError: a torch key under `prefix` has no Flax leaf, or a Flax leaf outside
      `flax_only` has no torch key.
    ValueError: shapes disagree.
  """
  flat_target = traverse_util.flatten_dict(dict(target))
  filled: dict[tuple[str, ...], jax.Array] = {}
  used: set[str] = set()
  unmapped: list[str] = []
  for key, value in state_dict.items():
    if not key.startswith(prefix):
      continue
    path, leaf = layers.torch_key_path(key[len(prefix) :])
    arr = np.array(value, copy=True)
    dest = None
    if leaf == "bias":
      dest = path + ("bias",)
    elif leaf == "weight":
      if path + ("kernel",) in flat_target:
        dest = path + ("kernel",)
        if arr.ndim == 4:
          arr = arr.transpose(2, 3, 1, 0)
        elif arr.ndim == 2:
          arr = arr.T
      elif path + ("scale",) in flat_target:
        dest = path + ("scale",)
      elif path + ("embedding",) in flat_target:
        dest = path + ("embedding",)
    if dest is None or dest not in flat_target:
      unmapped.append(key)
      continue
    ref = flat_target[dest]
    if tuple(arr.shape) != tuple(ref.shape):
      raise ValueError(f"{key}: converted shape {arr.shape} != flax {'/'.join(dest)} {ref.shape}")
    filled[dest] = jnp.asarray(arr, dtype=ref.dtype)
    used.add(key)
  if unmapped:
    raise KeyError(f"torch keys without a flax leaf: {sorted(unmapped)}")
  missing = [p for p in flat_target if p not in filled]
  unexpected = ["/".join(p) for p in missing if not set(p) & set(flax_only)]
  if unexpected:
    raise KeyError(f"flax leaves without a torch key under {prefix!r}: {sorted(unexpected)}")
  for p in missing:
    filled[p] = flat_target[p]
  return traverse_util.unflatten_dict(filled), used


def _conv_kernel(w: np.ndarray) -> np.ndarray:
  return np.array(np.transpose(np.asarray(w), (2, 3, 1, 0)))


def from_var_state_dict(state_dict: Mapping[str, np.ndarray], **model_fields):
  """Converts VAR's VQ-VAE state dict into AQ-VAE variables.

  Args:
    state_dict: VAR key names (`encoder.conv_in.weight`, `quantize.embedding.weight`, …) → numpy
      arrays (e.g. `{k: v.numpy() for k, v in torch.load(path).items()}`).
    **model_fields: `AQVAE` fields (paper size by default).

  Returns:
    `(variables, report)`: `variables = {"params", "vq_ema"}` with every array copied; `report` has
    `unused_torch_keys` (keys nothing consumed, excluding known buffers), `unfilled_leaves` (Flax
    leaves left at their initial value: only FiLM layers and the label embedding are expected) and
    `unexpected_unfilled` (the subset that is not FiLM — empty for a complete checkpoint).
  """
  sd = {k: np.asarray(v) for k, v in state_dict.items()}
  model = aqvae.AQVAE(**model_fields)
  size = aqvae.min_image_size(model.ch_mult)
  variables = jax.tree.map(np.array, aqvae.init_variables(model, jax.random.key(0), size))
  params = variables["params"]
  used: set[str] = set()
  filled: set[tuple[str, ...]] = set()

  for part in ("encoder", "decoder"):
    params[part], part_used = params_from_torch(sd, f"{part}.", params[part])
    used |= set(part_used)
    filled |= {(part, *_flax_path_of(k)) for k in part_used}

  for conv in ("quant_conv", "post_quant_conv"):
    w, b = f"{conv}.weight", f"{conv}.bias"
    if w in sd:
      params[conv] = {"kernel": _conv_kernel(sd[w]), "bias": np.array(sd[b])}
      used |= {w, b}
      filled |= {(conv, "kernel"), (conv, "bias")}

  phi = params["quantize"]["quant_resi"]
  for j in range(model.num_phi):
    w, b = f"quantize.quant_resi.qresi_ls.{j}.weight", f"quantize.quant_resi.qresi_ls.{j}.bias"
    if w in sd:
      phi[f"qresi_ls_{j}"] = {"kernel": _conv_kernel(sd[w]), "bias": np.array(sd[b])}
      used |= {w, b}
      filled |= {("quantize", "quant_resi", f"qresi_ls_{j}", "kernel")}
      filled |= {("quantize", "quant_resi", f"qresi_ls_{j}", "bias")}

  vq = variables["vq_ema"]["quantize"]
  if "quantize.embedding.weight" in sd:
    embed = np.array(sd["quantize.embedding.weight"], np.float32)
    if embed.shape != vq["embed"].shape:
      raise ValueError(
        f"quantize.embedding.weight has shape {embed.shape}, the model's codebook is "
        f"{vq['embed'].shape}; pass vocab_size/z_channels matching the checkpoint"
      )
    vq["embed"] = embed
    vq["embed_avg"] = embed.copy()
    vq["cluster_size"] = np.ones_like(vq["cluster_size"])
    used.add("quantize.embedding.weight")

  flat = traverse_util.flatten_dict(params)
  unfilled = sorted("/".join(p) for p in flat if p not in filled)
  film = [p for p in unfilled if "/film/" in f"/{p}/" or p.startswith("encoder/label_embed/")]
  report = {
    "unused_torch_keys": sorted(k for k in sd if k not in used and k not in IGNORED_TORCH_KEYS),
    "ignored_torch_keys": sorted(k for k in sd if k in IGNORED_TORCH_KEYS),
    "unfilled_leaves": unfilled,
    "unexpected_unfilled": sorted(set(unfilled) - set(film)),
  }
  return {"params": params, "vq_ema": variables["vq_ema"]}, report


def _flax_path_of(torch_key: str) -> tuple[str, ...]:
  """`encoder.down.0.block.1.conv1.weight` → `("down_0", "block_1", "conv1", "kernel")`."""
  path, leaf = layers.torch_key_path(torch_key.split(".", 1)[1])
  if leaf == "weight":
    leaf = "scale" if path and path[-1].startswith("norm") else "kernel"
  return (*path, leaf)


def convert_file(vae: str | os.PathLike, out: str | os.PathLike, **model_fields) -> dict:
  """Converts `vae` into `out`; returns the conversion report (raises if leaves are missing)."""
  variables, report = from_var_state_dict(checkpoints.load_state_dict(vae), **model_fields)
  if report["unexpected_unfilled"]:
    raise ValueError(
      f"{vae}: the checkpoint does not fill {len(report['unexpected_unfilled'])} model leaves, "
      f"e.g. {report['unexpected_unfilled'][:5]}; is it VAR's vae_ch160v4096z32.pth?"
    )
  checkpoints.save_variables(
    variables, out, {"source": str(vae), "model": model_fields, "report": report}
  )
  return report


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--vae", required=True, help="path to vae_ch160v4096z32.pth")
  p.add_argument("--out", required=True, help="output checkpoint directory")
  args = p.parse_args(argv)
  report = convert_file(args.vae, args.out)
  print(json.dumps({k: v for k, v in report.items() if k != "unfilled_leaves"}, indent=2))
  print(
    f"{len(report['unfilled_leaves'])} leaves kept at their initial value (FiLM, label embedding)"
  )
  print(f"wrote {args.out}; start stage 1 with --config.init_from={args.out}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
