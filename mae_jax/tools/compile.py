"""Ahead-of-time compilation of a config's training steps for a target: memory, FLOPs,
collectives and the largest micro-batch that fits (`python -m mae_jax.compile`)."""

import re
import time
from typing import Optional

from mae_jax import errors
from mae_jax.runtime import durable, host
from mae_jax.tools import roofline
from mae_jax.tools.hlo import collective_bytes, gradient_reductions

JOBS = ("pretrain", "probe", "finetune")
# The model-FLOPs utilisation a step-time estimate assumes: well-tuned ViT training reports about
# 40-60% on TPUs and H100s. A planning figure, stated with every estimate, not a measurement.
ESTIMATE_MFU = 0.4
# Probing and fine-tuning are compiled for a data set of this many classes (ImageNet's).
NUM_CLASSES = 1000


def _schedule():
  """A learning-rate schedule for a step compiled and not run (the value does not change the
  program)."""
  from mae_jax.train import optim
  return optim.warmup_cosine(1e-4, 0.0, 10, 1000)


def train_step_program(config, devices=None):
  """`pretrain.sharded_step` on a fresh mesh (over `devices`; default all present) with a fixed
  schedule: (step, init, abstract state, state shardings, mesh)."""
  from mae_jax.runtime.parallel import Mesh
  from mae_jax.train import pretrain
  mesh = Mesh(devices)
  return (*pretrain.sharded_step(config, mesh, _schedule()), mesh)


def step_program(config, job: str, devices=None):
  """The `job`'s training step as its trainer compiles it, and its abstract arguments:
  (jitted step, abstract state, abstract batch)."""
  from mae_jax.runtime.parallel import Mesh
  from mae_jax.train import classify
  if job == "pretrain":
    step, _, abstract, _, mesh = train_step_program(config, devices)
    return step, abstract, abstract_batch(config, mesh)
  mesh = Mesh(devices)
  step, abstract, _ = classify.sharded_step(config, mesh, job, NUM_CLASSES, _schedule())
  return step, abstract, abstract_batch(config, mesh, job)


def batch_shape(config, job: str) -> tuple:
  """(batch size, micro-batches of one update) of a job's step."""
  if job == "pretrain":
    return config.batch_size, config.grad_accum_steps
  from mae_jax.train import classify
  return config[job].batch_size, classify.micro_batches(config, job)


def with_batch(config, job: str, batch_size: int, micro_batches: int):
  """A copy of `config` whose `job` takes `batch_size` in `micro_batches`."""
  c = config.copy_and_resolve_references()
  section = c if job == "pretrain" else c[job]
  section.batch_size = batch_size
  if job != "probe":
    section.grad_accum_steps = micro_batches
  return c


def abstract_batch(config, mesh, job: str = "pretrain"):
  """A step's input batch, as `Mesh.put_batch` lays it out, without data: images (with
  dataset.resize_on='device', canvases and crops: the step's resample counted too), and labels
  for probing and fine-tuning."""
  import jax

  from mae_jax.data import device_resample, pipeline
  from mae_jax.train import classify
  batch, micro_batches = batch_shape(config, job)
  size = config.dataset.image_size
  # the train transform as the job's loader has it
  augment = pipeline.train_augment(config.dataset) if job == "pretrain" else classify.train_augment(config, job)
  on_device = augment.resize_on_device
  lead = (batch,) if micro_batches == 1 else (micro_batches, batch // micro_batches)
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(lead + shape, dtype, sharding=mesh.batch_sharding(micro_batches))
  out = {} if job == "pretrain" else {"label": spec((), jax.numpy.int32)}
  if not on_device:
    return {**out, "image": spec((size, size, 3), jax.numpy.uint8)}
  n = device_resample.CANVAS_FACTOR * size
  return {**out, "image": spec((n, n, 3), jax.numpy.uint8),
          device_resample.CROP_FIELD: spec((6,), jax.numpy.float32)}


def flops_per_image(config, lowered=None, job: str = "pretrain") -> float:
  """FLOPs per training image of a job's whole step (all devices), from XLA's cost analysis of
  the step lowered for the devices present, unrolled and unaccumulated on one micro-batch, with
  XLA's attention: the analysis counts a loop body (scanned layers, accumulated micro-batches)
  once, and does not see into a cuDNN kernel; an accelerator target's lowering has no analysis.
  `lowered`, the config's own lowered pretraining step, is that program already when the config
  neither scans nor accumulates nor asks for cuDNN."""
  batch, micro_batches = batch_shape(config, job)
  micro = batch // micro_batches
  if (lowered is None or job != "pretrain" or config.model.scan_layers or micro_batches > 1
      or config.model.attention_impl == "cudnn"):
    plain = with_batch(config, job, micro, 1)
    plain.model.scan_layers, plain.model.attention_impl = False, "xla"
    step, abstract, batch_spec = step_program(plain, job)
    lowered = step.lower(abstract, batch_spec)
  return roofline.cost(lowered)["flops"] / micro


def machine(target=None) -> dict:
  """The fields naming where a figure came from: the backend (or the target compiled for), its
  device kind, the host CPU (compiles and CPU steps run there) and whether glibc keeps freed
  memory (mae_jax/runtime/host.py: CPU steps run faster with it, compiles slower)."""
  import jax
  out = {"backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
         "host_cpu": host.cpu_description(), "host_malloc_keeps_freed_memory": host.freed_memory_kept()}
  if target is not None:
    out.update(backend=target.platform, device_kind=target.device_kind, target=target.name,
               compiled_without_the_hardware=not target.present)
  return out


def _out_of_memory(error: Exception) -> str:
  """The compiler's out-of-memory message ('' for any other error): XLA:TPU refuses a program
  that does not fit."""
  text = str(error)
  m = re.search(r"(Ran out of memory[^\n]*)", text)
  return m.group(1)[:300] if m and "RESOURCE_EXHAUSTED" in text else ""


def peak_bytes(mem) -> int:
  """Per device: the compiled program's peak (arguments, outputs and temporaries live at once)."""
  peak = getattr(mem, "peak_memory_in_bytes", 0)
  return int(peak or (mem.argument_size_in_bytes + mem.output_size_in_bytes
                      - mem.alias_size_in_bytes + mem.temp_size_in_bytes))


def compile_step(config, job: str, target, image_flops: Optional[float] = None) -> dict:
  """Compiles one job's step for `target`: its memory, collectives and compile time, and whether
  it fits (the compiler refused it, or its peak is over the device's memory). `image_flops`: the
  job's `flops_per_image` where the caller has it (else computed here when needed)."""
  from mae_jax.models import attention_backends
  batch, micro_batches = batch_shape(config, job)
  n = target.num_devices
  out = {"job": job, "batch_size": batch, "grad_accum_steps": micro_batches, "micro_batch_per_device": batch // micro_batches // n}
  print(f"compiling {job} for {target.name}: micro-batch {out['micro_batch_per_device']} per device "
        "(a large model takes minutes) ...", flush=True)
  with attention_backends.building_for(target.devices[0]):
    step, abstract, batch_spec = step_program(config, job, target.devices)
    t0 = time.perf_counter()
    lowered = step.lower(abstract, batch_spec)  # tracing the Python model into HLO
    t1 = time.perf_counter()
    try:
      compiled = lowered.compile()              # XLA's optimisation and code generation
    except Exception as e:
      reason = _out_of_memory(e)
      if not reason:
        raise
      return {**out, "fits": False, "reason": reason, "lower_s": t1 - t0,
              "compile_s": time.perf_counter() - t1}
  compile_s = time.perf_counter() - t1
  mem = compiled.memory_analysis()
  hlo = compiled.as_text()
  # XLA:GPU compiled for a target reports no counts, and XLA's cost analysis counts a loop body
  # (scanned layers, accumulated micro-batches) once: the FLOPs then come from XLA:CPU's count of
  # the same step unrolled (flops_per_image), only computed when needed.
  fallback, loops = 0.0, bool(config.model.scan_layers) or micro_batches > 1
  if loops or not roofline.cost(compiled)["flops"]:
    image_flops = image_flops or flops_per_image(config, job=job)
    fallback = image_flops * out["micro_batch_per_device"] * micro_batches
  roof = roofline.summary(compiled, hlo, target.peak_flops, target.memory_bandwidth, fallback, loops)
  peak = peak_bytes(mem)
  fits = target.memory_bytes is None or peak <= target.memory_bytes
  return {**out, "fits": fits, "lower_s": t1 - t0, "compile_s": compile_s,
          "argument_bytes_per_device": mem.argument_size_in_bytes,
          "temp_bytes_per_device": mem.temp_size_in_bytes,
          "peak_bytes_per_device": peak,
          # One call of the step is one update, its micro-batches accumulated inside.
          "gradient_reductions_per_update": gradient_reductions(hlo),
          "collective_bytes_per_device": collective_bytes(hlo),
          "roofline": roof,
          **({} if fits else {"reason": f"peak {fmt_bytes(peak)} over the device's "
                                        f"{fmt_bytes(target.memory_bytes)}"})}


def candidates(config, job: str, devices: int) -> list:
  """The settings a search tries, from the largest micro-batch per device to the smallest: the
  job's batch in 1, 2, 4, ... micro-batches, while each device keeps a whole one (a probe does
  not accumulate: its batch halves instead)."""
  batch, _ = batch_shape(config, job)
  out, micro_batches = [], 1
  while batch % (micro_batches * devices) == 0:
    out.append(with_batch(config, job, batch // micro_batches, 1) if job == "probe" else with_batch(config, job, batch, micro_batches))
    micro_batches *= 2
  return out


def fit_verdict(config, job: str, target, search: bool = True, image_flops: Optional[float] = None) -> dict:
  """Compiles `job`'s step as configured; with `search`, also finds the largest micro-batch per
  device that fits: larger ones while the configured one fits, smaller ones until one does."""
  batch, micro_batches = batch_shape(config, job)
  n = target.num_devices
  if batch % (micro_batches * n):
    raise errors.TargetError(
        f"{job}: batch {batch} in {micro_batches} micro-batches does not divide over {n} devices; choose a "
        "batch size (and grad_accum_steps) with a whole micro-batch per device")
  result = compile_step(config, job, target, image_flops)
  result["tried"] = [_attempt(result)]
  if not search:
    return result
  micro = result["micro_batch_per_device"]

  def per_device(c) -> int:
    b, micro_batches = batch_shape(c, job)
    return b // micro_batches // n

  options = candidates(config, job, n)  # the largest micro-batch first
  best = result if result["fits"] else None
  if result["fits"]:  # larger micro-batches, smallest first, while they fit
    for c in reversed([c for c in options if per_device(c) > micro]):
      r = compile_step(c, job, target, image_flops)
      result["tried"].append(_attempt(r))
      if not r["fits"]:
        break
      best = r
  else:               # smaller ones, largest first, until one fits
    for c in [c for c in options if per_device(c) < micro]:
      r = compile_step(c, job, target, image_flops)
      result["tried"].append(_attempt(r))
      if r["fits"]:
        best = r
        break
  result["largest_fitting"] = None if best is None else {
      key: best[key] for key in ("batch_size", "grad_accum_steps", "micro_batch_per_device",
                                 "peak_bytes_per_device")}
  return result


def _attempt(r: dict) -> dict:
  return {k: r.get(k) for k in ("batch_size", "grad_accum_steps", "micro_batch_per_device", "fits",
                                "peak_bytes_per_device", "compile_s")}


def fmt_bytes(n):
  return "n/a" if n is None else f"{n / 2**30:,.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def _fmt_seconds(s: float) -> str:
  return f"{s:,.2f} s" if s >= 1 else f"{s * 1e3:,.1f} ms" if s >= 1e-3 else f"{s * 1e6:,.0f} us"


def describe_config(config) -> dict:
  m = config.model
  return {"model": f"ViT {m.encoder_depth}x{m.encoder_width} /{m.patch_size}, decoder "
                   f"{m.decoder_depth}x{m.decoder_width}",
          "image_size": config.dataset.image_size, "dtype": m.dtype, "fsdp": bool(config.sharding.fsdp),
          "scan_layers": bool(m.scan_layers), "remat": m.remat, "resize_on": config.dataset.resize_on}


def report(config, target, jobs=("pretrain",), search: bool = True, output: str = "") -> int:
  from mae_jax.models import attention_backends
  c = describe_config(config)
  with attention_backends.building_for(target.devices[0]):
    attention = attention_backends.attention_from_config(config.model, config.dataset.image_size)
  r = {**machine(target), "devices": target.num_devices, "memory_bytes_per_device": target.memory_bytes,
       "peak_flops_per_device": target.peak_flops, "config": {**c, "attention": attention}, "jobs": {}}
  where = ("compiled without the hardware" if not target.present else "simulated CPU devices"
           if target.platform == "cpu" and target.num_devices > 1 else "present")
  print(f"{target.name}: {target.num_devices} x {target.device_kind} ({where}; "
        f"{fmt_bytes(target.memory_bytes)} per device: {target.memory_note}) | {c['model']} | {c['image_size']} px | "
        f"{c['dtype']}, attention {attention} | fsdp {c['fsdp']}, scan_layers {c['scan_layers']}, "
        f"remat {c['remat']} | host {r['host_cpu']}")
  for job in jobs:
    image_flops = flops_per_image(config, job=job)  # XLA:CPU's count, once per job
    j = fit_verdict(config, job, target, search, image_flops)
    j["flops_per_image"] = image_flops
    if target.peak_flops:
      j["estimated_step_s"] = (j["flops_per_image"] * j["batch_size"]
                               / (target.num_devices * target.peak_flops * ESTIMATE_MFU))
    r["jobs"][job] = j
    _print_job(j, target)
  if output:
    durable.write_json(output, r)
  return 0


def _print_job(j: dict, target) -> None:
  print(f"\n{j['job']}: batch {j['batch_size']} = {j['grad_accum_steps']} x micro-batch of "
        f"{j['micro_batch_per_device']} per device")
  print(f"  lower_s: {j['lower_s']:.1f}\n  compile_s: {j['compile_s']:.1f}")
  print(f"  flops_per_image: {j['flops_per_image'] / 1e9:.4g} GFLOP")
  if "peak_bytes_per_device" in j:
    for field in ("argument_bytes_per_device", "temp_bytes_per_device"):
      print(f"  {field}: {fmt_bytes(j[field])}")
    print(f"  peak_bytes_per_device: {fmt_bytes(j['peak_bytes_per_device'])} of {fmt_bytes(target.memory_bytes)}")
    print(f"  gradient_reductions_per_update: {j['gradient_reductions_per_update']}")
    print(f"  collective_bytes_per_device: {fmt_bytes(j['collective_bytes_per_device'])}")
  if "estimated_step_s" in j:
    print(f"  estimated_step_s: {_fmt_seconds(j['estimated_step_s'])} at {ESTIMATE_MFU:.0%} of "
          f"{target.peak_flops / 1e12:,.0f} TFLOP/s per device (an estimate from the FLOPs, not a measurement)")
  if "roofline" in j:
    print("\n".join(roofline.report_lines(j["roofline"])))
  print(f"  verdict: {'fits' if j['fits'] else 'DOES NOT FIT: ' + j['reason']}")
  best = j.get("largest_fitting")
  if best is not None:
    print(f"  largest micro-batch that fits: {best['micro_batch_per_device']} per device "
          f"(batch {best['batch_size']} = {best['grad_accum_steps']} x micro-batch; peak "
          f"{fmt_bytes(best['peak_bytes_per_device'])})")
  elif len(j["tried"]) > 1:
    print(f"  nothing tried fits, down to a micro-batch of {j['tried'][-1]['micro_batch_per_device']} per "
          "device: shard the state (--config.sharding.fsdp=True), scan and remat the layers, or use more devices")
