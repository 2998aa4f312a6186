"""Timing of the compiled pretraining step and of the input pipeline on the devices present
(`python -m mae_jax.bench`)."""

import statistics
import time

from mae_jax.tools import targets
from mae_jax.tools.compile import flops_per_image, machine, train_step_program


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
      **machine(),
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


def cpu_matmul_flops(n: int = 2048, repeats: int = 5) -> float:
  """The host's float32 matmul FLOP/s through XLA (all cores): a CPU's practical peak."""
  import jax
  import jax.numpy as jnp
  x = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(x).block_until_ready()
  best = min(_timed(lambda: f(x).block_until_ready()) for _ in range(repeats))
  return 2 * n**3 / best


def _timed(fn) -> float:
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def check(config, r: dict) -> dict:
  """MFU, the attention backend and the bottleneck of a benchmarked config (`r`)."""
  from mae_jax.models import attention_backends
  target = targets.get("present")
  if target.platform == "cpu":
    peak, basis = cpu_matmul_flops(), "this CPU's float32 matmul through XLA, measured"
  else:
    peak = target.peak_flops * target.num_devices if target.peak_flops else None
    basis = f"{target.num_devices} x {target.device_kind}'s published bfloat16 peak"
  out = {"attention": attention_backends.attention_from_config(config.model, config.dataset.image_size),
         "peak_flops_per_s": peak, "peak_basis": basis,
         "mfu": r["achieved_flops_per_s"] / peak if peak else None}
  feed = r.get("pipeline_images_per_s")
  if feed:
    out["bottleneck"] = ("the host's input pipeline" if feed < r["images_per_s"] else "the device's step")
  return out


def bench_pipeline(config, batches: int) -> dict:
  from mae_jax.data import pipeline, sources
  split, _ = sources.resolved_splits(config.dataset)
  source = sources.make_source(config.dataset, split)
  micro = config.batch_size // config.grad_accum_steps
  it = iter(pipeline.make_loader(config.dataset, source, train=True, global_batch_size=micro, seed=config.seed))
  next(it)  # start-up (worker processes) excluded
  t = time.perf_counter()
  for _ in range(batches):
    next(it)
  seconds = time.perf_counter() - t
  return {"pipeline_images_per_s": batches * micro / seconds,
          "pipeline_workers": pipeline.resolve_workers(config.dataset.num_workers)}
