"""The Colab notebooks: valid and stripped, identical to what jupytext makes of their percent
scripts (`colab/*.py`), calling only package names that exist; the quickstart runs top to bottom
on the smoke preset, and its rendered copy (with outputs) holds the quickstart's current cells."""

from __future__ import annotations

import ast
import importlib
import json
import pathlib
import time

import jax
import jupytext
import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
COLAB = ROOT / "colab"
NOTEBOOKS = ("quickstart.ipynb", "train_tpu.ipynb")
# Written by `colab/render.py`: the quickstart run on the smoke preset, outputs kept.
RENDERED = "quickstart.rendered.ipynb"
INJECTED_TAG = "injected-parameters"
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


def _cells(nb) -> list[tuple[str, str, dict]]:
  return [(c.cell_type, c.source, dict(c.metadata)) for c in nb.cells]


def _percent_script(name: str):
  return jupytext.read(COLAB / name.replace(".ipynb", ".py"), fmt="py:percent")


def _without_jupytext(metadata) -> dict:
  return {k: v for k, v in metadata.items() if k != "jupytext"}


def test_every_percent_script_has_its_notebook():
  scripts = {p.stem for p in COLAB.glob("*.py") if p.read_text().startswith("# ---\n# jupyter:")}
  assert scripts == {pathlib.Path(n).stem for n in NOTEBOOKS}


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_matches_its_percent_script(name):
  expected = _percent_script(name)
  stored = _read(name)
  regenerate = f"run `jupytext --update --to ipynb colab/{name.replace('.ipynb', '.py')}`"
  assert _cells(stored) == _cells(expected), f"colab/{name} is stale: {regenerate}"
  assert _without_jupytext(stored.metadata) == _without_jupytext(expected.metadata), regenerate


def _install_cell(nb) -> str:
  found = [c.source for c in nb.cells if "def find_checkout(" in c.source]
  assert len(found) == 1, "expected one install cell"
  return found[0]


def test_notebooks_share_the_install_cell():
  # Both notebooks install the same way; each copy must change with the other.
  first, *others = (_install_cell(_read(name)) for name in NOTEBOOKS)
  assert all(other == first for other in others)


def test_rendered_quickstart_holds_the_current_cells_and_their_outputs():
  rendered = _read(RENDERED)
  nbformat.validate(rendered)
  cells = [c for c in rendered.cells if INJECTED_TAG not in c.metadata.get("tags", [])]
  injected = [c for c in rendered.cells if INJECTED_TAG in c.metadata.get("tags", [])]
  assert len(injected) == 1 and 'PRESET = "smoke"' in injected[0].source
  quickstart = _read("quickstart.ipynb")
  assert [(c.cell_type, c.source) for c in cells] == [
    (c.cell_type, c.source) for c in quickstart.cells
  ], f"colab/{RENDERED} is stale: run `python colab/render.py`"
  code = [c for c in rendered.cells if c.cell_type == "code"]
  assert all(c.execution_count is not None for c in code), "not every cell was run"
  outputs = [o for c in code for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  assert any("image/png" in o.get("data", {}) for o in outputs), "no figure was kept"
  text = json.dumps(outputs)
  # `render.py` cleans out the checkout's and the home folder's paths and colour codes.
  private_texts = [str(ROOT), "\\u001b["]
  if len(pathlib.Path.home().parts) > 1:
    private_texts.append(str(pathlib.Path.home()))
  for private in private_texts:
    assert private not in text, f"colab/{RENDERED} outputs contain {private!r}"


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


def _render_module():
  # colab/ is not a package: the rendering script is loaded from its file.
  spec = importlib.util.spec_from_file_location("colab_render", COLAB / "render.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _code_cell_with(nb, text: str):
  found = [c for c in nb.cells if c.cell_type == "code" and text in c.source]
  assert len(found) == 1, f"expected one code cell containing {text!r}, found {len(found)}"
  return found[0]


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
  override.metadata["tags"] = [INJECTED_TAG]
  nb.cells.insert(_parameters_index(nb) + 1, override)

  monkeypatch.setenv("JUPYTER_PATH", str(_render_module().kernel_spec_dir(tmp_path)))
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
  figure = _code_cell_with(nb, "fig.savefig(")
  images = [o for o in figure.outputs if o.output_type == "display_data" and "image/png" in o.data]
  assert images, "the figure cell displayed no PNG"
  assert list((workdir / "figures").glob("*.png"))
  scores = "".join(o.get("text", "") for o in _code_cell_with(nb, "evaluate_slices(").outputs)
  for family in ("cartesian_y", "cartesian_x", "gaussian_2d", "radial"):
    assert family in scores
