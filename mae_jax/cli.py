"""What every entry point shares: distributed flags, config validation, clean error messages."""

import sys

from absl import flags, logging
from ml_collections import config_flags

from mae_jax import checkpointing, config_lib, data, lpips, parallel
from mae_jax.trainer import StopRequested

FLAGS = flags.FLAGS
USER_ERRORS = (config_lib.ConfigError, data.DataError, checkpointing.CheckpointMismatchError,
               lpips.LPIPSWeightsError)


def define_distributed_flags():
  flags.DEFINE_bool("distributed", False,
                    "Join a multi-process run (jax.distributed.initialize). On SLURM and Cloud TPU VMs "
                    "the addresses are detected; elsewhere give the three flags below.")
  flags.DEFINE_string("coordinator_address", "", "host:port of process 0 (multi-process runs).")
  flags.DEFINE_integer("num_processes", 0, "Number of processes (multi-process runs).")
  flags.DEFINE_integer("process_id", -1, "This process's index (multi-process runs).")


def define_job_flags(pretrained_required: bool = False):
  """--config, --workdir and --pretrained, as every evaluation entry point takes them."""
  config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).", lock_config=True)
  flags.DEFINE_string("workdir", None, "Where this job's checkpoints, metrics and results go.")
  flags.DEFINE_string("pretrained", None, "Workdir of the pretraining run whose encoder is used"
                      + ("." if pretrained_required else " (none: a randomly initialised encoder)."))
  define_distributed_flags()
  flags.mark_flags_as_required(["config", "workdir"] + (["pretrained"] if pretrained_required else []))


def job_main(job):
  """An absl main that validates the config and runs job(config, workdir, pretrained)."""
  def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    config = prepare(FLAGS.config, FLAGS.workdir)
    return run_guarded(lambda: job(config, FLAGS.workdir, FLAGS.pretrained))
  return main


def prepare(config, workdir=None):
  """Joins the distributed run if asked, then validates the config and the workdir before any work."""
  if FLAGS.distributed:
    parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  try:
    config_lib.validate(config)
    if workdir is not None:
      checkpointing.check_compatible(workdir, config)
  except USER_ERRORS as e:
    fail(e)
  return config


def fail(e: Exception):
  print(f"error: {e}", file=sys.stderr, flush=True)
  sys.exit(2)


def run_guarded(fn):
  """Runs the job; user errors print one clear message, a signal exits with 128 + its number."""
  try:
    fn()
  except USER_ERRORS as e:
    fail(e)
  except StopRequested as e:
    print(f"stopped at step {e.step}; checkpoint saved. Run the same command to resume.",
          file=sys.stderr, flush=True)
    return 128 + e.signum
  return 0
