"""Fine-tune a pretrained encoder, or train it from scratch without --pretrained:
`python -m mae_jax.finetune --config=configs/cifar10_vit_t.py --pretrained=runs/cifar10 --workdir=runs/cifar10_ft`.

`config.finetune` sets the recipe: layer-wise lr decay, drop path, mixup/cutmix, label smoothing,
RandAugment, random erasing, global pool + fc_norm or cls token, and `trainable_blocks` for
partial fine-tuning. Writes top-1 / top-5 on the test split to `workdir/results.json`.
"""

import sys

from mae_jax import cli

cli.define_job_flags()


def finetune(config, workdir, pretrained, pretrained_step):
  from mae_jax.train import classify
  return classify.run(config, workdir, pretrained, "finetune", pretrained_step)


if __name__ == "__main__":
  sys.exit(cli.run_app(cli.job_main(finetune, "finetune")))
