"""Linear probe of a pretrained encoder:
`python -m mae_jax.probe --config=configs/cifar10_vit_t.py --pretrained=runs/cifar10 --workdir=runs/cifar10_probe`.

Frozen encoder features (cls token by default; `--config.probe.global_pool=True` for the mean
patch token) -> BatchNorm without affine -> linear head, trained with `config.probe`'s optimizer;
reports top-1 / top-5 on the test split in `workdir/results.json`. Resumes like pretraining.
"""

import sys

from mae_jax import cli

cli.define_job_flags()


def probe(config, workdir, pretrained, pretrained_step):
  from mae_jax.train import classify
  return classify.run(config, workdir, pretrained, "probe", pretrained_step)


if __name__ == "__main__":
  sys.exit(cli.run_app(cli.job_main(probe, "probe")))
