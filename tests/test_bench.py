"""`bench/gpu_suite.py`: its smoke run on CPU, its stop at an item's cap, and its tables.

The suite runs in a subprocess on one CPU device (`XLA_FLAGS` set to one device rather than the
eight simulated ones of conftest.py): it measures the first device only, so more would only cost
start-up time.
"""

import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
# From its file: bench/ on sys.path would let its data.py or inference.py shadow other modules.
_spec = importlib.util.spec_from_file_location("gpu_suite", ROOT / "bench" / "gpu_suite.py")
gpu_suite = importlib.util.module_from_spec(_spec)
sys.modules["gpu_suite"] = gpu_suite  # its dataclasses look their module up there
_spec.loader.exec_module(gpu_suite)


def run_suite(out: pathlib.Path, *flags: str, timeout: float = 600) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  cmd = [sys.executable, "bench/gpu_suite.py", "--smoke", f"--out={out}", *flags]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  return proc


def read(out: pathlib.Path) -> tuple[dict, str]:
  assert (out / "cpu.json").is_file() and (out / "cpu.md").is_file(), list(out.iterdir())
  return json.loads((out / "cpu.json").read_text()), (out / "cpu.md").read_text()


def table_rows(md: str) -> dict[str, list[str]]:
  rows = [line.strip("|").split("|") for line in md.splitlines() if line.startswith("| ")]
  return {cells[0].strip(): [c.strip() for c in cells] for cells in rows[1:]}


def number(x) -> bool:
  return isinstance(x, int | float) and math.isfinite(x) and x > 0


def test_smoke_run_measures_every_item(tmp_path):
  run_suite(tmp_path)
  doc, md = read(tmp_path)
  names = gpu_suite.item_names(smoke=True)
  assert [r["name"] for r in doc["items"]] == names
  assert doc["finished"] and doc["device"]["platform"] == "cpu"
  assert doc["device"]["peak_bf16_tflops"] is None
  for r in doc["items"]:
    # The contract: numbers, or a recorded error; at smoke size every item should measure.
    assert r["status"] in ("ok", "error"), r
    assert r["status"] == "ok", r.get("error")
    assert number(r["seconds_per_call"]) and number(r["images_per_s"]), r
    assert r.get("mfu") is None, r
    if r["name"] != "loader":
      assert number(r["compile_s"]) and number(r["flops_per_call"]), r
      assert number(r["memory_bytes"]), r
  parts = [r for r in doc["items"] if r["name"].startswith("inference")]
  assert parts and all(number(r["steps_s"]) and number(r["decode_s"]) for r in parts)
  rows = table_rows(md)
  assert list(rows) == names
  assert all(cells[1] == "ok" for cells in rows.values())


def test_an_item_past_its_cap_is_stopped_and_the_next_runs(tmp_path):
  # A two-second cap stops both items while they build or compile; the second needs a new worker.
  proc = run_suite(tmp_path, "--items=stage2_train,loader", "--item_cap_s=2")
  doc, md = read(tmp_path)
  assert [r["name"] for r in doc["items"]] == ["stage2_train", "loader"]
  for r in doc["items"]:
    assert r["status"] == "timed_out", r
    assert "its cap" in r["error"], r
  assert set(table_rows(md)) == {"stage2_train", "loader"}
  assert "timed_out" in proc.stdout


def test_markdown_rows_and_mfu():
  peak = gpu_suite.peak_tflops("NVIDIA H100 80GB HBM3")
  assert peak == 989.0
  assert gpu_suite.peak_tflops("NVIDIA H100 PCIe") == 756.0
  assert gpu_suite.peak_tflops("NVIDIA L40S") is None and gpu_suite.peak_tflops("cpu") is None
  assert gpu_suite.peak_tflops("NVIDIA L4") == 121.0
  assert gpu_suite.peak_tflops("TPU v5 lite") == 197.0 and gpu_suite.peak_tflops("TPU v5") == 459.0
  assert gpu_suite.slug("NVIDIA H200") == "nvidia-h200"

  ok = {"name": "stage2_train", "status": "ok", "batch": 40, "seconds_per_call": 0.5}
  ok.update(flops_per_call=2e14, compile_s=61.0, memory_bytes=30 * 2**30)
  gpu_suite._derive(ok, peak)
  assert math.isclose(ok["images_per_s"], 80.0) and math.isclose(ok["tflops_per_s"], 400.0)
  assert math.isclose(ok["mfu"], 400.0 / 989.0)
  error = {"name": "stage1_train", "status": "error", "batch": 16, "error": "RESOURCE_EXHAUSTED"}
  skipped = {"name": "loader", "status": "skipped", "batch": 16, "error": "10 s left | needs 30"}
  doc = {
    "command": "python bench/gpu_suite.py",
    "started": "now",
    "elapsed_s": 1.0,
    "budget_s": 420.0,
    "finished": False,
    "device": {"kind": "NVIDIA H100 80GB HBM3", "peak_bf16_tflops": peak, "platform": "gpu"},
    "items": [ok, error, skipped],
  }
  rows = table_rows(gpu_suite.markdown(doc))
  assert rows["stage2_train"][1:] == [
    "ok", "40", "61.0", "30.00", "200", "500.0", "80.0", "400", "40.4%", "",
  ]  # fmt: skip
  assert rows["stage1_train"][1] == "error" and "RESOURCE_EXHAUSTED" in rows["stage1_train"][-1]
  assert rows["loader"][1] == "skipped" and "needs 30" in rows["loader"][-1]
