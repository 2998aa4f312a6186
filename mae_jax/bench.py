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

import sys

from absl import flags
from ml_collections import config_flags

from mae_jax import cli
from mae_jax.errors import UserError
from mae_jax.runtime import durable
from mae_jax.tools.bench import bench_pipeline, bench_train_step, check
from mae_jax.tools.compile import fmt_bytes

config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).", lock_config=True)
flags.DEFINE_integer("steps", 10, "Timed train steps (after 2 untimed warm-up steps).")
flags.DEFINE_integer("pipeline_batches", 20, "Batches timed for the input pipeline (0: skip it).")
flags.DEFINE_string("output", "", "Also write the figures as JSON to this file.")
flags.DEFINE_bool("check", False, "First contact with new hardware: 5 timed steps and 10 feed "
                  "batches (unless given), then MFU, attention backend and the bottleneck.")
cli.define_distributed_flags()
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  cli.default_verbosity()
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
    except UserError as e:
      print(f"input pipeline: skipped ({e})")
  if flags.FLAGS.check:
    r.update(check(config, r))
    print(f"attention: {r['attention']}")
    if r["mfu"] is not None:
      print(f"MFU: {r['mfu']:.1%} of {r['peak_flops_per_s'] / 1e12:,.2f} TFLOP/s ({r['peak_basis']})")
    else:
      print(f"MFU: unknown (no peak FLOP/s known for {r['device_kind']}; mae_jax/tools/targets.py lists them)")
    if "bottleneck" in r:
      print(f"bottleneck: {r['bottleneck']} (feed {r['pipeline_images_per_s']:,.0f} img/s, "
            f"step {r['images_per_s']:,.0f} img/s)")
  if flags.FLAGS.output:
    durable.write_json(flags.FLAGS.output, r)
  return 0


if __name__ == "__main__":
  sys.exit(cli.run_app(main))
