"""STL-10, the baseline MAE of the curriculum-masking study (Rana et al.): 224 px (STL-10's 96 px images upsampled), patch 16; encoder 8x192
with 6 heads; decoder 4x128 with 4 heads; mask 0.75. Pretrains on the 100,000-image 'unlabelled'
split, batch 64, AdamW (0.9, 0.95) wd 0.05 at lr 1.5e-4 (base_lr 6e-4 x 64 / 256), cosine with
warmup, 10 epochs (the seed's quick run; it recommends 400-800: --config.num_epochs=400).

The loss is on raw (dataset-normalised) pixels: the study's Laplacian loss compares predicted and
target images, which needs pixel-space predictions.
"""

from mae_jax import config_lib


def get_config(arg=None):
  c = config_lib.pretrain_config()
  c.dataset.update(name="stl10", image_size=224, random_resized_crop=True, crop_scale=(0.2, 1.0),
                   hflip=True, eval_crop_pct=1.0)  # test images resized to 224 whole, as the study
  c.model.update(patch_size=16, encoder_width=192, encoder_depth=8, encoder_heads=6,
                 decoder_width=128, decoder_depth=4, decoder_heads=4, mask_ratio=0.75,
                 norm_pix_loss=False)
  c.batch_size, c.num_epochs, c.warmup_epochs = 64, 10, 1
  c.optimizer.update(base_lr=6e-4, weight_decay=0.05)
  c.log_every_steps, c.figure_every_steps, c.checkpoint_every_steps = 100, 1563, 1563
  # Downstream as the study: batch 128 on the 5,000 labelled training images, tested on 8,000.
  c.finetune.update(num_epochs=10, warmup_epochs=1, batch_size=128, base_lr=1e-3, layer_decay=0.75,
                    log_every_steps=20, checkpoint_every_steps=390, eval_every_epochs=5)
  c.probe.update(num_epochs=10, warmup_epochs=1, batch_size=128, optimizer="adamw", base_lr=1e-3,
                 weight_decay=0.0, log_every_steps=20, checkpoint_every_steps=390, eval_every_epochs=5)
  return config_lib.apply_arg(c, arg)
