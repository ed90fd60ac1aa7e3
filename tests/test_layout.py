"""The floor plan of docs/design.md, checked: every import points down (or within its floor),
no module imports another in a circle, and no module outgrows a file."""

import ast
import os

import pytest
from conftest import REPO_ROOT

PACKAGE = os.path.join(REPO_ROOT, "linfjax")
# docs/design.md's floors, lowest first: a module may import its own floor and those below.
FLOORS = (
    ("linfjax.errors", "linfjax.files", "linfjax.pixels", "linfjax.keys", "linfjax.settings",
     "linfjax.fingerprint"),
    ("linfjax.data",),
    ("linfjax.attacks",),
    ("linfjax.models",),
    ("linfjax.training",),
    ("linfjax.detection",),
    ("linfjax.defenses",),
    ("linfjax.reports",),
    ("linfjax.config",),
    ("linfjax.runs",),
    ("linfjax.api", "linfjax.main", "linfjax.flag_errors", "linfjax.fetch", "linfjax.__main__",
     "linfjax.config.__main__", "linfjax.reports.data_detection", "linfjax"),
)
MAX_LINES = 350


def _modules() -> dict[str, str]:
  """Dotted module name -> path, for every module of the package."""
  found = {}
  for root, _, names in os.walk(PACKAGE):
    for name in names:
      if name.endswith(".py"):
        path = os.path.join(root, name)
        parts = os.path.relpath(path, REPO_ROOT)[:-3].split(os.sep)
        if parts[-1] == "__init__":
          parts = parts[:-1]
        found[".".join(parts)] = path
  return found


MODULES = _modules()


def _floor(module: str) -> int:
  best = None
  for floor, prefixes in enumerate(FLOORS):
    for prefix in prefixes:
      if module == prefix or module.startswith(prefix + "."):
        if best is None or len(prefix) > best[1]:
          best = (floor, len(prefix))
  assert best is not None, f"{module} is on no floor of docs/design.md"
  return best[0]


def _imports(path: str, *, top_level_only: bool) -> set[str]:
  """The linfjax modules a file imports (a `from package import name` counts the submodule
  when `name` is one)."""
  with open(path) as f:
    tree = ast.parse(f.read())
  nodes = tree.body if top_level_only else list(ast.walk(tree))
  found = set()
  for node in nodes:
    if isinstance(node, ast.Import):
      found |= {alias.name for alias in node.names if alias.name.startswith("linfjax")}
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("linfjax"):
      for alias in node.names:
        submodule = f"{node.module}.{alias.name}"
        found.add(submodule if submodule in MODULES else node.module)
  return found


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_import_points_down_the_floor_plan(module):
  floor = _floor(module)
  upward = sorted(other for other in _imports(MODULES[module], top_level_only=False)
                  if _floor(other) > floor)
  assert not upward, f"{module} (floor {floor}) imports {upward} from above"


def test_no_import_circle():
  graph = {module: {m for m in _imports(path, top_level_only=True) if m in MODULES} - {module}
           for module, path in MODULES.items()}
  # A package's __init__ is imported before its modules: `from linfjax.x import y` runs
  # linfjax.x first, so a module importing its own package is an edge to that package.
  state = {}

  def visit(module, trail):
    if state.get(module) == "done":
      return
    assert state.get(module) != "open", f"import circle: {' -> '.join(trail + [module])}"
    state[module] = "open"
    for other in sorted(graph[module]):
      visit(other, trail + [module])
    state[module] = "done"

  for module in sorted(graph):
    visit(module, [])


def test_no_module_over_350_lines():
  long = {module: n for module, path in MODULES.items()
          if (n := sum(1 for _ in open(path))) > MAX_LINES}
  assert not long, long
