"""ImageNet-1K, ViT-L/16 MAE, the paper's recipe: decoder 8x512, 800 epochs (40 warmup), batch 4096,
base lr 1.5e-4, AdamW (0.9, 0.95) wd 0.05, RandomResizedCrop(0.2, 1) bicubic + flip, norm_pix_loss.

imagenet2012 must be prepared for tfds by hand (it is not downloadable), or read as an image folder:
  --config.dataset.source=folder --config.dataset.folder=/data/imagenet --config.dataset.eval_split=val
Where a device cannot hold its share of 4096, raise --config.grad_accum_steps.
"""

from mae_jax import config_lib


def get_config(arg=None):
  return config_lib.imagenet_config("l", arg)
