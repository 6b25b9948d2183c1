"""The Colab notebooks: valid and stripped, identical to what `colab/make_notebooks.py` writes,
calling only package names that exist; the quickstart runs top to bottom on the smoke preset."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import pathlib
import sys
import time

import jax
import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
COLAB = ROOT / "colab"
NOTEBOOKS = ("quickstart.ipynb", "train_tpu.ipynb")
# Top-level names whose attributes the notebooks must find: the package and the stage configs.
CHECKED = ("nextaccel_jax", "configs")
TRAINING_STAGES = ("aqvae", "student", "teacher", "distill")


def _read(name: str):
  return nbformat.read(COLAB / name, as_version=4)


def _code(cell) -> str:
  # Shell escapes and magics are not Python; a notebook may use them, ast must not see them.
  lines = cell.source.splitlines()
  return "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in lines)


def _parameters_index(nb) -> int:
  found = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
  assert len(found) == 1, f"expected one cell tagged 'parameters', found {len(found)}"
  return found[0]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_valid_stripped_and_parses(name):
  nb = _read(name)
  nbformat.validate(nb)
  assert nb.nbformat == 4
  assert nb.metadata.kernelspec.name == "python3"
  for cell in nb.cells:
    if cell.cell_type != "code":
      continue
    assert cell.outputs == [], f"{name}: cell {cell.id} has stored outputs"
    assert cell.execution_count is None, f"{name}: cell {cell.id} has an execution count"
    ast.parse(_code(cell), filename=f"{name}:{cell.id}")
  assert any(c.cell_type == "markdown" for c in nb.cells)
  params = nb.cells[_parameters_index(nb)]
  # The parameters cell must stay plain assignments, so an injected cell can replace any of them.
  assert all(isinstance(s, ast.Assign) for s in ast.parse(params.source).body)


def test_notebooks_match_their_generator():
  spec = importlib.util.spec_from_file_location("make_notebooks", COLAB / "make_notebooks.py")
  gen = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(gen)
  assert sorted(gen.NOTEBOOKS) == sorted(NOTEBOOKS)
  for name, make in gen.NOTEBOOKS.items():
    generated = json.loads(nbformat.writes(make()))
    stored = json.loads((COLAB / name).read_text())
    assert generated == stored, f"colab/{name} is stale: run `python colab/make_notebooks.py`"


def _module_names(tree: ast.Module) -> tuple[dict[str, object], list[str]]:
  """Names bound to package modules or objects by the imports, and every `from` import checked."""
  bound: dict[str, object] = {}
  checked = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.split(".")[0] not in CHECKED:
          continue
        module = importlib.import_module(alias.name)
        if alias.asname:
          bound[alias.asname] = module
        else:
          top = alias.name.split(".")[0]
          bound[top] = importlib.import_module(top)
        checked.append(alias.name)
    elif isinstance(node, ast.ImportFrom) and node.module:
      if node.module.split(".")[0] not in CHECKED:
        continue
      module = importlib.import_module(node.module)
      for alias in node.names:
        if hasattr(module, alias.name):
          value = getattr(module, alias.name)
        else:
          value = importlib.import_module(f"{node.module}.{alias.name}")
        bound[alias.asname or alias.name] = value
        checked.append(f"{node.module}.{alias.name}")
  return bound, checked


def _attribute_chain(node: ast.Attribute) -> list[str] | None:
  parts = []
  while isinstance(node, ast.Attribute):
    parts.append(node.attr)
    node = node.value
  if not isinstance(node, ast.Name):
    return None
  return [node.id, *reversed(parts)]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_uses_only_existing_package_names(name):
  nb = _read(name)
  tree = ast.parse("\n".join(_code(c) for c in nb.cells if c.cell_type == "code"))
  bound, checked = _module_names(tree)
  assert bound, f"{name} imports nothing from {CHECKED}"
  # A module name reassigned later would make the attribute checks below look at the wrong object.
  stored = {
    n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)
  }
  assert not stored & set(bound), f"{name} reassigns imported names {sorted(stored & set(bound))}"
  for node in ast.walk(tree):
    if not isinstance(node, ast.Attribute):
      continue
    chain = _attribute_chain(node)
    if chain is None or chain[0] not in bound:
      continue
    obj = bound[chain[0]]
    for i, attr in enumerate(chain[1:], start=1):
      assert hasattr(obj, attr), f"{name}: {'.'.join(chain[: i + 1])} does not exist"
      obj = getattr(obj, attr)
    checked.append(".".join(chain))
  for fn in ("train_and_evaluate", "stage_configs", "get_config"):
    assert any(c.endswith(fn) for c in checked), f"{name} never calls {fn}"


def _kernel_spec_dir(tmp_path: pathlib.Path) -> pathlib.Path:
  """A `python3` kernelspec running this interpreter, ahead of any user or system one (which
  could point at another Python without the package)."""
  spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
  spec_dir.mkdir(parents=True)
  spec = {
    "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
    "display_name": "Python 3",
    "language": "python",
  }
  (spec_dir / "kernel.json").write_text(json.dumps(spec))
  return tmp_path / "jupyter"


@pytest.mark.slow
def test_quickstart_runs_on_the_smoke_preset(smoke_pipeline, tmp_path, monkeypatch):
  # After the smoke pipeline (same configs, same worker): the notebook's compilations are hits in
  # the session's compilation cache, which its kernel shares.
  nb = _read("quickstart.ipynb")
  workdir = tmp_path / "run"
  override = nbformat.v4.new_code_cell(
    "\n".join(
      [
        'PRESET = "smoke"',
        f"WORKDIR = {str(workdir)!r}",
        "import jax",
        # Tiny models spend far longer in XLA's optimisation passes than running.
        'jax.config.update("jax_disable_most_optimizations", True)',
      ]
    )
  )
  override.metadata["tags"] = ["injected-parameters"]
  nb.cells.insert(_parameters_index(nb) + 1, override)

  monkeypatch.setenv("JUPYTER_PATH", str(_kernel_spec_dir(tmp_path)))
  # The kernel inherits conftest's eight simulated CPU devices and the session's compilation cache.
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  cache_dir = jax.config.jax_compilation_cache_dir
  if cache_dir:
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", cache_dir)
    min_secs = jax.config.jax_persistent_cache_min_compile_time_secs
    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", str(min_secs))
  # The dataset goes under WORKDIR, not into a shared TFDS folder.
  monkeypatch.delenv("TFDS_DATA_DIR", raising=False)

  client = NotebookClient(
    nb,
    kernel_name="python3",
    timeout=900,
    resources={"metadata": {"path": str(tmp_path)}},
  )
  start = time.perf_counter()
  client.execute()
  print(f"quickstart.ipynb ran in {time.perf_counter() - start:.0f} s")

  assert (workdir / "data" / "data_summary.json").is_file()
  for stage in TRAINING_STAGES:
    metrics = json.loads((workdir / stage / "final_metrics.json").read_text())
    assert metrics, f"{stage} wrote empty final metrics"
  cells = {c.get("id"): c for c in nb.cells}
  images = [
    o for o in cells["figure"].outputs if o.output_type == "display_data" and "image/png" in o.data
  ]
  assert images, "the figure cell displayed no PNG"
  assert list((workdir / "figures").glob("*.png"))
  scores = "".join(o.get("text", "") for o in cells["scores"].outputs)
  for family in ("cartesian_y", "cartesian_x", "gaussian_2d", "radial"):
    assert family in scores
