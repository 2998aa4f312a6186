"""Pretrain an MAE: `python -m mae_jax.main --config=configs/cifar10_vit_t.py --workdir=runs/cifar10`.

Run the same command again to resume from the last checkpoint in the workdir.
"""

import sys

from mae_jax import cli

cli.define_job_flags(pretrained_help=(
    "Start a new run from these weights instead of a random init: a pretraining workdir, or an "
    "official/timm/Hugging Face MAE checkpoint with its decoder (see mae_jax.convert). The "
    "optimizer and step start afresh."))


def pretrain_job(config, workdir, pretrained, pretrained_step):
  from mae_jax.train import pretrain  # after the distributed start: JAX's devices not touched before it
  return pretrain.run(config, workdir, pretrained, pretrained_step)


if __name__ == "__main__":
  sys.exit(cli.run_app(cli.job_main(pretrain_job, "pretrain")))
