"""State dicts from PyTorch or numpy files, and Orbax checkpoints of converted variables.

PyTorch is not a dependency of the package: it is imported only when a `.pth`/`.bin`/`.pt` file
is read (the CPU build is enough, `pip install -e ".[parity]"`). An `.npz` of the same key names
is read with numpy alone, so a converted copy also works on machines without torch.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np

from nextaccel_jax import checkpointing


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Reads a state dict (torch key → array) into numpy copies.

  Floating tensors become float32; a `{"state_dict": ...}` wrapper is unwrapped; entries that
  are not tensors are dropped.

  Raises:
    FileNotFoundError: If `path` is not a file.
    ImportError: For a torch file when PyTorch is not installed (says how to install it).
    ValueError: If the file does not hold a mapping of names to tensors.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such checkpoint file")
  if path.suffix == ".npz":
    with np.load(path) as data:
      return {k: np.array(data[k]) for k in data.files}
  try:
    import torch
  except ImportError as e:
    raise ImportError(
      f"reading {path} needs PyTorch, which nextaccel_jax does not install: pip install torch "
      "(CPU build), or convert it to an .npz of the same keys elsewhere"
    ) from e
  sd = torch.load(path, map_location="cpu", weights_only=True)
  if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
    sd = sd["state_dict"]
  if not isinstance(sd, dict):
    raise ValueError(f"{path}: expected a state dict (name → tensor), got {type(sd).__name__}")
  out = {}
  for k, v in sd.items():
    if isinstance(v, torch.Tensor):
      t = v.detach().cpu()
      # `.numpy()` shares torch's storage; the copy outlives the loaded file.
      out[k] = np.array((t.float() if t.is_floating_point() else t).numpy(), copy=True)
  return out


def save_variables(variables: dict, out: str | os.PathLike, meta: dict) -> pathlib.Path:
  """Writes converted variables as step 0 of an Orbax checkpoint folder, for `init_from`."""
  out = pathlib.Path(out)
  with checkpointing.Checkpointer(out, keep_best=False) as ckpt:
    ckpt.save(0, variables, meta=meta, force=True)
  return out
