"""WikiArt MAE (Nguyen & Nguyen, "Adapting Masked Autoencoders for Artistic Image Generation"),
read from an image folder: 224 px, patch 16, mask 0.75, batch 32,
AdamW wd 0.05, cosine, 10 epochs, ImageNet mean/std.

The seed's three models are the config argument (model2, its best, by default):
  model1: encoder 6x384 (6 heads), decoder 2x256 (8 heads)   -> masked MSE 0.1924, LPIPS 0.4118
  model2: encoder 12x192 (3 heads), decoder 4x192 (3 heads)   -> masked MSE 0.0488, LPIPS 0.2975
  model3: encoder 12x192 (3 heads), decoder 8x512 (16 heads)  -> masked MSE 0.397,  LPIPS 0.6058
e.g. --config=configs/wikiart_vit.py:model1, or ':tiny' for the CPU-sized preset.
Folder layout: <folder>/{train,test}/<style>/*.jpg  (--config.dataset.folder=/data/wikiart)
"""

from mae_jax import config_lib

MODELS = {
    "model1": dict(encoder_width=384, encoder_depth=6, encoder_heads=6,
                   decoder_width=256, decoder_depth=2, decoder_heads=8),
    "model2": dict(encoder_width=192, encoder_depth=12, encoder_heads=3,
                   decoder_width=192, decoder_depth=4, decoder_heads=3),
    "model3": dict(encoder_width=192, encoder_depth=12, encoder_heads=3,
                   decoder_width=512, decoder_depth=8, decoder_heads=16),
}


def get_config(arg=None):
  c = config_lib.pretrain_config()
  c.dataset.update(name="wikiart", source="folder", folder="data/wikiart", image_size=224,
                   random_resized_crop=True, crop_scale=(0.2, 1.0), hflip=True,
                   eval_crop_pct=1.0)
  model = arg if arg in MODELS else "model2"
  c.model.update(patch_size=16, mask_ratio=0.75, norm_pix_loss=False, **MODELS[model])
  c.batch_size, c.num_epochs, c.warmup_epochs = 32, 10, 1
  c.optimizer.update(base_lr=1.5e-4, weight_decay=0.05)
  c.log_every_steps, c.figure_every_steps, c.checkpoint_every_steps = 100, 2000, 2000
  return config_lib.apply_arg(c, None if arg in MODELS else arg)
