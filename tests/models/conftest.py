"""Model-test fixtures: the PyTorch reference of VAR's VQ-VAE (when torch is installed)."""

import importlib.util
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def ref():
  """`tests/models/torch_var_vae.py`, loaded by path (the tests folder is not a package)."""
  pytest.importorskip("torch")
  path = Path(__file__).with_name("torch_var_vae.py")
  spec = importlib.util.spec_from_file_location("torch_var_vae", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
