"""Benchmark: `python -m mae_jax.bench --config=configs/cifar10_vit_t.py [--config.batch_size=...]`.

Prints the compiled pretraining step's images/s (compile excluded; median of several timed
steps, each one optimizer update on a synthetic batch of `batch_size`), its FLOPs from XLA's cost analysis
and the FLOP/s achieved, the peak device memory where the backend reports it, and the input
pipeline's images/s on its own (decode + augment + batch, no model).

With `--aot --devices=N` nothing runs: the train step is compiled ahead of time for N devices
(simulated CPU devices when no accelerator is installed) from abstract inputs, and the compiled
program's cost is reported: compile time, FLOPs per image, argument and temporary bytes per
device, and the cross-device gradient reductions per optimizer update. Any config, ViT-H
included, compiles on a laptop this way.
"""

import json
import math
import os
import re
import statistics
import sys
import time

from absl import flags, logging
from ml_collections import config_flags

from mae_jax import cli, host

config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).", lock_config=True)
flags.DEFINE_integer("steps", 10, "Timed train steps (after 2 untimed warm-up steps).")
flags.DEFINE_integer("pipeline_batches", 20, "Batches timed for the input pipeline (0: skip it).")
flags.DEFINE_string("output", "", "Also write the figures as JSON to this file.")
flags.DEFINE_bool("aot", False, "Compile the train step ahead of time and report its cost; run nothing.")
flags.DEFINE_integer("devices", 0, "With --aot: the devices to compile for (0: those present). "
                     "Without an accelerator, this many simulated CPU devices.")
cli.define_distributed_flags()
flags.mark_flags_as_required(["config"])


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
  from mae_jax import data
  k, size = config.grad_accum_steps, config.dataset.image_size
  on_device = data.train_augment(config.dataset).resize_on_device  # as the trainer's loader decides
  lead = (config.batch_size,) if k == 1 else (k, config.batch_size // k)
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(lead + shape, dtype, sharding=mesh.batch_sharding(k))
  if not on_device:
    return {"image": spec((size, size, 3), jax.numpy.uint8)}
  n = data.CANVAS_FACTOR * size
  return {"image": spec((n, n, 3), jax.numpy.uint8), data.CROP_FIELD: spec((6,), jax.numpy.float32)}


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


def _machine() -> dict:
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
      **_machine(),
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


def bench_train_step(config, steps: int) -> dict:
  import jax
  import numpy as np

  step, init, _, sharding, mesh = train_step_program(config)
  state = jax.jit(init, out_shardings=sharding)()
  size = config.dataset.image_size
  images = np.random.default_rng(0).integers(
      0, 256, (config.batch_size // jax.process_count(), size, size, 3), dtype=np.uint8)
  batch = mesh.put_batch({"image": images}, config.grad_accum_steps)
  t0 = time.perf_counter()
  lowered = step.lower(state, batch)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  for _ in range(2):  # warm-up
    state, m = compiled(state, batch)
  jax.block_until_ready(m)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, m = compiled(state, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  median = statistics.median(times)
  flops = flops_per_image(config, lowered) * config.batch_size  # per step, all devices together
  mem = compiled.memory_analysis()
  stats = jax.local_devices()[0].memory_stats() or {}
  return {
      **_machine(),
      "devices": jax.device_count(),
      "batch_size": config.batch_size,
      "grad_accum_steps": config.grad_accum_steps,
      "compute_dtype": config.model.dtype,
      "compile_s": compile_s,
      "step_ms_median": median * 1e3,
      "step_ms_min": min(times) * 1e3,
      "step_ms_max": max(times) * 1e3,
      "images_per_s": config.batch_size / median,
      "flops_per_step": flops,
      "achieved_flops_per_s": flops / median,
      "peak_device_memory_bytes": stats.get("peak_bytes_in_use"),
      "compiled_temp_bytes": getattr(mem, "temp_size_in_bytes", None),
      "compiled_argument_bytes": getattr(mem, "argument_size_in_bytes", None),
  }


def bench_pipeline(config, batches: int) -> dict:
  from mae_jax import data
  split, _ = data.resolved_splits(config.dataset)
  source = data.make_source(config.dataset, split)
  micro = config.batch_size // config.grad_accum_steps
  it = iter(data.make_loader(config, source, train=True, global_batch_size=micro, seed=config.seed))
  next(it)  # start-up (worker processes) excluded
  t = time.perf_counter()
  for _ in range(batches):
    next(it)
  seconds = time.perf_counter() - t
  return {"pipeline_images_per_s": batches * micro / seconds,
          "pipeline_workers": data.resolve_workers(config.dataset.num_workers)}


def _fmt_bytes(n):
  return "n/a" if n is None else f"{n / 2**20:,.1f} MiB"


def _aot_main(config, simulated: bool) -> int:
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
  print(f"argument_bytes_per_device: {_fmt_bytes(r['argument_bytes_per_device'])}")
  print(f"temp_bytes_per_device: {_fmt_bytes(r['temp_bytes_per_device'])}")
  print(f"gradient_reductions_per_update: {r['gradient_reductions_per_update']}")
  print(f"collective_bytes_per_device: {_fmt_bytes(r['collective_bytes_per_device'])}")
  if flags.FLAGS.output:
    with open(flags.FLAGS.output, "w") as f:
      json.dump(r, f, indent=2)
  return 0


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  if flags.FLAGS.aot:
    simulated = flags.FLAGS.devices > 0 and simulate_devices(flags.FLAGS.devices)
    config = cli.prepare(flags.FLAGS.config)
    import jax
    if flags.FLAGS.devices > 0 and jax.device_count() != flags.FLAGS.devices:
      cli.fail(f"--devices={flags.FLAGS.devices}, but JAX sees {jax.device_count()} "
               f"{jax.default_backend()} devices; on an accelerator, compile for the devices "
               f"present (--devices=0), or set JAX_PLATFORMS=cpu to simulate {flags.FLAGS.devices}")
    return _aot_main(config, simulated)
  config = cli.prepare(flags.FLAGS.config)
  r = bench_train_step(config, flags.FLAGS.steps)
  m = config.model
  print(f"device: {r['devices']} x {r['device_kind']} ({r['backend']}) | encoder {m.encoder_depth}x"
        f"{m.encoder_width}, decoder {m.decoder_depth}x{m.decoder_width}, patch {m.patch_size}, "
        f"{config.dataset.image_size} px, mask {m.mask_ratio} | batch {r['batch_size']}"
        + (f" = {r['grad_accum_steps']} micro-batches" if r["grad_accum_steps"] > 1 else "") + " | "
        f"compute {r['compute_dtype']} | host {r['host_cpu']}")
  print(f"compile: {r['compile_s']:.1f} s")
  print(f"train step: median {r['step_ms_median']:.1f} ms (min {r['step_ms_min']:.1f}, max "
        f"{r['step_ms_max']:.1f}) over {flags.FLAGS.steps} steps -> {r['images_per_s']:,.0f} img/s")
  print(f"XLA cost analysis: {r['flops_per_step'] / 1e9:,.1f} GFLOP per step -> achieved "
        f"{r['achieved_flops_per_s'] / 1e12:,.2f} TFLOP/s")
  print(f"peak device memory: {_fmt_bytes(r['peak_device_memory_bytes'])} | compiled step: "
        f"arguments {_fmt_bytes(r['compiled_argument_bytes'])}, temporaries "
        f"{_fmt_bytes(r['compiled_temp_bytes'])}")
  if flags.FLAGS.pipeline_batches > 0:
    try:
      r.update(bench_pipeline(config, flags.FLAGS.pipeline_batches))
      print(f"input pipeline alone: {r['pipeline_images_per_s']:,.0f} img/s "
            f"({r['pipeline_workers']} workers, {flags.FLAGS.pipeline_batches} batches)")
    except cli.USER_ERRORS as e:
      print(f"input pipeline: skipped ({e})")
  if flags.FLAGS.output:
    with open(flags.FLAGS.output, "w") as f:
      json.dump(r, f, indent=2)
  return 0


if __name__ == "__main__":
  # --aot compiles and runs nothing: the allocator setting only slows its compile (mae_jax/host.py).
  sys.exit(cli.run_app(main, reuse_freed_memory=not cli.bool_flag_given(sys.argv, "aot")))
