"""lcjax's imports run one way: no cycles, and each module imports only from its own layer or
a lower one. Read from the source (ast), nothing is imported.

    base (lcjax, lcjax.config, lcjax.errors, lcjax.cli, lcjax.workdir, lcjax.paths) < kernels
      < parallel < models < data < run < train / eval < launch < sweep < CLIs

lcjax.launch runs where JAX may not be installed: it loads nothing that imports jax.
"""

import ast
import os
import pkgutil

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lcjax")

# (layer, module prefixes), lowest first. The run layer holds what the run's assembly needs from
# train/: the optimizer and the train state's shapes and shardings (they stay in train/, where
# their callers import them from); the train loop and eval sit on top of it.
LAYERS = [
    ("base", ("lcjax", "lcjax.config", "lcjax.errors", "lcjax.cli", "lcjax.workdir",
              "lcjax.paths")),
    ("kernels", ("lcjax.kernels",)),
    ("parallel", ("lcjax.parallel",)),
    ("models", ("lcjax.models",)),
    ("data", ("lcjax.data",)),
    # The configs a run is assembled from live here too: the optimizer, state and stages.
    ("run", ("lcjax.run", "lcjax.train.optim", "lcjax.train.state", "lcjax.train.stages")),
    ("train/eval", ("lcjax.train", "lcjax.eval", "lcjax.convert")),
    # CLI level: it starts lcjax.train in other processes and imports none of the above.
    ("launch", ("lcjax.launch",)),
    # Sweeps start the CLIs as processes (locally or as a SLURM job array) and read what they
    # write: at the CLIs' level.
    ("sweep", ("lcjax.sweep",)),
]
CLI_LAYER = len(LAYERS)  # lcjax.<package>.__main__
PACKAGES = sorted({m.split(".")[1] if "." in m else m for _, ms in LAYERS for m in ms})


def _modules(path=ROOT, prefix="lcjax") -> dict[str, str]:
  """{module name: source file} of the package at `path` and everything under it."""
  found = {prefix: os.path.join(path, "__init__.py")}
  for info in pkgutil.iter_modules([path]):
    name = f"{prefix}.{info.name}"
    if info.ispkg:
      found.update(_modules(os.path.join(path, info.name), name))
    else:
      found[name] = os.path.join(path, info.name + ".py")
  return found


MODULES = _modules()


def _resolve(name: str) -> str | None:
  """The lcjax module an import of `name` loads (the longest known prefix), or None."""
  while name and name not in MODULES:
    name = name.rpartition(".")[0]
  return name or None


def _imports(module: str) -> list[tuple[str, int]]:
  """(imported lcjax module, line) for every import in `module`, at any depth (module level,
  inside functions, ...)."""
  with open(MODULES[module]) as f:
    tree = ast.parse(f.read())
  package = module if MODULES[module].endswith("__init__.py") else module.rpartition(".")[0]
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")
        base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
      # `from a import b` loads a.b when that is a module, else a.
      names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    else:
      continue
    found += [(m, node.lineno) for m in map(_resolve, names) if m and m != module]
  return found


GRAPH = {m: _imports(m) for m in MODULES}


def layer(module: str) -> int:
  if module.endswith(".__main__"):
    return CLI_LAYER
  best = max(((len(p), i) for i, (_, prefixes) in enumerate(LAYERS) for p in prefixes
              if module == p or module.startswith(p + ".")), default=None)
  assert best is not None, f"{module} is in no layer: add it to LAYERS"
  return best[1]


def layer_name(module: str) -> str:
  i = layer(module)
  return "CLIs" if i == CLI_LAYER else LAYERS[i][0]


def cycles() -> list[list[str]]:
  """Import cycles (lists of modules, the first repeated last): in each strongly connected
  component, the shortest cycle through each of its modules, each cycle once."""
  index, low, stack, on_stack, components = {}, {}, [], set(), []

  def visit(v):  # Tarjan
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w, _ in GRAPH[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = set()
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.add(w)
        if w == v:
          break
      if len(component) > 1:
        components.append(component)

  for m in sorted(MODULES):
    if m not in index:
      visit(m)
  unique = {}
  for component in components:
    for start in sorted(component):
      cycle = _cycle_through(start, component)
      unique.setdefault(frozenset(cycle), cycle)
  return list(unique.values())


def _cycle_through(start: str, component: set[str]) -> list[str]:
  """A shortest cycle from `start` back to it within the component (breadth-first)."""
  paths = {start: [start]}
  frontier = [start]
  while frontier:
    nxt = []
    for v in frontier:
      for w, _ in GRAPH[v]:
        if w == start:
          return paths[v] + [start]
        if w in component and w not in paths:
          paths[w] = paths[v] + [w]
          nxt.append(w)
    frontier = nxt
  raise AssertionError(component)


def _in_package(module: str, package: str) -> bool:
  return module == package or module.startswith(f"lcjax.{package}")


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycles(package):
  found = [c for c in cycles() if any(_in_package(m, package) for m in c)]
  assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_only_from_the_same_or_a_lower_layer(package):
  wrong = [f"{m} ({layer_name(m)}) imports {dep} ({layer_name(dep)}), line {line}"
           for m in sorted(MODULES) if _in_package(m, package)
           for dep, line in GRAPH[m] if layer(dep) > layer(m)]
  assert not wrong, "\n".join(wrong)


def _loaded_by(module: str) -> set[str]:
  """Every lcjax module importing `module` runs (parent packages' __init__ included)."""
  seen, todo = set(), [module]
  while todo:
    m = todo.pop()
    if m in seen:
      continue
    seen.add(m)
    parents = [".".join(m.split(".")[:i]) for i in range(1, m.count(".") + 1)]
    todo += [dep for dep, _ in GRAPH[m]] + parents
  return seen


def _defines_configurable(module: str) -> bool:
  with open(MODULES[module]) as f:
    source = f.read()
  return "gin.configurable" in source and any(
      "configurable" in ast.unparse(d)
      for node in ast.walk(ast.parse(source))
      if isinstance(node, (ast.FunctionDef, ast.ClassDef)) for d in node.decorator_list)


@pytest.mark.parametrize("cli", ["lcjax.train.__main__", "lcjax.eval.__main__"])
def test_each_cli_imports_every_configurable_before_parsing(cli):
  configurable = {m for m in MODULES if _defines_configurable(m)}
  assert configurable - _loaded_by(cli) == set()


def _imports_jax(module: str) -> bool:
  with open(MODULES[module]) as f:
    tree = ast.parse(f.read())
  names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
  names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
  return any(n == "jax" or n.startswith(("jax.", "jaxlib", "flax", "orbax")) for n in names)


def test_launch_loads_no_jax():
  loaded = _loaded_by("lcjax.launch.__main__")
  assert "lcjax.launch.slurm" in loaded and "lcjax.launch.tpu" in loaded
  assert sorted(m for m in loaded if _imports_jax(m)) == []
