"""Tiny ImageNet, ViT-Lite MAE (Burgund's Tiny ImageNet reproduction, 2026, after Charisoudis et al., ReScience C 9.2 #40).

64 px, patch 4 (256 patches); encoder 7x256 with 4 heads (about 3.7M parameters); decoder 2x128
with 4 heads; mask 0.75, norm_pix_loss. Batch 256, AdamW (0.9, 0.95) wd 0.15, base lr 5e-4,
1200 epochs with 20 warmup, RandomResizedCrop + flip. Burgund reports 62.2% fine-tuned and
23.78% linear-probe top-1.

Tiny ImageNet is not in tfds: point the config at the unpacked tiny-imagenet-200 folder
(train/<wnid>/images/*.JPEG is found as it is; val/ must be sorted into val/<wnid>/, see README):
  --config.dataset.folder=/data/tiny-imagenet-200
"""

from mae_jax import config_lib


def get_config(arg=None):
  c = config_lib.pretrain_config()
  c.dataset.update(name="tiny_imagenet", source="folder", folder="data/tiny-imagenet-200",
                   image_size=64, random_resized_crop=True, crop_scale=(0.2, 1.0), hflip=True,
                   eval_crop_pct=1.0)
  c.model.update(patch_size=4, encoder_width=256, encoder_depth=7, encoder_heads=4,
                 decoder_width=128, decoder_depth=2, decoder_heads=4, mask_ratio=0.75,
                 norm_pix_loss=True)
  c.batch_size, c.num_epochs, c.warmup_epochs = 256, 1200, 20
  c.optimizer.update(base_lr=5e-4, weight_decay=0.15)
  c.log_every_steps, c.figure_every_steps, c.checkpoint_every_steps = 100, 3900, 3900
  # Burgund's Table 1: fine-tune 100 epochs, batch 128, base lr 1e-3, wd 0.05, warmup 5, AdamW
  # (0.9, 0.999), RandAugment(2, 9); probe 50 epochs, batch 128, base lr 1e-3, wd 0, warmup 2,
  # AdamW (0.9, 0.95), flip.
  c.finetune.update(num_epochs=100, warmup_epochs=5, batch_size=128, base_lr=1e-3, weight_decay=0.05,
                    b1=0.9, b2=0.999, randaug_num_ops=2, randaug_magnitude=9.0, layer_decay=0.75,
                    log_every_steps=100, checkpoint_every_steps=3900, eval_every_epochs=5)
  c.probe.update(num_epochs=50, warmup_epochs=2, batch_size=128, optimizer="adamw", base_lr=1e-3,
                 weight_decay=0.0, b1=0.9, b2=0.95, random_resized_crop=False, hflip=True,
                 log_every_steps=100, checkpoint_every_steps=3900, eval_every_epochs=5)
  return config_lib.apply_arg(c, arg)
