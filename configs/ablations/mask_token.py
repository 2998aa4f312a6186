"""Mask token in the encoder (the CIFAR-10 ViT-T/2 ablation study's Table 1a, the paper's Table 1c): encoder w/o [M] 84.4 ft
at 1x FLOPs vs w/ [M] 80.6 at 2.4x (the FLOPs column comes from XLA's cost analysis).
CIFAR-10 ViT-T/2; ':tiny' for the CPU-sized study."""

from mae_jax import config_lib


def get_config(arg=None):
  return config_lib.study_config(
      __file__, "../cifar10_vit_t.py", arg, title="Mask token in the encoder", axis="run",
      metric="finetune_top1", jobs=("pretrain", "finetune"),
      runs=[("encoder_without_mask_token", {"model.mask_token_in_encoder": False}),
            ("encoder_with_mask_token", {"model.mask_token_in_encoder": True})])
