"""Patch size (the WikiArt study's ablation, there at 224 px): here 2, 4 and 8 px patches on
32 px CIFAR-10 (256, 64, 16 patches). ':tiny' for the CPU-sized study."""

from mae_jax import config_lib


def get_config(arg=None):
  return config_lib.study_config(
      __file__, "../cifar10_vit_t.py", arg, title="Patch size", axis="patch_size",
      metric="evaluate_masked_mse_pixel", jobs=("pretrain", "probe", "evaluate"),
      runs=[(f"patch_{p}", {"model.patch_size": p}) for p in (2, 4, 8)])
