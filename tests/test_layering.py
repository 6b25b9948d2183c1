"""The package's one-way layers: which part of `nextaccel_jax` may import which.

The checker reads the source with `ast` and never imports it, so it runs in milliseconds, needs
none of the package's dependencies, and judges whatever tree is on disk. Every import statement
counts, wherever it sits: a function-level import still runs, so it can still close a cycle.
"""

import ast
import dataclasses
import pathlib
import textwrap

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "nextaccel_jax"
ROOT = "nextaccel_jax"

# Groups are listed bottom-up, which is also the order the allowed groups are named in messages.
_BASE = ("models", "sharding", "optim", "losses", "checkpointing", "data", "convert")
_BASE += ("evaluation", "inference", "export")
GROUPS = _BASE + ("stages", "testing", "main")

# A group may always import its own modules (the cycle check and, inside `stages`, the stage
# order still apply), so an own group listed here only repeats what holds anyway.
ALLOWED: dict[str, tuple[str, ...]] = {
  "models": ("models",),
  "sharding": (),
  "optim": (),
  "losses": ("models",),
  "checkpointing": ("sharding",),
  "data": ("data", "sharding"),
  "convert": ("convert", "models", "checkpointing"),
  "evaluation": ("evaluation", "models", "data", "losses", "sharding"),
  "inference": ("models", "data"),
  "export": ("models", "data", "checkpointing", "inference", "sharding"),
  "stages": _BASE + ("stages",),
  "testing": _BASE + ("stages", "testing"),
  "main": GROUPS,
}

# The package's own `__init__` sits below every layer: it imports nothing from the package, so
# importing it (e.g. for a version string) can never reach back up.
INIT = "__init__"

# Each stage builds on the ones before it; a new stage has to be given a place here.
STAGE_ORDER = (
  "common",
  "data",
  "stage1_aqvae",
  "stage2_transformer",
  "stage3_distill",
  "baseline",
  "evaluate",
  "ablations",
  "pipeline",
)

_LAZY_STAGES = "`--help` and config errors answer without loading every stage"
LAZY_IMPORTS: dict[tuple[str, str], str] = {
  (f"{ROOT}.main", f"{ROOT}.stages.{stage}"): _LAZY_STAGES
  for stage in (
    "data",
    "stage1_aqvae",
    "stage2_transformer",
    "stage3_distill",
    "evaluate",
    "pipeline",
    "baseline",
    "ablations",
  )
}


@dataclasses.dataclass(frozen=True)
class Import:
  source: str
  target: str
  line: int
  text: str
  in_function: bool


def _module_names(package_dir: pathlib.Path) -> dict[str, pathlib.Path]:
  names = {}
  for path in sorted(package_dir.rglob("*.py")):
    parts = path.relative_to(package_dir).with_suffix("").parts
    if "__pycache__" in parts:
      continue
    if parts[-1] == "__init__":
      parts = parts[:-1]
    names[".".join((ROOT, *parts))] = path
  return names


def _short(module: str) -> str:
  return module.removeprefix(ROOT + ".") if module != ROOT else INIT


def group_of(module: str) -> str:
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else INIT


def _stage_index(module: str) -> int | None:
  """Position in STAGE_ORDER; the `stages` package `__init__` comes before every stage."""
  parts = module.split(".")
  if len(parts) == 2:
    return -1
  return STAGE_ORDER.index(parts[2]) if parts[2] in STAGE_ORDER else None


def _walk(node: ast.AST, in_function: bool = False):
  """Yields every import node with whether a function body encloses it."""
  for child in ast.iter_child_nodes(node):
    if isinstance(child, ast.Import | ast.ImportFrom):
      yield child, in_function
    nested = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
    yield from _walk(child, nested)


def _imports_of(
  module: str, is_package: bool, tree: ast.Module, modules: set[str], rel: str
) -> tuple[list[Import], list[str]]:
  imports, problems = [], []
  for node, in_function in _walk(tree):
    if isinstance(node, ast.Import):
      candidates = [(alias.name, None, f"import {alias.name}") for alias in node.names]
    else:
      base = node.module or ""
      if node.level:
        # Relative to the module's package: a package's `__init__` is its own package.
        anchor = module.split(".") if is_package else module.split(".")[:-1]
        if node.level - 1 >= len(anchor):
          problems.append(f"{rel}:{node.lineno}: relative import goes above the package")
          continue
        anchor = anchor[: len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([node.module] if node.module else []))
      written = "." * node.level + (node.module or "")
      candidates = [
        (base, alias.name, f"from {written} import {alias.name}") for alias in node.names
      ]
    for name, attr, text in candidates:
      if name != ROOT and not name.startswith(ROOT + "."):
        continue
      if attr is not None and attr != "*" and f"{name}.{attr}" in modules:
        target = f"{name}.{attr}"
      else:
        target = name
      if target not in modules:
        problems.append(f"{rel}:{node.lineno}: `{text}`: {target} is not a module of the package")
        continue
      imp = Import(module, target, node.lineno, text, in_function)
      # `from x import a, b` of two names of one module is one import of it, reported once.
      if not any((i.target, i.line) == (target, node.lineno) for i in imports[-len(candidates) :]):
        imports.append(imp)
  return imports, problems


def _layer_problem(imp: Import) -> str | None:
  """Why this import breaks the layering, or None when it doesn't."""
  source, target = group_of(imp.source), group_of(imp.target)
  if source == INIT:
    return f"the package's __init__ may import nothing from the package; not {_short(imp.target)}"
  if source == target == "stages":
    here, there = _stage_index(imp.source), _stage_index(imp.target)
    if here is None or there is None:
      return None  # the unknown stage module is reported on its own
    if there >= here:
      earlier = ", ".join(STAGE_ORDER[: max(here, 0)]) or "no other stage"
      module, other = _short(imp.source), _short(imp.target)
      return f"{module} may import only earlier stages ({earlier}); not {other}"
    return None
  if source not in ALLOWED or target not in ALLOWED or target in (source, INIT):
    return None  # an unknown module is reported on its own
  if target not in ALLOWED[source]:
    allowed = ", ".join(ALLOWED[source]) or "nothing from the package"
    return f"{source} may import {allowed}; not {target}"
  return None


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
  """Tarjan's algorithm, iterative so a deep chain of imports cannot hit the recursion limit."""
  index, low, on_stack, stack, components = {}, {}, set(), [], []
  for root in sorted(graph):
    if root in index:
      continue
    work = [(root, iter(sorted(graph[root])))]
    index[root] = low[root] = len(index)
    stack.append(root)
    on_stack.add(root)
    while work:
      node, edges = work[-1]
      for nxt in edges:
        if nxt not in index:
          index[nxt] = low[nxt] = len(index)
          stack.append(nxt)
          on_stack.add(nxt)
          work.append((nxt, iter(sorted(graph[nxt]))))
          break
        if nxt in on_stack:
          low[node] = min(low[node], index[nxt])
      else:
        work.pop()
        if work:
          parent = work[-1][0]
          low[parent] = min(low[parent], low[node])
        if low[node] == index[node]:
          component = []
          while True:
            member = stack.pop()
            on_stack.discard(member)
            component.append(member)
            if member == node:
              break
          components.append(sorted(component))
  return components


def _cycle_in(component: list[str], graph: dict[str, set[str]]) -> list[str]:
  """A shortest cycle through the component's first module, found breadth-first."""
  start, members = component[0], set(component)
  came_from: dict[str, str] = {}
  frontier = [start]
  while frontier:
    following = []
    for node in frontier:
      for nxt in sorted(graph[node] & members):
        if nxt == start:
          path = [node]
          while path[-1] != start:
            path.append(came_from[path[-1]])
          return [*reversed(path), start]
        if nxt not in came_from:
          came_from[nxt] = node
          following.append(nxt)
    frontier = following
  raise AssertionError(f"no cycle in strongly connected component {component}")


def layering_problems(package_dir: pathlib.Path) -> list[str]:
  """Every breach of the layering in the package at `package_dir`, one line each."""
  package_dir = pathlib.Path(package_dir)
  paths = _module_names(package_dir)
  modules = set(paths)
  rel = {name: path.relative_to(package_dir.parent).as_posix() for name, path in paths.items()}
  problems, imports = [], []
  for module, path in paths.items():
    group = group_of(module)
    if group != INIT and group not in ALLOWED:
      problems.append(f"{rel[module]}: unknown module {module}, add it to the layering table")
    elif group == "stages" and _stage_index(module) is None:
      problems.append(
        f"{rel[module]}: stage module {module} is not in STAGE_ORDER, give it its place there"
      )
    try:
      tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError) as e:
      problems.append(f"{rel[module]}: cannot be parsed: {e}")
      continue
    found, unresolved = _imports_of(module, path.name == "__init__.py", tree, modules, rel[module])
    problems += unresolved
    for imp in found:
      where = f"{rel[module]}:{imp.line}: `{imp.text}`"
      why = _layer_problem(imp)
      if why:
        problems.append(f"{where}: {why}")
      if imp.in_function and (imp.source, imp.target) not in LAZY_IMPORTS:
        problems.append(
          f"{where}: imported inside a function; import {_short(imp.target)} at module level "
          "or add the pair to LAZY_IMPORTS with the reason"
        )
    imports += found

  graph: dict[str, set[str]] = {name: set() for name in modules}
  first_edge: dict[tuple[str, str], Import] = {}
  for imp in imports:
    graph[imp.source].add(imp.target)
    first_edge.setdefault((imp.source, imp.target), imp)
  for component in _strongly_connected(graph):
    if len(component) == 1 and component[0] not in graph[component[0]]:
      continue
    cycle = _cycle_in(component, graph)
    edges = []
    for source, target in zip(cycle, cycle[1:], strict=False):
      imp = first_edge[(source, target)]
      lazily = " in a function" if imp.in_function else ""
      edges.append(f"{rel[source]}:{imp.line}{lazily} `{imp.text}`")
    chain = " -> ".join(_short(name) for name in cycle)
    problems.append(f"import cycle: {chain} (via {'; '.join(edges)})")
  return problems


def test_package_follows_the_layering():
  problems = layering_problems(PACKAGE)
  assert problems == [], "the package breaks its import layering:\n" + "\n".join(problems)


def test_layering_table_is_self_consistent():
  assert set(ALLOWED) == set(GROUPS)
  for group, allowed in ALLOWED.items():
    unknown = set(allowed) - set(ALLOWED)
    assert not unknown, f"{group} allows groups that are not in the table: {unknown}"
  assert len(set(STAGE_ORDER)) == len(STAGE_ORDER)
  # One-way: between distinct groups the allowances must form no cycle, or no import order fits.
  between = {g: {a for a in allowed if a != g} for g, allowed in ALLOWED.items()}
  assert [c for c in _strongly_connected(between) if len(c) > 1] == []
  for (source, target), reason in LAZY_IMPORTS.items():
    assert group_of(source) in ALLOWED and group_of(target) in ALLOWED and reason


# Synthetic trees: a fake `nextaccel_jax` written to tmp_path with only the files a case needs.


def _tree(tmp_path: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
  package_dir = tmp_path / ROOT
  for name, source in {"__init__.py": "", **files}.items():
    path = package_dir / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name != "__init__.py":
      (path.parent / "__init__.py").touch()
    path.write_text(textwrap.dedent(source), encoding="utf-8")
  return package_dir


CLEAN = {
  "models/aqvae.py": "import numpy as np\n",
  "models/transformer.py": "from nextaccel_jax.models import aqvae\n",
  "data/transforms.py": "from nextaccel_jax import sharding\n",
  "sharding.py": "",
  "losses.py": "import nextaccel_jax.models.aqvae\n",
  "inference.py": "from nextaccel_jax.models.aqvae import Model\nfrom nextaccel_jax import data\n",
  "export.py": """\
    from nextaccel_jax import inference

    if __name__ == "__main__":
      from nextaccel_jax import checkpointing
  """,
  "checkpointing.py": """\
    from typing import TYPE_CHECKING

    if TYPE_CHECKING:
      import nextaccel_jax
  """,
  "stages/common.py": "from nextaccel_jax import losses\n",
  "stages/stage1_aqvae.py": "from nextaccel_jax.stages import common\n",
  "stages/pipeline.py": "from nextaccel_jax.stages import common, stage1_aqvae\n",
  "main.py": """\
    import nextaccel_jax.export

    def run():
      from nextaccel_jax.stages import pipeline
  """,
}


def test_clean_tree_has_no_problems(tmp_path):
  assert layering_problems(_tree(tmp_path, CLEAN)) == []


def test_function_level_import_cannot_hide_a_cycle(tmp_path):
  files = {
    "inference.py": "def load():\n  from nextaccel_jax import export\n",
    "export.py": "from nextaccel_jax import inference\n",
  }
  problems = layering_problems(_tree(tmp_path, files))
  cycles = [p for p in problems if p.startswith("import cycle")]
  assert len(cycles) == 1
  assert cycles[0].startswith("import cycle: export -> inference -> export")
  assert "nextaccel_jax/inference.py:2 in a function" in cycles[0]
  assert any(
    p.startswith("nextaccel_jax/inference.py:2: `from nextaccel_jax import export`: inference may")
    and p.endswith("not export")
    for p in problems
  )
  assert any("imported inside a function" in p for p in problems)


def test_upward_import_is_reported_with_file_line_and_rule(tmp_path):
  files = {
    "data/summary.py": "import os\n\nfrom nextaccel_jax.evaluation import metrics\n",
    "evaluation/metrics.py": "",
  }
  assert layering_problems(_tree(tmp_path, files)) == [
    "nextaccel_jax/data/summary.py:3: `from nextaccel_jax.evaluation import metrics`: "
    "data may import data, sharding; not evaluation"
  ]


def test_stage_may_not_import_a_later_stage(tmp_path):
  files = {
    "stages/common.py": "",
    "stages/stage2_transformer.py": "from nextaccel_jax.stages import common\n",
    "stages/stage1_aqvae.py": "from nextaccel_jax.stages import stage2_transformer\n",
  }
  assert layering_problems(_tree(tmp_path, files)) == [
    "nextaccel_jax/stages/stage1_aqvae.py:1: `from nextaccel_jax.stages import "
    "stage2_transformer`: stages.stage1_aqvae may import only earlier stages (common, data); "
    "not stages.stage2_transformer"
  ]


def test_stage_outside_the_order_is_reported(tmp_path):
  problems = layering_problems(_tree(tmp_path, {"stages/stage4_extra.py": ""}))
  assert problems == [
    "nextaccel_jax/stages/stage4_extra.py: stage module nextaccel_jax.stages.stage4_extra is "
    "not in STAGE_ORDER, give it its place there"
  ]


def test_relative_imports_resolve_against_the_module_package(tmp_path):
  files = {
    "models/aqvae.py": "",
    "data/masks.py": "",
    "data/summary.py": "from . import masks\nfrom ..models import aqvae\n",
    "data/__init__.py": "from .masks import *\n",
    "models/__init__.py": "from .. import data\n",
  }
  assert layering_problems(_tree(tmp_path, files)) == [
    "nextaccel_jax/data/summary.py:2: `from ..models import aqvae`: "
    "data may import data, sharding; not models",
    "nextaccel_jax/models/__init__.py:1: `from .. import data`: models may import models; not data",
  ]


def test_unknown_top_level_module_is_reported(tmp_path):
  files = {"plotting.py": "from nextaccel_jax import sharding\n", "sharding.py": ""}
  assert layering_problems(_tree(tmp_path, files)) == [
    "nextaccel_jax/plotting.py: unknown module nextaccel_jax.plotting, add it to the layering table"
  ]


def test_import_of_a_missing_module_is_reported(tmp_path):
  problems = layering_problems(_tree(tmp_path, {"main.py": "from nextaccel_jax.stages import x\n"}))
  assert problems == [
    "nextaccel_jax/main.py:1: `from nextaccel_jax.stages import x`: "
    "nextaccel_jax.stages is not a module of the package"
  ]
