"""The package's layout rules: each layer imports only from the layers below it (or its own
package), no import cycle, no module over 400 lines."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "mae_jax"
# Lowest first. A module may import from its own layer and the layers before it.
LAYERS = [
    ["errors", "config_lib"],
    ["runtime"],
    ["models"],
    ["data"],
    ["config_check"],
    ["io"],
    ["evaluators"],
    ["train"],
    ["tools"],
    ["cli"],
    ["main", "probe", "finetune", "evaluate", "prepare", "convert", "compile", "bench", "study", "sweep",
     "lpips"],
]
MAX_LINES = 400


def modules() -> dict:
  """Dotted name under mae_jax -> path, for every module of the package."""
  return {".".join(p.relative_to(PACKAGE).with_suffix("").parts): p for p in PACKAGE.rglob("*.py")}


def imports(path: pathlib.Path, known) -> set:
  """The package's modules `path` imports, at any depth of the file (functions included)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mae_jax":
      base = node.module[len("mae_jax"):].lstrip(".")
      for alias in node.names:
        name = f"{base}.{alias.name}".lstrip(".")
        found.add(name if name in known else base)
    elif isinstance(node, ast.Import):
      found |= {a.name[len("mae_jax."):] for a in node.names if a.name.startswith("mae_jax.")}
  return {m for m in found if m and not m.endswith("__init__")}


def layer(module: str) -> int:
  top = module.split(".")[0]
  for i, names in enumerate(LAYERS):
    if top in names:
      return i
  raise AssertionError(f"mae_jax.{module} is in no layer: add its package to LAYERS in {__file__}")


def graph() -> dict:
  mods = modules()
  known = set(mods)
  return {m: imports(p, known) for m, p in mods.items() if not m.endswith("__init__")}


def test_every_module_has_a_layer_and_imports_nothing_above_it():
  upward = [f"mae_jax.{m} (layer {layer(m)}) imports mae_jax.{d} (layer {layer(d)})"
            for m, deps in sorted(graph().items()) for d in sorted(deps) if layer(d) > layer(m)]
  assert not upward, "imports against the layering:\n" + "\n".join(upward)


def test_no_import_cycle():
  g = graph()
  state, cycles = {}, []

  def visit(m, path):
    state[m] = "open"
    for d in sorted(g.get(m, ())):
      if state.get(d) == "open":
        cycles.append(" -> ".join(path[path.index(d):] + [d]) if d in path else f"{m} -> {d}")
      elif d not in state:
        visit(d, path + [d])
    state[m] = "done"

  for m in sorted(g):
    if m not in state:
      visit(m, [m])
  assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checks_see_an_upward_import_and_a_cycle(tmp_path):
  """The two checks above are live: an import from a lower layer up, and a cycle, are found."""
  (tmp_path / "a.py").write_text("from mae_jax.train import loop\n")
  assert imports(tmp_path / "a.py", {"train.loop"}) == {"train.loop"}
  assert layer("models.mae") < layer("train.loop")
  (tmp_path / "b.py").write_text("def f():\n  from mae_jax import cli\n")  # inside a function too
  assert imports(tmp_path / "b.py", {"cli"}) == {"cli"}


def test_no_module_over_400_lines():
  long = {m: n for m, p in modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
  assert not long, f"modules over {MAX_LINES} lines (split them by concern): {long}"


BENCHMARKS = PACKAGE.parent / "benchmarks"


def benchmark_graph() -> dict:
  """benchmarks/ module -> the benchmarks/ modules it imports (`from benchmarks import x`)."""
  g = {}
  for path in BENCHMARKS.glob("*.py"):
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "benchmarks":
        deps |= ({a.name for a in node.names} if node.module == "benchmarks" else {node.module.split(".")[1]})
    g[path.stem] = deps - {"__init__"}
  return g


def test_benchmarks_form_no_cycle_and_leave_the_import_path_alone():
  """The harnesses run as `python -m benchmarks.<name>` from the repository root and import each
  other one way only; none edits sys.path."""
  g = benchmark_graph()
  assert g["official_diagnostics"] >= {"train_vs_official"}  # the check sees imports
  closure = {m: set(d) for m, d in g.items()}
  for _ in g:
    for m in closure:
      closure[m] |= set().union(*(closure.get(d, set()) for d in closure[m]))
  assert not [m for m in closure if m in closure[m]], f"import cycles in benchmarks/: {g}"
  edits = [p.name for p in BENCHMARKS.glob("*.py") if "sys.path" in p.read_text()]
  assert not edits, f"benchmarks that edit sys.path: {edits}"


def _top_level_names(path: pathlib.Path) -> set:
  """What `module.name` can reach in a module: its top-level definitions, assignments and imports
  (those inside top-level if/try blocks included)."""
  tree, found = ast.parse(path.read_text()), set()
  for node in tree.body:
    for sub in ([node] if not isinstance(node, (ast.If, ast.Try)) else list(ast.walk(node))):
      if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        found.add(sub.name)
      elif isinstance(sub, (ast.Assign, ast.AnnAssign)):
        for target in (sub.targets if isinstance(sub, ast.Assign) else [sub.target]):
          found |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
      elif isinstance(sub, (ast.Import, ast.ImportFrom)):
        found |= {(a.asname or a.name).split(".")[0] for a in sub.names}
  return found


def test_every_module_attribute_used_exists():
  """`module.name` for a module of the package or of benchmarks/ names something the module
  defines: what a move between modules can leave behind and only a run would find."""
  root, missing = PACKAGE.parent, []
  files = [*PACKAGE.rglob("*.py"), *BENCHMARKS.glob("*.py"), *(root / "tests").rglob("*.py")]
  for path in files:
    tree, aliases = ast.parse(path.read_text()), {}
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("mae_jax", "benchmarks"):
        for a in node.names:
          target = root / (node.module.replace(".", "/") + f"/{a.name}.py")
          if target.exists():
            aliases[a.asname or a.name] = target
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
          and node.attr not in _top_level_names(aliases[node.value.id])):
        missing.append(f"{path.relative_to(root)}:{node.lineno} {node.value.id}.{node.attr}")
  assert not missing, "attributes their modules do not define:\n" + "\n".join(missing)
