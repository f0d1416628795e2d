"""The package's layering: no module imports one above it, and no import cycles.

Every import statement of every module under funmatch/ counts, those inside
functions too (they still tie the modules together), read with `ast`.
"""
import ast
import os

from conftest import repo_path

# Low to high; a module may import its own layer or lower ones. The first prefix
# that matches a module's name gives its layer.
LAYERS = (
    ("base", ("funmatch.errors", "funmatch.fileio", "funmatch.cache", "funmatch.console",
              "funmatch.lease", "funmatch.images", "funmatch.checkpoint",
              "funmatch.distributed", "funmatch.process_cache", "funmatch.parallel",
              "funmatch.gcs_retry",
              "funmatch.timing")),
    ("models", ("funmatch.models",)),
    ("weights", ("funmatch.weights",)),
    ("inference", ("funmatch.student", "funmatch.predict", "funmatch")),
    ("training parts", ("funmatch.data", "funmatch.distill", "funmatch.optim",
                        "funmatch.teaching", "funmatch.config_util", "funmatch.overrides")),
    ("train", ("funmatch.train", "funmatch.configs")),
)


def layer_of(module: str) -> int:
  for index, (_, prefixes) in enumerate(LAYERS):
    if any(module == p or module.startswith(p + ".") for p in prefixes if p != "funmatch"):
      return index
  if module == "funmatch":
    return [name for name, _ in LAYERS].index("inference")
  raise AssertionError(f"{module} is in no layer; add it to LAYERS")


def package_modules() -> dict[str, str]:
  """{dotted module name: file} of every module under funmatch/."""
  root = repo_path("funmatch")
  found = {}
  for directory, _, names in os.walk(root):
    for name in names:
      if name.endswith(".py"):
        path = os.path.join(directory, name)
        parts = os.path.relpath(path, os.path.dirname(root))[:-3].split(os.sep)
        if parts[-1] == "__init__":
          parts = parts[:-1]
        found[".".join(parts)] = path
  return found


def imports_of(path: str, modules) -> set[str]:
  """The funmatch modules a file imports (`from a.b import c` is a.b.c if that
  is a module, else a.b)."""
  tree = ast.parse(open(path, encoding="utf-8").read())
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules
               else node.module for alias in node.names]
    else:
      continue
    for name in names:
      if name == "funmatch.configs" or name.startswith("funmatch.configs."):
        found.add("funmatch.configs")  # recipe files, shipped as funmatch.configs
      elif name.split(".")[0] == "funmatch":
        found.add(name)
  return found


def import_graph():
  modules = package_modules()
  return {name: imports_of(path, modules) for name, path in modules.items()}


def test_no_module_imports_a_higher_layer():
  upward = [f"{module} ({LAYERS[layer_of(module)][0]}) imports {target} "
            f"({LAYERS[layer_of(target)][0]})"
            for module, targets in import_graph().items() for target in targets
            if layer_of(target) > layer_of(module)]
  assert not upward, "\n".join(upward)


def test_the_inference_api_does_not_import_the_trainer():
  graph = import_graph()
  for module in ("funmatch", "funmatch.student", "funmatch.predict"):
    assert not [t for t in graph[module] if t.startswith("funmatch.train")], module


def test_no_import_cycles():
  graph = import_graph()
  state, stack = {}, []

  def visit(module):
    state[module] = "open"
    stack.append(module)
    for target in sorted(graph.get(module, ())):
      if state.get(target) == "open":
        cycle = stack[stack.index(target):] + [target]
        raise AssertionError("import cycle: " + " -> ".join(cycle))
      if target not in state:
        visit(target)
    stack.pop()
    state[module] = "done"

  for module in sorted(graph):
    if module not in state:
      visit(module)


def test_the_layer_check_sees_an_upward_import(tmp_path):
  # The checker itself: a weights module importing the trainer is caught.
  path = tmp_path / "bad.py"
  path.write_text("def f():\n  from funmatch.train import build\n")
  targets = imports_of(str(path), package_modules())
  assert targets == {"funmatch.train.build"}
  assert layer_of("funmatch.train.build") > layer_of("funmatch.weights.layouts")
