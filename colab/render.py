"""Writes `colab/quickstart.rendered.ipynb`: the quickstart (`colab/quickstart.py`) run top to
bottom on the smoke preset, outputs kept, so what its cells print and draw can be read without
running it (e.g. on GitHub).

  python colab/render.py

Takes a few minutes on a CPU. The run happens in a temporary folder (`WORKDIR` keeps its
relative default); the outputs are cleaned of that folder's, the checkout's and the home
folder's paths, of colour codes and of progress-bar redraws. `tests/test_notebooks.py` checks
that the rendered cells still are the quickstart's, so run this again after changing
`colab/quickstart.py`.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import sys
import tempfile
import time

import jupytext
import nbformat
from nbclient import NotebookClient

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
SOURCE = HERE / "quickstart.py"
STRIPPED = HERE / "quickstart.ipynb"
RENDERED = HERE / "quickstart.rendered.ipynb"
# Papermill's tag for a cell that overrides the parameters cell; the tests skip it when they
# compare the rendered cells with the quickstart's.
INJECTED_TAG = "injected-parameters"
SMOKE_PARAMETERS = "\n".join(
  [
    "# Rendered on the smoke preset: tiny models, minutes on a CPU, images not meant to look good.",
    'PRESET = "smoke"',
  ]
)

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# Placeholder for the checkout's folder in the outputs.
CHECKOUT = "<checkout>"


def _with_smoke_parameters(nb):
  index = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
  if len(index) != 1:
    raise ValueError(f"{SOURCE.name}: expected one cell tagged 'parameters', found {len(index)}")
  cell = nbformat.v4.new_code_cell(SMOKE_PARAMETERS)
  cell.id = "injected-parameters"
  cell.metadata["tags"] = [INJECTED_TAG]
  nb.cells.insert(index[0] + 1, cell)
  return nb


def kernel_spec_dir(folder: pathlib.Path) -> pathlib.Path:
  """A `python3` kernelspec running this interpreter, ahead of any user or system one (which
  could point at another Python without the package)."""
  spec_dir = folder / "jupyter" / "kernels" / "python3"
  spec_dir.mkdir(parents=True)
  spec = {
    "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
    "display_name": "Python 3",
    "language": "python",
  }
  (spec_dir / "kernel.json").write_text(json.dumps(spec))
  return folder / "jupyter"


def _terminal_text(text: str) -> str:
  """What a terminal would show: no colour codes, and of the redraws of a line (a progress bar
  rewrites its line after each carriage return) only the last."""
  text = _ANSI.sub("", text).replace("\r\n", "\n")
  lines = []
  for line in text.split("\n"):
    drawn = [part for part in line.split("\r") if part]
    lines.append(drawn[-1] if drawn else "")
  return "\n".join(lines)


def _merged_streams(outputs) -> list:
  """The outputs with each run of one stream's messages joined into one output."""
  merged = []
  for output in outputs:
    if (
      output.output_type == "stream"
      and merged
      and merged[-1].output_type == "stream"
      and merged[-1].name == output.name
    ):
      merged[-1].text += output.text
    else:
      merged.append(output)
  return merged


def _clean_outputs(cell, replacements: list[tuple[str, str]]) -> None:
  def scrub(text: str) -> str:
    for old, new in replacements:
      text = text.replace(old, new)
    return text

  # A stream arrives in many messages; joined, a redrawn line is whole again.
  outputs = _merged_streams(cell.outputs)
  for output in outputs:
    if output.output_type == "stream":
      output.text = scrub(_terminal_text(output.text))
    elif output.output_type == "error":
      output.traceback = [scrub(_terminal_text(line)) for line in output.traceback]
    else:
      for key, value in output.get("data", {}).items():
        if key.startswith("text/") and isinstance(value, str):
          output.data[key] = scrub(value)
  # A bar's closing newline can arrive on its own, between the other stream's lines.
  kept = [o for o in outputs if o.output_type != "stream" or o.text.strip()]
  cell.outputs = _merged_streams(kept)


def render() -> None:
  nb = jupytext.read(SOURCE, fmt="py:percent")
  # The stripped notebook's cell ids, so the two .ipynb files line up cell for cell.
  stored = nbformat.read(STRIPPED, as_version=4)
  if [c.source for c in stored.cells] == [c.source for c in nb.cells]:
    for cell, stored_cell in zip(nb.cells, stored.cells, strict=True):
      cell.id = stored_cell.id
  nb.metadata.pop("jupytext", None)
  nb = _with_smoke_parameters(nb)

  with tempfile.TemporaryDirectory(prefix="quickstart_render_") as tmp:
    run_dir = pathlib.Path(tmp).resolve()
    os.environ["JUPYTER_PATH"] = str(kernel_spec_dir(run_dir))
    # The CPU, so the rendered outputs do not depend on the machine's accelerator.
    os.environ["JAX_PLATFORMS"] = "cpu"
    # Tiny models spend far longer in XLA's optimisation passes than running.
    os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
    # Without ipywidgets (a widget would not show on GitHub) tqdm draws text bars, after warning.
    os.environ["PYTHONWARNINGS"] = "ignore:IProgress not found"
    # The dataset goes under WORKDIR, not into a shared TFDS folder.
    os.environ.pop("TFDS_DATA_DIR", None)
    client = NotebookClient(
      nb,
      kernel_name="python3",
      timeout=1800,
      record_timing=False,
      resources={"metadata": {"path": str(run_dir)}},
    )
    start = time.perf_counter()
    client.execute()
    print(f"{SOURCE.name} ran in {time.perf_counter() - start:.0f} s")

  # Longest first: the run folder and the checkout may lie inside each other or the home folder.
  home = pathlib.Path.home()
  replacements = sorted(
    [
      (f"{run_dir}{os.sep}", ""),
      (str(run_dir), "."),
      (str(ROOT), CHECKOUT),
    ]
    # A home folder of "/" would match every path.
    + ([(str(home), "~")] if len(home.parts) > 1 else []),
    key=lambda pair: -len(pair[0]),
  )
  for cell in nb.cells:
    if cell.cell_type == "code":
      _clean_outputs(cell, replacements)
  nbformat.validate(nb)
  nbformat.write(nb, RENDERED)
  print(f"wrote {RENDERED.relative_to(ROOT)}")


if __name__ == "__main__":
  render()
