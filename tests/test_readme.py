"""The README's Python blocks run as written, at smoke size, after the smoke pipeline.

Each block is executed in a folder where `runs/demo` is the smoke pipeline's workdir; the only
edit is the dataset's name, `demo` → `smoke` (the README speaks of the demo the user runs).
"""

import os
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks() -> list[str]:
  return BLOCK.findall((ROOT / "README.md").read_text())


def at_smoke_size(code: str) -> str:
  for name in ('"fastmri_brain_multiscale/demo"', "synthetic/demo/", '["demo"]'):
    code = code.replace(name, name.replace("demo", "smoke"))
  return code


def test_the_readme_has_python_blocks():
  assert len(python_blocks()) >= 3


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_block_runs(index, smoke_pipeline, tmp_path, monkeypatch):
  root, _, _ = smoke_pipeline
  (tmp_path / "runs").mkdir()
  (tmp_path / "runs" / "demo").symlink_to(root, target_is_directory=True)
  monkeypatch.chdir(tmp_path)
  code = at_smoke_size(python_blocks()[index])
  exec(compile(code, f"README.md python block {index + 1}", "exec"), {"__name__": "readme"})
  assert os.getcwd() == os.fspath(tmp_path)
