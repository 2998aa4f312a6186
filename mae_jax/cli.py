"""What every entry point shares: distributed flags, config validation, clean error messages."""

import difflib
import os
import sys
import textwrap
from typing import Optional

from absl import app, flags, logging
from ml_collections import config_flags

from mae_jax import config_check, config_lib, errors
from mae_jax.errors import StopRequested, UserError
from mae_jax.io import checkpointing, hub, weights
from mae_jax.runtime import host, parallel

FLAGS = flags.FLAGS


def define_distributed_flags():
  flags.DEFINE_bool("distributed", False,
                    "Join a multi-process run (jax.distributed.initialize). On SLURM and Cloud TPU VMs "
                    "the addresses are detected; elsewhere give the three flags below.")
  flags.DEFINE_string("coordinator_address", "", "host:port of process 0 (multi-process runs).")
  flags.DEFINE_integer("num_processes", 0, "Number of processes (multi-process runs).")
  flags.DEFINE_integer("process_id", -1, "This process's index (multi-process runs).")


def define_job_flags(pretrained_required: bool = False, pretrained_help: str = ""):
  """--config, --workdir, --pretrained and --pretrained_step, as every job takes them."""
  config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).", lock_config=True)
  flags.DEFINE_string("workdir", None, "Where this job's checkpoints, metrics and results go.")
  flags.DEFINE_string("pretrained", None, pretrained_help or (
      "Workdir of the pretraining run whose encoder is used, an official/timm .pth or "
      ".safetensors file, a Hugging Face ViTMAE folder, or a Hub id (hf://facebook/vit-mae-base, "
      "timm/vit_base_patch16_224.mae)"
      + ("." if pretrained_required else " (none: a randomly initialised encoder).")))
  flags.DEFINE_integer("pretrained_step", None, "The checkpoint step of --pretrained to use (default: "
                       "its newest); pretraining keeps more with --config.keep_checkpoint_every_epochs.")
  define_distributed_flags()
  flags.mark_flags_as_required(["config", "workdir"] + (["pretrained"] if pretrained_required else []))


def job_main(job, name: str):
  """An absl main that validates the config for job `name`, takes over what the --pretrained
  weights imply (weights.adopt_settings) and runs job(config, workdir, pretrained, step)."""
  def main(argv):
    del argv
    default_verbosity()
    config = prepare(FLAGS.config, FLAGS.workdir, jobs=(name,))
    pretrained = FLAGS.pretrained
    if pretrained:
      pretrained = guarded(lambda: hub.resolve(FLAGS.pretrained))  # a Hub id: from the cache
      guarded(lambda: weights.adopt_settings(config, pretrained))
    return run_guarded(lambda: job(config, FLAGS.workdir, pretrained, FLAGS.pretrained_step),
                       workdir=FLAGS.workdir)
  return main


def default_verbosity() -> None:
  """absl's log level WARNING (the libraries' INFO lines hide the run's own), unless --verbosity
  was given."""
  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def config_help() -> str:
  """The config fields every command's --config takes, with the defaults every config file starts
  from (mae_jax/config_lib.py), one line per section."""
  lines = ["", "Config fields (override any with --config.FIELD=VALUE; these are the defaults every config",
           "file starts from, which it then changes: see configs/*.py and mae_jax/config_lib.py):"]
  sections = config_lib.pretrain_config().to_dict()
  groups = [("--config.*", {k: v for k, v in sections.items() if not isinstance(v, dict)})]
  groups += [(f"--config.{name}.*", fields) for name, fields in sections.items() if isinstance(fields, dict)]
  for name, fields in groups:
    text = ", ".join(f"{k}={v!r}" for k, v in fields.items())
    lines += textwrap.wrap(text, 100, initial_indent=f"  {name}: ", subsequent_indent="      ")
  return "\n".join(lines) + "\n"


def prepare(config, workdir=None, jobs=("pretrain",)):
  """Joins the distributed run if asked, then validates the config (for `jobs`) and the workdir
  before any work."""
  if FLAGS.distributed:
    parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  try:
    config_check.validate(config, jobs)
    if workdir is not None:
      checkpointing.check_compatible(workdir, config)
  except UserError as e:
    fail(e)
  return config


def guarded(fn):
  """fn(), a user error ending the process with its message (exit 2) before any work."""
  try:
    return fn()
  except UserError as e:
    fail(e)


def fail(e: Exception):
  print(f"error: {e}", file=sys.stderr, flush=True)
  sys.exit(2)


def run_guarded(fn, workdir: Optional[str] = None):
  """Runs the job; user errors print one clear message (exit 2), a signal exits with 128 + its
  number once the checkpoint is saved, and a fault of the machine (storage, a loader worker)
  prints one line naming the cause and the checkpoint to resume from (`fault_exit`)."""
  try:
    fn()
  except UserError as e:
    fail(e)
  except StopRequested as e:
    print(f"stopped at step {e.step}; checkpoint saved. Run the same command to resume.",
          file=sys.stderr, flush=True)
    return 128 + e.signum
  except Exception as e:
    if isinstance(e, errors.FaultError) or errors.storage_cause(e):
      fault_exit(e, workdir)
    raise
  return 0


def fault_exit(e: Exception, workdir: Optional[str] = None):
  """Ends the process after a fault of the machine: one line, exit 74 (storage: fix it, then run
  the same command) or 75 (a loader worker: run it again)."""
  if isinstance(e, errors.FaultError):
    message, code = str(e), e.exit_code
  else:
    training = workdir is not None and checkpointing.is_workdir(workdir)  # a job that checkpoints
    message = errors.storage_fault_message(
        errors.storage_cause(e), checkpointing.newest_step(workdir) if training else None,
        checkpointing.checkpoint_dir(workdir) if training else None)
    code = errors.StorageError.exit_code
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


def run_app(main, reuse_freed_memory: bool = True):
  """`absl.app.run(main)` with flag mistakes (an unknown config field, a missing config file, an
  unknown config argument, a value of the wrong type) reported as one line, exit 2. First, before
  JAX starts, the host allocator is set to reuse XLA's freed CPU memory (mae_jax/runtime/host.py), unless
  `reuse_freed_memory` is False (a job that compiles and runs no step)."""
  if not os.environ.get("JAX_PLATFORMS") and not host.accelerator_attached():
    # Accelerator plugins installed without the hardware (the dev extra compiles for TPUs and
    # GPUs) would each try to start, and print why they could not, before JAX settles on the CPU.
    host.run_jax_on_cpu()
  if reuse_freed_memory:
    host.keep_freed_memory()
  # --help lists the flags this module defines for the command, and the config fields.
  for flag in FLAGS.flags_by_module_dict().get(__name__, []):
    FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  entry = sys.modules["__main__"]
  if "config" in FLAGS and entry.__doc__ and "Config fields" not in entry.__doc__:
    entry.__doc__ += config_help()
  return app.run(main, flags_parser=parse_flags)


def parse_flags(argv):
  try:
    rest = FLAGS(argv)
    if "config" in FLAGS:
      FLAGS.config.keys()  # a config file loads (or fails) lazily: force it, so errors land here
    return rest
  except SystemExit:  # absl's --help prints the usage and exits 1: asking for help is no failure
    if any(a in ("--help", "-h", "-?", "--helpshort", "--helpfull") for a in argv[1:]):
      raise SystemExit(0) from None
    raise
  except Exception as e:  # absl and ml_collections raise many kinds while loading --config
    fail(flag_error_message(argv[1:], e))


def flag_error_message(args, error: Exception) -> str:
  """What went wrong while parsing `args`, said in one line."""
  spec = _config_argument(args)
  if spec is not None:
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
      return f"config file {path!r} does not exist (--config=PATH[:ARG], e.g. configs/cifar10_vit_t.py)"
    try:
      config = config_lib.load_config_file(path, arg or None)
    except errors.ConfigError as e:
      return f"--config={spec}: {e}"
    except Exception as e:
      return f"config file {path!r} fails to load: {type(e).__name__}: {e}"
    for a in args:
      if a.startswith("--config.") and "=" in a:
        unknown = unknown_field(config, a[len("--config."):].split("=", 1)[0])
        if unknown:
          return unknown
  first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
  return first.removeprefix("FATAL Flags parsing error: ")


def _config_argument(args):
  for i, a in enumerate(args):
    if a.startswith("--config="):
      return a[len("--config="):]
    if a == "--config" and i + 1 < len(args):
      return args[i + 1]
  return None


def unknown_field(config, dotted: str):
  """None when `dotted` names a field of `config`, else a message naming the closest fields."""
  node, done = config, []
  for name in dotted.split("."):
    fields = list(node.keys()) if hasattr(node, "keys") else []
    if name not in fields:
      where = ".".join(done)
      close = difflib.get_close_matches(name, fields, n=3, cutoff=0.6)
      prefix = where + "." if where else ""
      hint = (f"did you mean {', '.join(prefix + c for c in close)}?" if close else
              f"{'the fields of ' + where if where else 'the top-level fields'}: {', '.join(sorted(fields))}")
      return f"unknown config field {dotted!r} (--config.{dotted}); {hint}"
    node, done = node[name], done + [name]
  return None
