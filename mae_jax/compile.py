"""Compile without running: will this config fit on that hardware?

    python -m mae_jax.compile --config=configs/imagenet_vit_h.py --target=tpu:v5p:4x4x4
    python -m mae_jax.compile --config=configs/imagenet_vit_b.py --target=gpu:h100x8
    python -m mae_jax.compile --config=configs/cifar10_vit_t.py --target=cpu:8

The training steps of a config (pretraining; with --jobs also probing's and fine-tuning's) are
compiled ahead of time from abstract inputs, nothing allocated and nothing run, by the target's
own compiler: XLA:TPU for a TPU slice and XLA:GPU for H100s on a machine without them
(mae_jax/tools/targets.py), XLA:CPU for simulated CPU devices. For each step it prints, per device, the
arguments' bytes (train state and batch) and the program's peak against the device's memory,
FLOPs per image, the collectives of one update, the compile time, a step time estimated from the
FLOPs, and a verdict: fits or not, and the largest micro-batch per device that fits (a search over
gradient accumulation).
"""

import sys

from absl import flags
from ml_collections import config_flags

from mae_jax import cli, errors
from mae_jax.runtime import host
from mae_jax.tools import targets
from mae_jax.tools.compile import JOBS, report


def define_flags():
  config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).", lock_config=True)
  flags.DEFINE_string("target", "", f"What to compile for: {targets.EXAMPLES} (the devices here). "
                      "Default: the devices present, or --devices simulated CPU devices.")
  flags.DEFINE_integer("devices", 0, "Without --target: this many simulated CPU devices (cpu:N).")
  flags.DEFINE_list("jobs", ["pretrain"], f"The steps to compile: any of {', '.join(JOBS)}.")
  flags.DEFINE_bool("search", True, "Also find the largest micro-batch per device that fits.")
  flags.DEFINE_string("output", "", "Also write the figures as JSON to this file.")
  cli.define_distributed_flags()
  flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  cli.default_verbosity()
  f = flags.FLAGS
  spec = f.target or (f"cpu:{f.devices}" if f.devices > 0 and host.cpu_backend_expected() else "present")
  unknown = [j for j in f.jobs if j not in JOBS]
  if unknown:
    cli.fail(f"--jobs: {unknown} unknown; choose from {', '.join(JOBS)}")
  try:
    targets.prepare(spec)
    config = cli.prepare(f.config, jobs=tuple(f.jobs))
    target = targets.get(spec)
    if f.devices > 0 and target.num_devices != f.devices:
      cli.fail(f"--devices={f.devices}, but the target has {target.num_devices} {target.platform} "
               f"devices; on an accelerator, compile for the devices present (--devices=0), or set "
               f"JAX_PLATFORMS=cpu to simulate {f.devices}")
    return report(config, target, tuple(f.jobs), f.search, f.output)
  except errors.TargetError as e:
    cli.fail(e)


if __name__ == "__main__":
  define_flags()
  # Nothing runs: glibc's allocator setting (mae_jax/runtime/host.py) would only slow the compile.
  sys.exit(cli.run_app(main, reuse_freed_memory=False))
