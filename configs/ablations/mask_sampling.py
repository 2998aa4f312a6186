"""Mask sampling (the CIFAR-10 ViT-T/2 ablation study's Table 1b and the paper's Table 1f): random 75 (84.4 ft), block 50
(85.1), block 75 (83.7), grid 75 (82.0) on CIFAR-10 ViT-T/2. ':tiny' for the CPU-sized study."""

from mae_jax import config_lib

RUNS = [("random_75", {"model.mask_sampling": "random", "model.mask_ratio": 0.75}),
        ("block_50", {"model.mask_sampling": "block", "model.mask_ratio": 0.5}),
        ("block_75", {"model.mask_sampling": "block", "model.mask_ratio": 0.75}),
        ("grid_75", {"model.mask_sampling": "grid", "model.mask_ratio": 0.75})]


def get_config(arg=None):
  return config_lib.study_config(
      __file__, "../cifar10_vit_t.py", arg, title="Mask sampling", axis="run",
      metric="finetune_top1", jobs=("pretrain", "finetune", "evaluate"), runs=RUNS)
