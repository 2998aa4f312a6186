"""Reading compiled HLO text: what one run of a program executes, loop bodies counted once per
iteration: its cross-device reductions and collective bytes (`mae_jax.compile`), and the memory
traffic of each kernel, mapped back to the model stage its metadata names (roofline.py)."""

import math
import re

# Cross-device reductions in compiled HLO: all-reduce (also as an async -start) and reduce-scatter.
_REDUCTION = re.compile(r"=\s*(\(.*?\)|\S+)\s+(all-reduce-start|all-reduce|reduce-scatter)\(")
# Every collective, its result shape (async -start forms: a tuple whose last shape is the result).
_COLLECTIVE = re.compile(r"=\s*(\(.*?\)|\S+)\s+(all-gather|all-reduce|reduce-scatter|all-to-all|"
                         r"collective-permute)(-start)?\(")
_SHAPE = re.compile(r"\b([a-z]+)(\d*)\[([0-9,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%(\S+)\s+\(")
_CALLEE = re.compile(r"(?:calls|to_apply|body|condition|true_computation|false_computation)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_LOOP = re.compile(r"condition=%([\w.\-]+), body=%([\w.\-]+)")
_CONSTANT = re.compile(r"=\s*s32\[\]\S*\s+constant\((\d+)\)")
_OPCODE = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(\(.*?\)|\S+)\s+([a-z][\w\-]*)\(")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
# Computations whose work is their caller's: fusion bodies, the wrapped op of an asynchronous
# pair (counted at its -done), and the reducers of reduce-like ops.
_INNER = re.compile(r"\s(fusion|[\w\-]+-start|reduce|reduce-window|reduce-scatter|all-reduce|scatter|"
                    r"select-and-scatter|sort|map)\(.*?(?:calls|to_apply)=%([\w.\-]+)")


def call_graph(hlo_text: str) -> dict:
  """One parse of compiled HLO text: {lines: {computation: its instruction lines}, calls:
  {computation: [(callee, runs per run of the caller)]}, inner: computations whose work is their
  caller's, entry, shapes: {instruction: its result shape} (compiled HLO names operands without
  their shapes)}. A loop body runs its trip count (XLA:CPU and XLA:GPU write it as
  known_trip_count; XLA:TPU's condition compares the counter with a constant), its condition once
  more; a called computation or a conditional's branch once (an upper bound for a branch)."""
  lines, calls, bound, inner, shapes, entry, name = {}, {}, {}, set(), {}, None, None
  for line in hlo_text.splitlines():
    m = _COMPUTATION.match(line)
    if m:
      name = m.group(1)
      lines[name], calls[name] = [], []
      entry = name if line.startswith("ENTRY") else entry
      continue
    if name is None or not line.strip() or line.strip() == "}":
      continue
    lines[name].append(line)
    op = _OPCODE.match(line)
    if op:
      shapes[op.group(1)] = op.group(2)
    constant = _CONSTANT.search(line)
    if constant:
      bound[name] = int(constant.group(1))
    inner.update(m.group(2) for m in _INNER.finditer(line))
    trips = _TRIP_COUNT.search(line)
    loop = _LOOP.search(line) if " while(" in line else None
    callees = _CALLEE.findall(line)
    for branches in _BRANCHES.findall(line):
      callees += [b.strip().lstrip("%") for b in branches.split(",") if b.strip()]
    for callee in callees:
      n = 1
      if loop and callee in loop.groups():  # the body runs n times, the condition n + 1
        extra = int(callee == loop.group(1))
        n = int(trips.group(1)) + extra if trips else ("cond", loop.group(1), extra)
      calls[name].append((callee, n))
  calls = {c: [(callee, bound.get(n[1], 1) + n[2] if isinstance(n, tuple) else n) for callee, n in cs]
           for c, cs in calls.items()}
  return {"lines": lines, "calls": calls, "inner": inner, "entry": entry, "shapes": shapes}


def runs(graph: dict, kernels_only: bool) -> dict:
  """{computation: times one run of the program runs it}; with `kernels_only`, only the
  computations that run as kernels of their own (not fusion bodies, async wrappers, reducers)."""
  times = {}

  def visit(comp, k, seen=()):
    if comp not in graph["lines"] or comp in seen or (kernels_only and comp in graph["inner"]):
      return
    times[comp] = times.get(comp, 0) + k
    for callee, n in graph["calls"][comp]:
      visit(callee, k * n, seen + (comp,))
  visit(graph["entry"], 1)
  return times


def per_run(hlo_text: str, count) -> int:
  """The sum of `count(line)` over the instructions one run of a compiled program executes: a line
  inside a loop body (scanned layers, accumulated micro-batches) counts once per iteration."""
  graph = call_graph(hlo_text)
  return sum(k * sum(count(line) for line in graph["lines"][c]) for c, k in runs(graph, False).items())


def gradient_reductions(hlo_text: str) -> int:
  """Cross-device reductions of non-scalar values (the gradients'; the loss and metrics are
  scalars) that one run of a compiled program executes: one inside a loop body (scanned layers)
  counts once per iteration. XLA may combine several tensors into one reduction."""
  def count(line):
    r = _REDUCTION.search(line)
    return int(bool(r and any(dims for _, _, dims in _SHAPE.findall(r.group(1)))))
  return per_run(hlo_text, count)


def collective_bytes(hlo_text: str) -> int:
  """Bytes that one device's collectives deliver in one run of a compiled (per-device) program:
  the results of its all-gathers, all-reduces, reduce-scatters, all-to-alls and permutes, loop
  bodies counted once per iteration. Under FSDP this is mostly the parameters gathered for the
  forward and backward passes and the gradients reduced into the shards."""
  def count(line):
    c = _COLLECTIVE.search(line)
    if not c:
      return 0
    shapes = _SHAPE.findall(c.group(1))
    if c.group(3):  # an async start's shape is (operands..., result)
      shapes = shapes[-1:]
    # bytes = elements x bits / 8; pred[...] (no bit width) is one byte an element
    return sum(math.prod(int(d) for d in dims.split(",") if d) * int(bits or 8) // 8
               for _, bits, dims in shapes)
  return per_run(hlo_text, count)


# ----------------------------------------------------------------------------
# Memory traffic per kernel.
# ----------------------------------------------------------------------------
_OP_NAME = re.compile(r'op_name="([^"]*)"')
# Instructions that move no data of their own (views, bookkeeping, control flow: what they run is
# counted where it runs). An asynchronous pair (copy-, slice-, all-gather-start / -done) counts at
# its -done: the data it delivers, read and written once.
NO_TRAFFIC = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "call",
              "conditional", "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency", "iota"}


_LAID_OUT = re.compile(r"\b[a-z]+(\d*)\[([0-9,]*)\](?:\{([^}]*)\})?")
_TILE = re.compile(r":T\(([0-9,]+)\)")
# A layout's memory space: S(1) is XLA:TPU's VMEM (S(2) its SMEM); none or S(0) is HBM.
_MEMORY_SPACE = re.compile(r"S\((\d+)\)")


def _on_chip(layout: str) -> bool:
  space = _MEMORY_SPACE.search(layout or "")
  return bool(space and int(space.group(1)))


def shape_bytes(text: str, hbm_only: bool = False) -> int:
  """Bytes of every array shape written in `text` as laid out in memory: a tiled layout (XLA:TPU's
  `{1,0:T(8,128)}`) pads its most minor dimensions to whole tiles. Types without a bit width
  (pred) count one byte an element. `hbm_only`: leave out the arrays placed in on-chip memory
  (a layout's `S(1)`, VMEM on TPUs)."""
  total = 0
  for bits, dims, layout in _LAID_OUT.findall(text):
    if hbm_only and _on_chip(layout):
      continue
    sizes = [int(d) for d in dims.split(",") if d]
    minor_to_major, tile = layout.split(":")[0], _TILE.search(layout)
    if tile and minor_to_major:
      order = [int(i) for i in minor_to_major.split(",")][::-1]  # major to minor
      for i, t in zip(order[::-1], [int(t) for t in tile.group(1).split(",")][::-1]):
        sizes[i] = -(-sizes[i] // t) * t
    total += math.prod(sizes) * int(bits or 8) // 8
  return total


def _operands(line: str, start: int) -> str:
  """The text between the opcode's parenthesis at `start` and its match."""
  depth = 0
  for i in range(start, len(line)):
    depth += {"(": 1, ")": -1}.get(line[i], 0)
    if depth == 0:
      return line[start + 1:i]
  return line[start + 1:]


_OPERAND = re.compile(r"%([\w.\-]+)")


def _done_bytes(result: str, start: str, hbm_only: bool) -> int:
  """An asynchronous pair's traffic, counted at its -done: its result read from the source (the
  first array of the -start's shape) and written to the destination, each side counted where it
  is in HBM when `hbm_only` (a prefetch into VMEM reads HBM once)."""
  size = shape_bytes(result)
  if not hbm_only:
    return 2 * size
  source = _LAID_OUT.search(start or "")
  return size * (int(bool(source) and not _on_chip(source.group(3))) + int(shape_bytes(result, True) > 0))


_FUSION_BODY = re.compile(r"calls=%([\w.\-]+)")


def _slicing(opcode: str, line: str, bodies: dict) -> str:
  """'update' for a dynamic-update-slice (alone or the fusion it is in: the buffer is updated in
  place), 'slice' for a dynamic-slice (it reads only the slice), '' otherwise."""
  body = [line]
  if opcode == "fusion":
    callee = _FUSION_BODY.search(line)
    body = bodies.get(callee.group(1), []) if callee else []
  text = "\n".join(body)
  return "update" if " dynamic-update-slice(" in text else "slice" if " dynamic-slice(" in text else ""


def _elements(shape: str) -> int:
  dims = _SHAPE.search(shape or "")
  return math.prod(int(d) for d in dims.group(3).split(",") if d) if dims else 0


def _op_bytes(result: str, operands: list, kind: str, hbm_only: bool) -> int:
  """Operands read plus results written. A dynamic-update-slice writes into its buffer in place
  (the operand of the result's size): that operand is neither read nor rewritten whole, the
  write is the size of what updates it. A dynamic-slice reads only a slice of an operand larger
  than its result: that operand counts as the result's size."""
  sizes = [shape_bytes(o, hbm_only) for o in operands]
  if kind == "update":
    buffer = next((i for i, o in enumerate(operands) if _elements(o) == _elements(result)), None)
    if buffer is not None:
      rest = sum(b for i, b in enumerate(sizes) if i != buffer)
      return rest + (rest if shape_bytes(result, hbm_only) else 0)
  if kind == "slice":
    out = _elements(result)
    sizes = [shape_bytes(result, hbm_only) if _elements(o) > out and b else b for o, b in zip(operands, sizes)]
  return shape_bytes(result, hbm_only) + sum(sizes)


def kernels(hlo_text: str) -> list[dict]:
  """Every instruction one run executes that moves data: {name, opcode, bytes (operands read plus
  results written, times its executions; as XLA's cost analysis counts, wherever they live),
  hbm_bytes (the same, of the arrays in HBM only: not those XLA:TPU placed in VMEM), op_name (the
  JAX source path of its metadata)}."""
  graph = call_graph(hlo_text)
  shapes, times = graph["shapes"], runs(graph, kernels_only=True)
  out = []
  for comp in times:
    for line in graph["lines"][comp]:
      m = _OPCODE.match(line)
      if not m or m.group(3) in NO_TRAFFIC or m.group(3).endswith("-start"):
        continue
      operands = _OPERAND.findall(_operands(line, m.end() - 1))
      if m.group(3).endswith("-done"):
        start = shapes.get(operands[0], "") if operands else ""
        moved, in_hbm = (_done_bytes(m.group(2), start, h) for h in (False, True))
      else:
        kind = _slicing(m.group(3), line, graph["lines"])
        moved, in_hbm = (_op_bytes(m.group(2), [shapes.get(op, "") for op in operands], kind, h)
                         for h in (False, True))
      op_name = _OP_NAME.search(line)
      out.append({"name": m.group(1), "opcode": m.group(3), "bytes": moved * times[comp],
                  "hbm_bytes": in_hbm * times[comp], "op_name": op_name.group(1) if op_name else ""})
  return out
