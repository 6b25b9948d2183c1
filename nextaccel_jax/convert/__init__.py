"""Checkpoint conversion, apart from the model definitions: PyTorch (or `.npz`) state dicts in,
Orbax checkpoints that the stages' `init_from` reads out.

- `checkpoints`: reading a state dict from a `.pth`/`.bin`/`.npz` file, writing variables as an
  Orbax checkpoint.
- `var_vae`: VAR's VQ-VAE (`vae_ch160v4096z32.pth`) → AQ-VAE variables (CLI).
- `var_transformer`: VAR's d16 transformer (`var_d16.pth`) → student/teacher params (CLI).
"""
