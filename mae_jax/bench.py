"""Benchmark: `python -m mae_jax.bench --config=configs/cifar10_vit_t.py [--config.batch_size=...]`.

Prints the compiled pretraining step's images/s (compile excluded; median of several timed
steps, each one optimizer update on a synthetic batch of `batch_size`), its FLOPs from XLA's cost analysis
and the FLOP/s achieved, the peak device memory where the backend reports it, and the input
pipeline's images/s on its own (decode + augment + batch, no model).

`--check` is the first run on new hardware: a few steps of the config on the devices present,
then the model-FLOPs utilisation (MFU: the achieved FLOP/s against the devices' peak; on a CPU
against a measured float32 matmul), the attention backend chosen, the feed's images/s against
the step's, and which of the two holds the training back.

Compiling without running, for hardware that is not here: `python -m mae_jax.compile`.
"""

import json
import statistics
import sys
import time

from absl import flags, logging
from ml_collections import config_flags

from mae_jax import cli, targets
from mae_jax.compile import flops_per_image, fmt_bytes, machine, train_step_program

config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).", lock_config=True)
flags.DEFINE_integer("steps", 10, "Timed train steps (after 2 untimed warm-up steps).")
flags.DEFINE_integer("pipeline_batches", 20, "Batches timed for the input pipeline (0: skip it).")
flags.DEFINE_string("output", "", "Also write the figures as JSON to this file.")
flags.DEFINE_bool("check", False, "First contact with new hardware: 5 timed steps and 10 feed "
                  "batches (unless given), then MFU, attention backend and the bottleneck.")
cli.define_distributed_flags()
flags.mark_flags_as_required(["config"])


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
  from mae_jax import layers
  target = targets.get("present")
  if target.platform == "cpu":
    peak, basis = cpu_matmul_flops(), "this CPU's float32 matmul through XLA, measured"
  else:
    peak = target.peak_flops * target.num_devices if target.peak_flops else None
    basis = f"{target.num_devices} x {target.device_kind}'s published bfloat16 peak"
  out = {"attention": layers.attention_from_config(config.model, config.dataset.image_size),
         "peak_flops_per_s": peak, "peak_basis": basis,
         "mfu": r["achieved_flops_per_s"] / peak if peak else None}
  feed = r.get("pipeline_images_per_s")
  if feed:
    out["bottleneck"] = ("the host's input pipeline" if feed < r["images_per_s"] else "the device's step")
  return out


def bench_pipeline(config, batches: int) -> dict:
  from mae_jax import data, sources
  split, _ = sources.resolved_splits(config.dataset)
  source = sources.make_source(config.dataset, split)
  micro = config.batch_size // config.grad_accum_steps
  it = iter(data.make_loader(config, source, train=True, global_batch_size=micro, seed=config.seed))
  next(it)  # start-up (worker processes) excluded
  t = time.perf_counter()
  for _ in range(batches):
    next(it)
  seconds = time.perf_counter() - t
  return {"pipeline_images_per_s": batches * micro / seconds,
          "pipeline_workers": data.resolve_workers(config.dataset.num_workers)}


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  config = cli.prepare(flags.FLAGS.config)
  if flags.FLAGS.check:  # a short run unless the counts are given
    for name, value in (("steps", 5), ("pipeline_batches", 10)):
      if not flags.FLAGS[name].present:
        flags.FLAGS[name].value = value
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
  print(f"peak device memory: {fmt_bytes(r['peak_device_memory_bytes'])} | compiled step: "
        f"arguments {fmt_bytes(r['compiled_argument_bytes'])}, temporaries "
        f"{fmt_bytes(r['compiled_temp_bytes'])}")
  if flags.FLAGS.pipeline_batches > 0:
    try:
      r.update(bench_pipeline(config, flags.FLAGS.pipeline_batches))
      print(f"input pipeline alone: {r['pipeline_images_per_s']:,.0f} img/s "
            f"({r['pipeline_workers']} workers, {flags.FLAGS.pipeline_batches} batches)")
    except cli.USER_ERRORS as e:
      print(f"input pipeline: skipped ({e})")
  if flags.FLAGS.check:
    r.update(check(config, r))
    print(f"attention: {r['attention']}")
    if r["mfu"] is not None:
      print(f"MFU: {r['mfu']:.1%} of {r['peak_flops_per_s'] / 1e12:,.2f} TFLOP/s ({r['peak_basis']})")
    else:
      print(f"MFU: unknown (no peak FLOP/s known for {r['device_kind']}; mae_jax/targets.py lists them)")
    if "bottleneck" in r:
      print(f"bottleneck: {r['bottleneck']} (feed {r['pipeline_images_per_s']:,.0f} img/s, "
            f"step {r['images_per_s']:,.0f} img/s)")
  if flags.FLAGS.output:
    with open(flags.FLAGS.output, "w") as f:
      json.dump(r, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(cli.run_app(main))
