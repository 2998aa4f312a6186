"""Decoder width (the paper's Table 1b: 128 to 1024 for ViT-L; here 64 to 256 for ViT-T/2 on
CIFAR-10). ':tiny' for the CPU-sized study."""

from mae_jax import config_lib


def get_config(arg=None):
  return config_lib.study_config(
      __file__, "../cifar10_vit_t.py", arg, title="Decoder width", axis="decoder_width",
      metric="probe_top1",
      # Heads of 32 channels each, so that every width divides evenly.
      runs=[(f"width_{w}", {"model.decoder_width": w, "model.decoder_heads": w // 32})
            for w in (64, 128, 192, 256)])
