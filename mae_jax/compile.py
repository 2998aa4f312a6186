"""Compile without running: `python -m mae_jax.compile --config=configs/imagenet_vit_h.py --devices=8`.

The pretraining step of any config is compiled ahead of time for N devices from abstract inputs
(nothing allocated, nothing run; simulated CPU devices when no accelerator is installed) and
the compiled program's cost is reported: trace and compile time, FLOPs per image, argument and
temporary bytes per device, the cross-device gradient reductions and the bytes the collectives
move per optimizer update. Any config, ViT-H included, compiles on a laptop this way.
"""

import json
import math
import os
import re
import sys
import time

from absl import flags, logging
from ml_collections import config_flags

from mae_jax import cli, host


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX returns one dict per computation
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", 0.0))


def simulate_devices(n: int) -> bool:
  """Before JAX starts: `n` simulated CPU devices when JAX will run on the CPU. Returns whether
  the devices are simulated."""
  if not host.cpu_backend_expected():
    return False
  xla_flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", ""))
  os.environ["XLA_FLAGS"] = f"{xla_flags} --xla_force_host_platform_device_count={n}".strip()
  return True


def train_step_program(config):
  """`pretrain.sharded_step` on a fresh mesh with a fixed schedule: (step, init, abstract state,
  state shardings, mesh)."""
  from mae_jax import optim, pretrain
  from mae_jax.parallel import Mesh
  mesh = Mesh()
  return (*pretrain.sharded_step(config, mesh, optim.warmup_cosine(1e-4, 0.0, 10, 1000)), mesh)


# Cross-device reductions in compiled HLO: all-reduce (also as an async -start) and reduce-scatter.
_REDUCTION = re.compile(r"=\s*(\(.*?\)|\S+)\s+(all-reduce-start|all-reduce|reduce-scatter)\(")
# Every collective, its result shape (async -start forms: a tuple whose last shape is the result).
_COLLECTIVE = re.compile(r"=\s*(\(.*?\)|\S+)\s+(all-gather|all-reduce|reduce-scatter|all-to-all|"
                         r"collective-permute)(-start)?\(")
_SHAPE = re.compile(r"\b([a-z]+)(\d*)\[([0-9,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%(\S+)\s+\(")
_CALLEE = re.compile(r"(?:calls|to_apply|body|condition)=%([\w.\-]+)")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


def _per_run(hlo_text: str, count) -> int:
  """The sum of `count(line)` over the instructions one run of a compiled program executes: a line
  inside a loop body (scanned layers, accumulated micro-batches) counts once per iteration."""
  own, calls, entry, name = {}, {}, None, None
  for line in hlo_text.splitlines():
    m = _COMPUTATION.match(line)
    if m:
      name = m.group(1)
      own[name], calls[name] = 0, []
      entry = name if line.startswith("ENTRY") else entry
      continue
    if name is None:
      continue
    own[name] += count(line)
    trips = _TRIP_COUNT.search(line)
    for callee in _CALLEE.findall(line):
      body = " while(" in line and f"body=%{callee}" in line
      calls[name].append((callee, int(trips.group(1)) if body and trips else 1))

  def total(comp, seen=()):
    if comp not in own or comp in seen:
      return 0
    return own[comp] + sum(n * total(c, seen + (comp,)) for c, n in calls[comp])
  return total(entry)


def gradient_reductions(hlo_text: str) -> int:
  """Cross-device reductions of non-scalar values (the gradients'; the loss and metrics are
  scalars) that one run of a compiled program executes: one inside a loop body (scanned layers)
  counts once per iteration. XLA may combine several tensors into one reduction."""
  def count(line):
    r = _REDUCTION.search(line)
    return int(bool(r and any(dims for _, _, dims in _SHAPE.findall(r.group(1)))))
  return _per_run(hlo_text, count)


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
  return _per_run(hlo_text, count)


def _abstract_batch(config, mesh):
  """The pretraining step's input batch, as `Mesh.put_batch` lays it out, without data: with
  dataset.resize_on='device', canvases and crops (the step's resample counted too)."""
  import jax
  from mae_jax import data, device_resample
  k, size = config.grad_accum_steps, config.dataset.image_size
  on_device = data.train_augment(config.dataset).resize_on_device  # as the trainer's loader decides
  lead = (config.batch_size,) if k == 1 else (k, config.batch_size // k)
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(lead + shape, dtype, sharding=mesh.batch_sharding(k))
  if not on_device:
    return {"image": spec((size, size, 3), jax.numpy.uint8)}
  n = device_resample.CANVAS_FACTOR * size
  return {"image": spec((n, n, 3), jax.numpy.uint8), device_resample.CROP_FIELD: spec((6,), jax.numpy.float32)}


def flops_per_image(config, lowered=None) -> float:
  """FLOPs per training image of the whole step (all devices), from XLA's cost analysis of the
  step lowered unrolled and unaccumulated on one micro-batch: the analysis counts a loop body
  (scanned layers, accumulated micro-batches) once. `lowered`, the config's own lowered step, is
  that program already when the config neither scans nor accumulates."""
  micro = config.batch_size // config.grad_accum_steps
  if lowered is None or config.model.scan_layers or config.grad_accum_steps > 1:
    plain = config.copy_and_resolve_references()
    plain.model.scan_layers, plain.batch_size, plain.grad_accum_steps = False, micro, 1
    step, _, abstract, _, mesh = train_step_program(plain)
    lowered = step.lower(abstract, _abstract_batch(plain, mesh))
  return _flops(lowered) / micro


def machine() -> dict:
  """The fields naming where a figure came from: the backend, its device kind, the host CPU
  (compiles and CPU steps run there) and whether glibc keeps freed memory (mae_jax/host.py: CPU
  steps run faster with it, compiles slower)."""
  import jax
  return {"backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
          "host_cpu": host.cpu_description(), "host_malloc_keeps_freed_memory": host.freed_memory_kept()}


def aot_train_step(config) -> dict:
  """Compiles the train step from abstract inputs (nothing allocated, nothing run)."""
  import jax
  step, _, abstract, _, mesh = train_step_program(config)
  micro = config.batch_size // config.grad_accum_steps
  size = config.dataset.image_size
  t0 = time.perf_counter()
  lowered = step.lower(abstract, _abstract_batch(config, mesh))  # tracing the Python model into HLO
  t1 = time.perf_counter()
  compiled = lowered.compile()           # XLA's optimisation and code generation
  lower_s, compile_s = t1 - t0, time.perf_counter() - t1
  mem = compiled.memory_analysis()
  hlo = compiled.as_text()
  devices = jax.device_count()
  m = config.model
  return {
      **machine(),
      "devices": devices,
      "lower_s": lower_s,
      "compile_s": compile_s,
      # Of the whole program before partitioning (the compiled one is one device's share).
      "flops_per_image": flops_per_image(config, lowered),
      "argument_bytes_per_device": mem.argument_size_in_bytes,
      "temp_bytes_per_device": mem.temp_size_in_bytes,
      # One call of the step is one update, its micro-batches accumulated inside.
      "gradient_reductions_per_update": gradient_reductions(hlo),
      "collective_bytes_per_device": collective_bytes(hlo),
      "config": {
          "model": f"ViT {m.encoder_depth}x{m.encoder_width} /{m.patch_size}, decoder "
                   f"{m.decoder_depth}x{m.decoder_width}",
          "image_size": size, "batch_size": config.batch_size,
          "grad_accum_steps": config.grad_accum_steps, "micro_batch": micro,
          "micro_batch_per_device": micro // devices, "dtype": m.dtype,
          "fsdp": bool(config.sharding.fsdp), "scan_layers": bool(config.model.scan_layers),
          "remat": config.model.remat,
      },
  }


def fmt_bytes(n):
  return "n/a" if n is None else f"{n / 2**20:,.1f} MiB"


def report(config, simulated: bool, output: str = "") -> int:
  r = {**aot_train_step(config), "simulated": simulated}
  c = r["config"]
  print(f"ahead-of-time compile for {r['devices']} x {r['device_kind']} ({r['backend']}"
        f"{', simulated' if r['simulated'] else ''}) | {c['model']} | {c['image_size']} px | batch "
        f"{c['batch_size']} = {c['grad_accum_steps']} x micro-batch {c['micro_batch']} "
        f"({c['micro_batch_per_device']} per device) | {c['dtype']} | fsdp {c['fsdp']}, scan_layers "
        f"{c['scan_layers']}, remat {c['remat']} | host {r['host_cpu']}")
  print(f"lower_s: {r['lower_s']:.1f}")
  print(f"compile_s: {r['compile_s']:.1f}")
  print(f"flops_per_image: {r['flops_per_image'] / 1e9:.4g} GFLOP")
  print(f"argument_bytes_per_device: {fmt_bytes(r['argument_bytes_per_device'])}")
  print(f"temp_bytes_per_device: {fmt_bytes(r['temp_bytes_per_device'])}")
  print(f"gradient_reductions_per_update: {r['gradient_reductions_per_update']}")
  print(f"collective_bytes_per_device: {fmt_bytes(r['collective_bytes_per_device'])}")
  if output:
    with open(output, "w") as f:
      json.dump(r, f, indent=2)
  return 0


def define_flags():
  config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).", lock_config=True)
  flags.DEFINE_integer("devices", 0, "The devices to compile for (0: those present). Without an "
                       "accelerator, this many simulated CPU devices.")
  flags.DEFINE_string("output", "", "Also write the figures as JSON to this file.")
  cli.define_distributed_flags()
  flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  f = flags.FLAGS
  simulated = f.devices > 0 and simulate_devices(f.devices)
  config = cli.prepare(f.config)
  import jax
  if f.devices > 0 and jax.device_count() != f.devices:
    cli.fail(f"--devices={f.devices}, but JAX sees {jax.device_count()} {jax.default_backend()} "
             f"devices; on an accelerator, compile for the devices present (--devices=0), or set "
             f"JAX_PLATFORMS=cpu to simulate {f.devices}")
  return report(config, simulated, f.output)


if __name__ == "__main__":
  define_flags()
  # Nothing runs: glibc's allocator setting (mae_jax/host.py) would only slow the compile.
  sys.exit(cli.run_app(main, reuse_freed_memory=False))
