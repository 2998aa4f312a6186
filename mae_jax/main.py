"""Pretrain an MAE: `python -m mae_jax.main --config=configs/cifar10_vit_t.py --workdir=runs/cifar10`.

Run the same command again to resume from the last checkpoint in the workdir.
"""

import sys

from absl import flags, logging
from ml_collections import config_flags

from mae_jax import cli

config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics, events and figures go.")
flags.DEFINE_string("pretrained", None, "Start a new run from these weights instead of a random "
                    "init: a pretraining workdir, or an official/timm/Hugging Face MAE checkpoint "
                    "with its decoder (see mae_jax.convert). The optimizer and step start afresh.")
cli.define_distributed_flags()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax and grain log every file they touch at INFO
  from mae_jax import checkpointing, pretrain  # after distributed init: importing JAX modules is fine, using devices is not
  config = cli.prepare(flags.FLAGS.config, flags.FLAGS.workdir)
  pretrained = flags.FLAGS.pretrained
  if pretrained:
    cli.guarded(lambda: checkpointing.adopt_pretrained_settings(config, pretrained))
  return cli.run_guarded(lambda: pretrain.run(config, flags.FLAGS.workdir, pretrained))


if __name__ == "__main__":
  sys.exit(cli.run_app(main))
