"""Masking ratio (the paper's Figure 5: fine-tuning peaks near 75%, linear probing keeps rising
to ~75%). CIFAR-10 ViT-T/2; ':tiny' for the CPU-sized study."""

from mae_jax import config_lib


def get_config(arg=None):
  return config_lib.study_config(
      __file__, "../cifar10_vit_t.py", arg, title="Masking ratio", axis="mask_ratio",
      metric="probe_top1", jobs=("pretrain", "probe", "finetune", "evaluate"),
      runs=[(f"ratio_{r}", {"model.mask_ratio": r}) for r in (0.5, 0.6, 0.75, 0.85, 0.9)])
