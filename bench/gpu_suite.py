"""The paper-size measurements on one accelerator, in order of value, in one command.

On a machine with a GPU, from the repository root, once the package and a CUDA build of JAX are
installed (`pip install -e . "jax[cuda12]"`, from what that machine holds: the device machines have
no internet):

  python bench/gpu_suite.py --budget_s=420

It ends within the budget plus a few seconds (give the command a limit of about 480 s) and exits 0
whatever the items' results; it writes `bench/results/<device>.json` and `bench/results/<device>.md`
(a markdown table), where `<device>` is a slug of `jax.devices()[0].device_kind` (`nvidia-h200`),
and rewrites both after every measurement, so a run cut off by a timeout still leaves every number
measured so far. On CPU, in seconds per item, the same code path at tiny size (tests/test_bench.py
runs it):

  python bench/gpu_suite.py --smoke [--out=/tmp/suite]

The smoke run uses the smoke presets made smaller still (`shrink`), compiles with XLA's cheapest CPU
settings and writes to a temporary folder unless `--out` is given.

The items, most valuable first:
  1. stage2_train: the stage-2 train step at paper size (batch 40, bf16 compute);
  2. stage1_train: the stage-1 generator + discriminator step at paper size (batch 16);
  3. inference_b1, _b128, _b8, _b32: the whole jitted reconstruction (paper tokenizer + student,
     random weights, argmax) and its three parts, encode, autoregressive steps and decode, each
     compiled on its own (`bench/inference.py`); batch 1 and 128 first, as the targets are there
     (≤ 20 ms per image at batch 1, ≥ 500 images/s at batch 128);
  4. distill_train: the distillation step at the paper's batch (24), or the largest that fits
     (16, then 8), recorded in the item;
  5. loader: host-side examples/s of the train loader at 256² (`bench/data.py`), with the
     default two reader threads and with one per host core, and the jitted six-level computation
     on the device.

Each item compiles ahead of time (compile seconds reported apart), runs once to warm up, then times
calls ending in `block_until_ready`. FLOPs per call are XLA's cost analysis of the compiled
program, rematerialised recomputation included, so MFU here is FLOPs of the executed program /
(time × the device's dense bf16 peak); it is null where the peak is unknown (CPU), and
`--peak_tflops` sets it. Everything runs on the first device alone (a one-device mesh), so memory
is per device and the numbers are one accelerator's. Inputs are noise and weights random: the cost
does not depend on their values.

The items run in a worker process; this one keeps the files and the clock. An item that fails (out
of memory or any other error) is recorded with its error and the next one starts; an item still
running at its cap (`--item_cap_s`, else the defaults in `plan`) or at the end of `--budget_s` is
stopped (the worker is killed and a new one takes the remaining items) and recorded as timed out
with what it had measured; an item is skipped when less of the budget is left than it needs to
start. `--items` runs some items only (with `--merge`, into the existing files).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback

BENCH = pathlib.Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"

# Dense bf16 (tensor-core / MXU) peak per device in TFLOP/s, no sparsity, from the vendors' data
# sheets; matched in order against the lower-cased `device_kind`, so the PCIe and NVL H100s come
# before the SXM one. The RTX A5000 figure is its dense fp16 tensor rate.
PEAK_BF16_TFLOPS = (
  (r"h200", 989.0),
  (r"h100.*pcie", 756.0),
  (r"h100.*nvl", 835.0),
  (r"h100", 989.0),
  (r"a100", 312.0),
  (r"a5000", 111.0),
  (r"\bl4\b", 121.0),
  (r"tpu v4", 275.0),
  (r"tpu v5 ?(lite|e)", 197.0),
  (r"tpu v5p?$", 459.0),
  (r"tpu v6 ?(lite|e)", 918.0),
)


@dataclasses.dataclass(frozen=True)
class Item:
  """One measurement: `min_s` of budget needed to start it, `cap_s` the most it may run."""

  name: str
  title: str
  min_s: float
  cap_s: float
  batch: int = 0


@dataclasses.dataclass(frozen=True)
class Sizes:
  """What one mode measures: the paper's sizes on an accelerator or tiny ones on CPU."""

  preset: str
  stage2_batch: int
  stage1_batch: int
  inference_batches: tuple[int, ...]
  distill_batches: tuple[int, ...]
  steps: int
  repeats: int
  target_s: float
  loader: dict


PAPER = Sizes(
  preset="paper",
  stage2_batch=40,
  stage1_batch=16,
  inference_batches=(1, 128, 8, 32),
  distill_batches=(24, 16, 8),
  steps=10,
  repeats=10,
  target_s=8.0,
  loader=dict(crop=256, geometry="fastmri", coils=(8, 8), volumes=4, slices=4, batch=16),
)
SMOKE = Sizes(
  preset="smoke",
  stage2_batch=2,
  stage1_batch=2,
  inference_batches=(1, 8, 2, 4),
  distill_batches=(2, 1),
  steps=2,
  repeats=2,
  target_s=0.5,
  loader=dict(crop=64, geometry="tiny", coils=(4, 4), volumes=1, slices=2, batch=4),
)
LOADER_BATCHES = {"paper": 20, "smoke": 3}
# Smoke runs only: XLA's CPU fusion emitters double the compile time of these small programs.
FAST_CPU = "--xla_cpu_use_fusion_emitters=false"


def shrink(config) -> None:
  """Smaller than the smoke preset, for `--smoke`: on a busy 2-core machine compiling the steps is
  what a smoke run's time is made of, and it grows with the number of layers. Also drops the
  LPIPS term of stage 1 (a whole AlexNet forward and backward to compile); the discriminator
  stays, so the stage-1 step is still G + D."""
  tokenizers = [config.tokenizer] if "tokenizer" in config else [config.model]
  transformers = [config[k] for k in ("model", "teacher") if "tokenizer" in config and k in config]
  for m in tokenizers:
    m.update(dict(ch=8, using_sa=False, using_mid_sa=False, label_features=16))
  for m in transformers:
    m.update(dict(depth=1, width=16, num_heads=1, context_levels=("mid",)))
  if "disc" in config:
    config.disc.tower.update(
      dict(depth=1, width=16, num_heads=1, mlp_dim=32, proj_dim=8, feature_blocks=(0,))
    )
    config.loss.lpips = 0.0


def plan(smoke: bool) -> list[Item]:
  """The items in the order they run."""
  sizes = SMOKE if smoke else PAPER
  items = [
    Item("stage2_train", "stage-2 train step", 60, 200, sizes.stage2_batch),
    Item("stage1_train", "stage-1 G + D train step", 60, 200, sizes.stage1_batch),
  ]
  items += [
    Item(f"inference_b{b}", f"inference, batch {b}", 30, 100, b) for b in sizes.inference_batches
  ]
  items += [
    Item("distill_train", "stage-3 distillation step", 60, 200, sizes.distill_batches[0]),
    Item("loader", "train loader, host side", 30, 120, sizes.loader["batch"]),
  ]
  if smoke:
    # Tiny items never need the budget's protection, only a bound against a hang.
    items = [dataclasses.replace(it, min_s=0.0, cap_s=300.0) for it in items]
  return items


def item_names(smoke: bool) -> list[str]:
  return [it.name for it in plan(smoke)]


def slug(device_kind: str) -> str:
  """`NVIDIA H200` → `nvidia-h200`."""
  return re.sub(r"[^a-z0-9]+", "-", device_kind.lower()).strip("-") or "unknown"


def peak_tflops(device_kind: str) -> float | None:
  """Dense bf16 peak of one device of this kind from `PEAK_BF16_TFLOPS`; None when unknown."""
  kind = device_kind.lower().strip()
  for pattern, peak in PEAK_BF16_TFLOPS:
    if re.search(pattern, kind):
      return peak
  return None


# ------------------------------------------------------------------------------------------------
# The parent: clock, worker and files


def main() -> int:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU (seconds per item)")
  p.add_argument("--budget_s", type=float, default=0.0, help="whole run (0: 420, smoke 900)")
  p.add_argument("--out", default="", help="folder (default bench/results; smoke: a temp dir)")
  p.add_argument("--items", default="", help="comma-separated item names (default: all)")
  p.add_argument("--merge", action="store_true", help="keep the other items of existing files")
  p.add_argument("--peak_tflops", type=float, default=0.0, help="device peak (0: the table)")
  p.add_argument("--item_cap_s", type=float, default=0.0, help="cap of every item (0: defaults)")
  p.add_argument("--cache_dir", default="", help="JAX compilation cache (compile s then reads it)")
  p.add_argument("--allow_cpu", action="store_true", help="paper sizes even on a CPU (hours)")
  p.add_argument("--worker", default="", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.worker:
    return worker(pathlib.Path(args.worker))

  items = plan(args.smoke)
  if args.items:
    wanted = args.items.split(",")
    unknown = sorted(set(wanted) - {it.name for it in items})
    if unknown:
      p.error(f"unknown items {unknown}; choose from {[it.name for it in items]}")
    items = [it for it in items if it.name in wanted]
  if args.item_cap_s:
    items = [dataclasses.replace(it, cap_s=args.item_cap_s) for it in items]
  budget = args.budget_s or (900.0 if args.smoke else 420.0)
  out = pathlib.Path(args.out) if args.out else None
  if out is None:
    out = pathlib.Path(tempfile.mkdtemp(prefix="gpu_suite_smoke_")) if args.smoke else RESULTS
  out.mkdir(parents=True, exist_ok=True)
  suite = Suite(args, items, budget, out)
  return suite.run()


class _Stop(Exception):
  """SIGTERM reached the parent: record what is there and stop the worker."""


class Suite:
  """Runs the worker over the items, enforces the caps and rewrites the files after each event."""

  def __init__(self, args, items: list[Item], budget: float, out: pathlib.Path):
    self.args = args
    self.items = items
    self.budget = budget
    self.out = out
    self.start = time.time()
    self.deadline = self.start + budget
    self.scratch = pathlib.Path(tempfile.mkdtemp(prefix="gpu_suite_"))
    self.device: dict | None = None
    self.results = {
      it.name: {"name": it.name, "title": it.title, "status": "pending", "batch": it.batch}
      for it in items
    }
    self.previous: list[dict] = []
    self.finished = False
    self.proc: subprocess.Popen | None = None
    self.fast_compile = bool(args.smoke)

  # -- the loop

  def run(self) -> int:
    signal.signal(signal.SIGTERM, self._on_term)
    try:
      while True:
        pending = [it.name for it in self.items if self.results[it.name]["status"] == "pending"]
        if not pending:
          break
        if time.time() >= self.deadline:
          for name in pending:
            self._set(name, status="skipped", error="the budget was spent before it started")
          break
        probed = self.device is not None
        rc = self._run_worker(pending)
        if time.time() >= self.deadline:
          continue
        if not probed and self.device is None:
          if self.fast_compile:
            # An XLA that no longer knows the flag refuses to start: try once more without it.
            print(f"[gpu_suite] the worker failed to start (exit {rc}); again without {FAST_CPU}")
            self.fast_compile = False
            continue
          for name in pending:
            self._set(name, status="error", error=f"the worker process failed to start (exit {rc})")
          break
        if all(self.results[n]["status"] == "pending" for n in pending):
          # A worker that ends between items without finishing one would be restarted forever.
          for name in pending:
            self._set(name, status="error", error="the worker process ended before it ran")
          break
      self.finished = True
    except (_Stop, KeyboardInterrupt):
      for r in self.results.values():
        if r["status"] == "running":
          r.update(status="timed_out", error="the suite was stopped from outside while it ran")
    finally:
      self._kill()
      self.write()
      shutil.rmtree(self.scratch, ignore_errors=True)
    print(f"\nresults: {self.json_path()} and {self.md_path()}")
    print(self.md_path().read_text())
    return 0

  def _on_term(self, signum, frame):
    raise _Stop()

  def _run_worker(self, names: list[str]) -> int | None:
    """Runs one worker over `names` until it ends or is stopped; returns its exit code."""
    spec = {
      "smoke": self.args.smoke,
      "items": [dataclasses.asdict(it) for it in self.items if it.name in names],
      "deadline": self.deadline,
      "events": str(self.scratch / f"events_{time.time_ns()}.jsonl"),
      "scratch": str(self.scratch),
      "cache_dir": self.args.cache_dir,
      "allow_cpu": self.args.allow_cpu,
    }
    spec_path = self.scratch / "spec.json"
    spec_path.write_text(json.dumps(spec))
    events = pathlib.Path(spec["events"])
    events.touch()
    env = dict(os.environ)
    # JAX's GPU allocator takes 75% of the memory by default; the suite is alone on the device.
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    if self.fast_compile:
      env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {FAST_CPU}".strip()
    self.proc = subprocess.Popen(
      [sys.executable, str(pathlib.Path(__file__).resolve()), f"--worker={spec_path}"],
      cwd=ROOT,
      env=env,
      start_new_session=True,
    )
    caps = {it.name: it.cap_s for it in self.items}
    running, started = None, 0.0
    offset = 0
    with events.open() as f:
      while True:
        # Whether it had ended before this read: then an empty read means nothing more comes.
        exited = self.proc.poll() is not None
        f.seek(offset)
        chunk = f.read()
        # Only whole lines: the worker may be writing the next one.
        whole = chunk[: chunk.rfind("\n") + 1]
        offset += len(whole)
        for line in whole.splitlines():
          running, started = self._apply(json.loads(line), running, started)
        if exited and not whole:
          break
        if running is None and time.time() > self.deadline + 10:
          # Hung while starting or between items: what is left is skipped by the caller.
          self._kill()
          return None
        if running is not None:
          now = time.time()
          cap = min(caps[running], self.deadline - started)
          if now - started > cap:
            self._kill()
            why = "its cap" if caps[running] <= self.deadline - started else "the budget's end"
            self._set(
              running,
              status="timed_out",
              error=f"stopped after {now - started:.0f} s at {why} ({cap:.0f} s)",
            )
            return None
        time.sleep(0.2)
    rc = self.proc.returncode
    if running is not None:
      self._set(
        running, status="error", error=f"the worker process died (exit code {rc}) while it ran"
      )
    return rc

  def _apply(self, ev: dict, running, started):
    kind = ev["event"]
    if kind == "probe":
      self._set_device(ev["device"])
      return running, started
    name = ev["item"]
    if kind == "start":
      self._set(name, status="running", started=_now())
      return name, time.time()
    if kind == "partial":
      self._set(name, **ev["fields"])
      return running, started
    fields = dict(ev["fields"])
    if started:
      fields["wall_s"] = round(time.time() - started, 1)
    self._set(name, status=ev["status"], **fields)
    return None, 0.0

  def _set_device(self, device: dict) -> None:
    if self.args.peak_tflops:
      device.update(peak_bf16_tflops=self.args.peak_tflops, peak_source="--peak_tflops")
    else:
      peak = peak_tflops(device["kind"])
      device.update(peak_bf16_tflops=peak, peak_source="table" if peak else None)
    first = self.device is None
    self.device = device
    if first and self.args.merge and self.json_path().exists():
      old = json.loads(self.json_path().read_text())
      self.previous = [r for r in old.get("items", []) if r["name"] not in self.results]
    self.write()

  def _set(self, name: str, **fields) -> None:
    r = self.results[name]
    r.update(fields)
    if r.get("status") in ("error", "timed_out", "skipped") and not r.get("error"):
      r["error"] = r["status"]
    _derive(r, (self.device or {}).get("peak_bf16_tflops"))
    self.write()
    if fields.get("status") in ("ok", "error", "skipped", "timed_out"):
      print(f"[gpu_suite] {row(r)}", flush=True)

  def _kill(self) -> None:
    if self.proc is not None and self.proc.poll() is None:
      # The worker leads its own process group (start_new_session), so this reaches only it and
      # anything it started.
      try:
        os.killpg(self.proc.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
      self.proc.wait()

  # -- the files

  def json_path(self) -> pathlib.Path:
    return self.out / f"{slug((self.device or {}).get('kind', 'unknown'))}.json"

  def md_path(self) -> pathlib.Path:
    return self.json_path().with_suffix(".md")

  def document(self) -> dict:
    items = [self.results[it.name] for it in self.items]
    return {
      "suite": "bench/gpu_suite.py",
      "command": " ".join(["python", "bench/gpu_suite.py", *sys.argv[1:]]),
      "smoke": bool(self.args.smoke),
      "started": datetime.datetime.fromtimestamp(self.start).isoformat(timespec="seconds"),
      "updated": _now(),
      "elapsed_s": round(time.time() - self.start, 1),
      "budget_s": self.budget,
      "finished": self.finished,
      "device": self.device,
      "items": sorted(items + self.previous, key=self._order),
    }

  def _order(self, r: dict) -> int:
    names = item_names(bool(self.args.smoke))
    return names.index(r["name"]) if r["name"] in names else len(names)

  def write(self) -> None:
    doc = self.document()
    _atomic_write(self.json_path(), json.dumps(_finite(doc), indent=2) + "\n")
    _atomic_write(self.md_path(), markdown(doc))


def _now() -> str:
  return datetime.datetime.now().isoformat(timespec="seconds")


def _atomic_write(path: pathlib.Path, text: str) -> None:
  # A reader (or a kill) mid-write must never see half a file.
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)


def _finite(x):
  """JSON has no NaN: non-finite floats become null."""
  if isinstance(x, float) and not math.isfinite(x):
    return None
  if isinstance(x, dict):
    return {k: _finite(v) for k, v in x.items()}
  if isinstance(x, list | tuple):
    return [_finite(v) for v in x]
  return x


def _derive(r: dict, peak: float | None) -> None:
  """Throughput, achieved TFLOP/s and MFU from an item's raw seconds and FLOPs."""
  seconds = r.get("seconds_per_call")
  if not seconds:
    return
  if r.get("batch"):
    r["images_per_s"] = r["batch"] / seconds
  if r.get("flops_per_call"):
    tflops = r["flops_per_call"] / seconds / 1e12
    r["tflops_per_s"] = tflops
    r["mfu"] = tflops / peak if peak else None


# ------------------------------------------------------------------------------------------------
# The markdown table

COLUMNS = (
  "item",
  "status",
  "batch",
  "compile s",
  "GiB / device",
  "TFLOP / call",
  "ms / call",
  "images/s",
  "TFLOP/s",
  "MFU",
  "notes",
)


def _fmt(x, spec: str) -> str:
  if x is None or (isinstance(x, float) and not math.isfinite(x)):
    return "–"
  return format(x, spec)


def row(r: dict) -> str:
  status = r.get("status", "pending")
  gib = r.get("memory_bytes")
  flops = r.get("flops_per_call")
  seconds = r.get("seconds_per_call")
  cells = [
    r["name"],
    status,
    _fmt(r.get("batch"), "d"),
    _fmt(r.get("compile_s"), ".1f"),
    _fmt(gib / 2**30 if gib else None, ".2f"),
    _fmt(flops / 1e12 if flops else None, ".3g"),
    _fmt(1e3 * seconds if seconds else None, ".1f"),
    _fmt(r.get("images_per_s"), ".1f"),
    _fmt(r.get("tflops_per_s"), ".3g"),
    "–" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%",
    notes(r),
  ]
  return "| " + " | ".join(c.replace("|", "/") for c in cells) + " |"


def notes(r: dict) -> str:
  parts = []
  if r.get("error"):
    msg = " ".join(str(r["error"]).split())
    parts.append(msg if len(msg) <= 160 else msg[:157] + "...")
  if r.get("encode_s") is not None:
    parts.append(
      f"encode {1e3 * r['encode_s']:.1f} ms, AR steps {1e3 * r['steps_s']:.1f} ms, "
      f"decode {1e3 * r['decode_s']:.1f} ms (parts compile {r['parts_compile_s']:.1f} s)"
    )
  if r.get("seconds_per_call") and r.get("batch") and r["name"].startswith("inference"):
    parts.append(f"{1e3 * r['seconds_per_call'] / r['batch']:.2f} ms / image")
  if r.get("batch_note"):
    parts.append(r["batch_note"])
  if r.get("all_cores_per_s") is not None:
    parts.append(
      f"examples/s; {r['all_cores_per_s']:.0f} with {r['threads_all']} reader threads; "
      f"device six levels {r['device_levels_per_s']:.0f}/s; dataset build {r['setup_s']:.0f} s"
    )
  if r.get("params") is not None:
    n = r["params"]
    count = f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n:,}"
    parts.append(f"{count} params, {r.get('dtype', '')}")
  if r.get("calls_timed") is not None:
    parts.append(f"{r['calls_timed']} timed")
  if r.get("wall_s") is not None:
    parts.append(f"{r['wall_s']:.0f} s in all")
  return "; ".join(p for p in parts if p)


def markdown(doc: dict) -> str:
  dev = doc.get("device") or {}
  peak = dev.get("peak_bf16_tflops")
  kind = dev.get("kind", "unknown device")
  head = [f"# `bench/gpu_suite.py` on {kind}", ""]
  state = "finished" if doc["finished"] else "in progress or cut off"
  head.append(
    f"`{doc['command']}`, started {doc['started']}, {doc['elapsed_s']:.0f} s of a "
    f"{doc['budget_s']:.0f} s budget ({state})."
  )
  if dev:
    limit = dev.get("memory_limit_bytes")
    head.append(
      f"JAX {dev.get('jax')}, {dev.get('platform')}, the first of {dev.get('count')} device(s); "
      f"memory limit {f'{limit / 2**30:.1f} GiB' if limit else 'not reported'}; "
      f"{dev.get('host_cores')} host cores; peak "
      + (f"{peak:g} TFLOP/s dense bf16 ({dev.get('peak_source')})" if peak else "unknown (no MFU)")
      + "."
    )
  head += [
    "",
    "| " + " | ".join(COLUMNS) + " |",
    "|" + "---|" * len(COLUMNS),
  ]
  lines = head + [row(r) for r in doc["items"]]
  lines += [
    "",
    "FLOPs are XLA's cost analysis of the compiled call (rematerialised recomputation included);",
    "MFU = those FLOPs / time / peak. Train steps: one step per call, batch = images; inference:",
    "one reconstruction of the batch per call; loader: one host batch per call, examples/s.",
    "Random weights, noise inputs, one device.",
    "",
  ]
  return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# The worker: one process, the items in order


class Worker:
  def __init__(self, spec: dict):
    import jax

    self.spec = spec
    self.smoke = spec["smoke"]
    self.sizes = SMOKE if self.smoke else PAPER
    self.events = open(spec["events"], "a")  # noqa: SIM115 (open for the worker's life)
    self.scratch = pathlib.Path(spec["scratch"])
    self.deadline = spec["deadline"]
    self.jax = jax
    self.mesh = None
    self.inference_setup = None

  def emit(self, **event) -> None:
    self.events.write(json.dumps(_finite(event), default=_jsonable) + "\n")
    self.events.flush()

  def run(self) -> int:
    import jax

    from nextaccel_jax import sharding
    from nextaccel_jax.stages import common

    if self.spec["cache_dir"]:
      jax.config.update("jax_compilation_cache_dir", self.spec["cache_dir"])
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    if self.smoke:
      # Tiny programs spend far longer in XLA's optimisation passes than running.
      jax.config.update("jax_disable_most_optimizations", True)
    dev = jax.devices()[0]
    self.mesh = sharding.make_mesh((("data", 1), ("fsdp", 1)), devices=[dev])
    import jaxlib

    self.emit(
      event="probe",
      device={
        "kind": dev.device_kind,
        "slug": slug(dev.device_kind),
        "platform": dev.platform,
        "count": jax.device_count(),
        "memory_limit_bytes": common.device_memory_limit(),
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "host_cores": os.cpu_count(),
      },
    )
    no_accelerator = dev.platform == "cpu" and not (self.smoke or self.spec["allow_cpu"])
    for spec in self.spec["items"]:
      item = Item(**spec)
      if no_accelerator:
        # Paper sizes on a CPU take hours: most likely JAX lacks its CUDA or TPU plugin here.
        error = "JAX sees no accelerator, only the CPU (is a CUDA/TPU jaxlib installed?)"
        self.emit(event="done", item=item.name, status="error", fields={"error": error})
        continue
      left = self.deadline - time.time()
      if left < item.min_s:
        self.emit(
          event="done",
          item=item.name,
          status="skipped",
          fields={"error": f"{left:.0f} s of the budget left, it needs {item.min_s:.0f} s"},
        )
        continue
      self.emit(event="start", item=item.name)
      try:
        if not item.name.startswith("inference"):
          self.inference_setup = None
        fields = getattr(self, "_" + item.name.split("_")[0])(item)
        status = "ok"
      except Exception as e:  # noqa: BLE001 (an item's failure is a result, not the end)
        traceback.print_exc()
        fields, status = {"error": _message(e)}, "error"
      self.emit(event="done", item=item.name, status=status, fields=fields)
      self._release()
    return 0

  def _release(self) -> None:
    import gc

    gc.collect()
    self.jax.clear_caches()

  # -- timing

  def _time_calls(self, call, repeats: int) -> tuple[float, int]:
    """One warm-up call, then as many as fit `target_s` (≥ 2, ≤ `repeats`); seconds per call."""
    jax = self.jax
    t = time.perf_counter()
    jax.block_until_ready(call())
    warm = time.perf_counter() - t
    n = max(2, min(repeats, int(self.sizes.target_s / max(warm, 1e-6))))
    t = time.perf_counter()
    for _ in range(n):
      out = call()
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / n, n

  # -- train steps

  def _train(self, item: Item, stage: str, config, batch_size: int) -> dict:
    import steplib

    from nextaccel_jax import testing
    from nextaccel_jax.models import layers

    config.data.batch_size = batch_size
    step = testing.stage_step(stage, config, self.mesh, total_steps=100_000)
    batch = steplib.noise_batch(batch_size, config.data.image_size, self.mesh)
    frozen = step.frozen
    compiled, compile_s, mem, flops = steplib.compile_measured(
      step.train, step.state, batch, *frozen
    )
    fields = {
      "batch": batch_size,
      "dtype": str(config.model.dtype),
      "remat": str(config.model.get("remat", "")),
      "params": layers.count_params(step.state.params),
      "compile_s": compile_s,
      "flops_per_call": flops,
      **_memory_fields(mem),
    }
    self.emit(event="partial", item=item.name, fields=fields)
    _check_fits(mem)
    state = step.state

    def call():
      nonlocal state
      state, metrics = compiled(state, batch, *frozen)
      return metrics

    seconds, n = self._time_calls(call, self.sizes.steps)
    return {**fields, "seconds_per_call": seconds, "calls_timed": n}

  def _stage2(self, item: Item) -> dict:
    from configs import transformer as transformer_config

    config = transformer_config.get_config("student", self.sizes.preset)
    if self.smoke:
      shrink(config)
    else:
      config.model.dtype = "bfloat16"
    return self._train(item, "transformer", config, item.batch)

  def _stage1(self, item: Item) -> dict:
    from configs import aqvae as aqvae_config

    config = aqvae_config.get_config(self.sizes.preset)
    if self.smoke:
      shrink(config)
    else:
      config.model.dtype = "bfloat16"
    return self._train(item, "aqvae", config, item.batch)

  def _distill(self, item: Item) -> dict:
    from configs import distill as distill_config

    tried = []
    for b in self.sizes.distill_batches:
      config = distill_config.get_config(self.sizes.preset)
      if self.smoke:
        shrink(config)
      fields = None
      try:
        fields = self._train(item, "distill", config, b)
      except Exception as e:  # noqa: BLE001 (a smaller batch may fit)
        if not _out_of_memory(e) or b == self.sizes.distill_batches[-1]:
          raise
        tried.append(f"batch {b} did not fit ({_message(e)[:80]})")
      if fields is None:
        # Outside the except block: the exception's traceback holds the failed attempt's arrays.
        self._release()
        continue
      preset = self.sizes.distill_batches[0]
      note = f"the preset's batch ({preset})" if b == preset else "; ".join(tried)
      return {**fields, "batch_note": note}
    raise AssertionError("unreachable")

  # -- inference

  def _inference(self, item: Item) -> dict:
    import inference as inference_bench

    from nextaccel_jax.models import layers

    setup_s = 0.0
    if self.inference_setup is None:
      t = time.perf_counter()
      adjust = shrink if self.smoke else None
      self.inference_setup = inference_bench.build(self.sizes.preset, adjust=adjust)
      setup_s = time.perf_counter() - t
    setup = self.inference_setup
    base = {
      "batch": item.batch,
      "dtype": str(setup.config.model.dtype),
      "params": layers.count_params(setup.params),
      "setup_s": setup_s,
    }

    def fields_of(r: dict) -> dict:
      out = {
        **base,
        "compile_s": r["compile_s"],
        "flops_per_call": r["flops"],
        "seconds_per_call": r["whole_s"],
        "calls_timed": self.sizes.repeats,
        **_memory_fields(r["memory"]),
      }
      for k in ("parts_compile_s", "encode_s", "steps_s", "decode_s"):
        if k in r:
          out[k] = r[k]
      return out

    def on_whole(r: dict) -> None:
      self.emit(event="partial", item=item.name, fields=fields_of(r))

    r = inference_bench.measure_batch(setup, item.batch, self.sizes.repeats, on_whole=on_whole)
    return fields_of(r)

  # -- loader

  def _loader(self, item: Item) -> dict:
    import data as data_bench

    from nextaccel_jax import sharding
    from nextaccel_jax.data import pipeline

    cfg = dict(self.sizes.loader)
    batch_size = cfg.pop("batch")
    batches = LOADER_BATCHES[self.sizes.preset]
    t = time.perf_counter()
    builder = data_bench.loader_dataset(self.scratch / "tfds", **cfg)
    setup_s = time.perf_counter() - t
    source = builder.as_data_source()["train"]
    rates = {}
    threads_all = max(2, os.cpu_count() or 2)
    for threads in (2, threads_all):
      loader = pipeline.TrainLoader(
        source, global_batch_size=batch_size, mesh=self.mesh, num_threads=threads
      )
      try:
        rates[threads] = data_bench.host_rate_of(loader, batches, batch_size)
      finally:
        loader.close()
      fields = {
        "batch": batch_size,
        "setup_s": setup_s,
        "seconds_per_call": batch_size / rates[2],
        "calls_timed": batches,
      }
      self.emit(event="partial", item=item.name, fields=fields)
    levels_fn = pipeline.make_levels_fn(self.mesh)
    loader = pipeline.TrainLoader(source, global_batch_size=batch_size, mesh=self.mesh)
    try:
      dev = sharding.global_batch(loader.host_batch(0), self.mesh)
    finally:
      loader.close()
    device_s, _ = self._time_calls(lambda: levels_fn(dev), batches)
    return {
      **fields,
      "all_cores_per_s": rates[threads_all],
      "threads_all": threads_all,
      "device_levels_per_s": batch_size / device_s,
    }


def _memory_fields(mem) -> dict:
  if mem is None:
    return {"memory_bytes": None}
  return {
    "memory_bytes": mem.total,
    "memory": {
      "arguments": mem.arguments,
      "outputs": mem.outputs,
      "donated": mem.aliased,
      "temporaries": mem.temporaries,
    },
  }


def _check_fits(mem) -> None:
  from nextaccel_jax.stages import common

  limit = common.device_memory_limit()
  if mem is not None and limit and mem.total > limit:
    raise MemoryError(
      f"the compiled step needs {common.format_bytes(mem.total)} per device, more than the "
      f"{common.format_bytes(limit)} the device allows (RESOURCE_EXHAUSTED before running)"
    )


def _out_of_memory(e: BaseException) -> bool:
  return isinstance(e, MemoryError) or bool(
    re.search(r"RESOURCE_EXHAUSTED|out of memory|OOM", str(e), re.I)
  )


def _message(e: BaseException) -> str:
  text = f"{type(e).__name__}: {e}"
  return text if len(text) <= 1000 else text[:997] + "..."


def _jsonable(x):
  try:
    return float(x)
  except (TypeError, ValueError):
    return str(x)


def _watch_parent() -> None:
  """Ends the worker when the suite's process is gone (killed with no chance to stop it)."""
  parent = os.getppid()

  def watch():
    while True:
      if os.getppid() != parent:
        os._exit(3)
      time.sleep(1.0)

  threading.Thread(target=watch, daemon=True).start()


def worker(spec_path: pathlib.Path) -> int:
  _watch_parent()
  sys.path[:0] = [str(BENCH), str(ROOT)]
  spec = json.loads(spec_path.read_text())
  return Worker(spec).run()


if __name__ == "__main__":
  sys.exit(main())
