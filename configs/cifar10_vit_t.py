"""CIFAR-10, ViT-T/2 MAE: the setting of the CIFAR-10 ViT-T/2 ablation study (Huang) and IcarusWizard/MAE.

32 px, patch 2 (256 patches); encoder 12x192, 3 heads; decoder 4x192, 3 heads; mask 0.75, plain
pixel MSE (no norm_pix_loss), images normalised with mean = std = 0.5, no augmentation (turn on
with --config.dataset.random_resized_crop=True --config.dataset.hflip=True). AdamW (0.9, 0.95),
wd 0.05, base lr 1.5e-4 x 4096 / 256, 2000 epochs with 200 warmup. IcarusWizard/MAE reports 89.77%
fine-tuned top-1 after this pretraining (74.13% from scratch), about 22 hours on a 2080 Ti.

The effective batch 4096 is reached as IcarusWizard/MAE does, by 8 accumulated micro-batches of
512, inside each step (XLA's CPU analysis puts a 256-image step at about 14 GiB of temporaries in
float32). On a device that holds more, use fewer: --config.grad_accum_steps=2
--config.model.dtype=bfloat16.

Offline: --config.dataset.source=folder --config.dataset.folder=data/cifar10-jpeg
Argument ':tiny' gives a CPU-sized model and a 60-step schedule for smoke runs.
"""

from mae_jax import config_lib


def get_config(arg=None):
  c = config_lib.pretrain_config()
  c.dataset.update(name="cifar10", image_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                   random_resized_crop=False, hflip=False,
                   eval_crop_pct=1.0)  # test images as they are (the official eval would resize 32 -> 36 and crop)
  c.model.update(patch_size=2, encoder_width=192, encoder_depth=12, encoder_heads=3,
                 decoder_width=192, decoder_depth=4, decoder_heads=3, mask_ratio=0.75,
                 norm_pix_loss=False)
  c.batch_size, c.grad_accum_steps = 4096, 8
  c.num_epochs, c.warmup_epochs = 2000, 200
  c.optimizer.update(base_lr=1.5e-4, weight_decay=0.05, b1=0.9, b2=0.95)
  c.log_every_steps, c.figure_every_steps, c.checkpoint_every_steps = 12, 1200, 600  # 12 updates per epoch
  # Fine-tuning and the from-scratch baseline as the ablation study / IcarusWizard/MAE: 100 epochs, batch 128,
  # AdamW (0.9, 0.999) base lr 1e-3 wd 0.05, 5 warmup epochs, cls token, no mixing or extra aug.
  c.finetune.update(num_epochs=100, warmup_epochs=5, batch_size=128, base_lr=1e-3, min_lr=0.0,
                    layer_decay=1.0, weight_decay=0.05, b1=0.9, b2=0.999, drop_path=0.0,
                    mixup=0.0, cutmix=0.0, label_smoothing=0.0, randaug_num_ops=0,
                    random_erasing=0.0, random_resized_crop=False, hflip=False, global_pool=False,
                    log_every_steps=100, checkpoint_every_steps=3900, eval_every_epochs=5)
  # Linear probe at small scale (the Tiny ImageNet ViT-Lite reproduction's recipe): AdamW (0.9, 0.95), 50 epochs, batch 128.
  c.probe.update(num_epochs=50, warmup_epochs=2, batch_size=128, optimizer="adamw", base_lr=1e-3,
                 weight_decay=0.0, b1=0.9, b2=0.95, random_resized_crop=False, hflip=True,
                 log_every_steps=100, checkpoint_every_steps=3900, eval_every_epochs=5)
  c.evaluate.knn_train_examples = 50000
  return config_lib.apply_arg(c, arg)
