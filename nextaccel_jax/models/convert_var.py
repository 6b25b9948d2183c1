"""Converts VAR's VQ-VAE checkpoint into an Orbax checkpoint that stage 1 starts from.

  python -m nextaccel_jax.models.convert_var --vae=vae_ch160v4096z32.pth --out=runs/var_vae
  python -m nextaccel_jax.main --config=configs/aqvae.py:paper --workdir=runs/aqvae \\
      --config.init_from=runs/var_vae

The checkpoint is VAR's public `vae_ch160v4096z32.pth` (FoundationVision/VAR on the Hugging
Face hub); reading it needs PyTorch (`pip install torch`), which the package itself does not
depend on. The conversion report lists torch keys nothing used and Flax leaves left at their
initial value; only the FiLM layers and the label embedding are expected there.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib

import numpy as np

from nextaccel_jax.models import aqvae


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a PyTorch state dict into numpy arrays (torch is imported only here)."""
  try:
    import torch
  except ImportError as e:
    raise ImportError(
      f"reading {path} needs PyTorch, which nextaccel_jax does not install: pip install torch"
    ) from e
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such checkpoint file")
  sd = torch.load(path, map_location="cpu", weights_only=True)
  if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
    sd = sd["state_dict"]
  if not isinstance(sd, dict):
    raise ValueError(f"{path}: expected a state dict (name → tensor), got {type(sd).__name__}")
  return {k: v.detach().cpu().float().numpy() for k, v in sd.items() if hasattr(v, "numpy")}


def save_variables(variables: dict, out: str | os.PathLike, meta: dict) -> pathlib.Path:
  """Writes `{"params", "vq_ema"}` as step 0 of an Orbax checkpoint directory."""
  from nextaccel_jax import checkpointing

  out = pathlib.Path(out)
  with checkpointing.Checkpointer(out, keep_best=False) as ckpt:
    ckpt.save(0, variables, meta=meta, force=True)
  return out


def convert_file(vae: str | os.PathLike, out: str | os.PathLike, **model_fields) -> dict:
  """Converts `vae` into `out`; returns the conversion report (raises if leaves are missing)."""
  variables, report = aqvae.from_var_state_dict(load_torch_state_dict(vae), **model_fields)
  if report["unexpected_unfilled"]:
    raise ValueError(
      f"{vae}: the checkpoint does not fill {len(report['unexpected_unfilled'])} model leaves, "
      f"e.g. {report['unexpected_unfilled'][:5]}; is it VAR's vae_ch160v4096z32.pth?"
    )
  save_variables(variables, out, {"source": str(vae), "model": model_fields, "report": report})
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
