"""Decoder depth (the paper's Table 1a: 1, 2, 4, 8 blocks; deeper helps linear probing more than
fine-tuning). CIFAR-10 ViT-T/2; ':tiny' for the CPU-sized study."""

from mae_jax import config_lib


def get_config(arg=None):
  return config_lib.study_config(
      __file__, "../cifar10_vit_t.py", arg, title="Decoder depth", axis="decoder_depth",
      metric="probe_top1", runs=[(f"depth_{d}", {"model.decoder_depth": d}) for d in (1, 2, 4, 8)])
