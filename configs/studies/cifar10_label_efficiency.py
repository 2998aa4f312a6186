"""Does MAE pretraining pay on CIFAR-10, and by how much where labels are few? The
label-efficiency study (`python -m mae_jax.study`), sized for a 2-core CPU: about 3 hours.

Pretraining: patch 4 (64 patches of the 32 px image), encoder 128 x 4 (4 heads), decoder 64 x 2
(2 heads), mask 0.75, norm_pix_loss, 40 epochs of batch 256 with the official recipe at this
scale (RandomResizedCrop 0.2-1 + flip, ImageNet mean/std, AdamW (0.9, 0.95), wd 0.05, base lr
1.5e-3, 5 warmup epochs, cosine), the checkpoints of epochs 10, 20 and 30 kept. Then at 1%, 10%
and 100% of the labels (3, 3 and 1 seeds): fine-tuning from MAE and from scratch with one recipe
(AdamW (0.9, 0.999), base lr 1e-3, wd 0.05, no layer decay, RandomResizedCrop 0.35-1 + flip,
label smoothing 0.1, drop path 0.1, mean-pooled patch tokens + fc_norm; the same epochs for
both), a linear probe (BatchNorm + linear on the mean-pooled features, AdamW) of the MAE and of
a random encoder, and kNN (k 20) with the labelled images as memory.

Offline: --config.dataset.source=folder --config.dataset.folder=data/cifar10-jpeg
':tiny': the CPU-sized preset with a few steps per part, for a quick check of the plumbing.
"""

import ml_collections

from mae_jax import config_lib

IMAGENET = dict(mean=config_lib.IMAGENET_MEAN, std=config_lib.IMAGENET_STD)


def get_config(arg=None):
  c = config_lib.pretrain_config()
  c.dataset.update(name="cifar10", image_size=32, random_resized_crop=True, crop_scale=(0.2, 1.0),
                   hflip=True, interpolation="bicubic", eval_crop_pct=1.0, **IMAGENET)
  c.model.update(patch_size=4, encoder_width=128, encoder_depth=4, encoder_heads=4,
                 decoder_width=64, decoder_depth=2, decoder_heads=2, mask_ratio=0.75,
                 norm_pix_loss=True)
  c.batch_size, c.num_epochs, c.warmup_epochs = 256, 40, 5
  c.optimizer.update(base_lr=1.5e-3, weight_decay=0.05, b1=0.9, b2=0.95)
  c.log_every_steps, c.figure_every_steps, c.checkpoint_every_steps = 50, 1950, 390
  c.keep_checkpoint_every_epochs = 10
  c.finetune.update(warmup_epochs=1, base_lr=1e-3, min_lr=1e-6, layer_decay=1.0,
                    weight_decay=0.05, b1=0.9, b2=0.999, drop_path=0.1, mixup=0.0, cutmix=0.0,
                    label_smoothing=0.1, randaug_num_ops=0, random_erasing=0.0,
                    random_resized_crop=True, crop_scale=(0.35, 1.0), hflip=True, global_pool=True,
                    log_every_steps=50, checkpoint_every_steps=500)
  c.probe.update(warmup_epochs=1, optimizer="adamw", base_lr=4e-3, min_lr=0.0,
                 weight_decay=0.0, b1=0.9, b2=0.999, global_pool=True, random_resized_crop=False,
                 hflip=True, log_every_steps=50, checkpoint_every_steps=500)
  c.evaluate.update(knn_k=20, knn_train_examples=0, num_images=0)
  # Per fraction of the labels: seeds, and the epochs of each job (few labels: more epochs, so that
  # each job sees a comparable number of images; one evaluation at the end).
  # 1%: 500 images, batches of 64 (7 updates per epoch).
  labels = [(0.01, 3, 50, 50, 64), (0.1, 3, 10, 10, 128), (1.0, 1, 3, 3, 128)]
  c.study = ml_collections.ConfigDict(dict(
      title="Label efficiency on CIFAR-10: MAE pretraining against a random initialisation",
      jobs=("finetune", "probe", "knn"),
      labels=[(f, seeds, {"finetune.num_epochs": ft, "finetune.eval_every_epochs": ft,
                          "probe.num_epochs": pr, "probe.eval_every_epochs": pr,
                          "finetune.batch_size": batch, "probe.batch_size": 2 * batch})
              for f, seeds, ft, pr, batch in labels],
      along_epochs=(10, 20, 30),
      along_fraction=0.1,
      along_jobs=("probe", "knn", "finetune"),
  ))
  if arg == "tiny":  # a few steps per part: the plumbing, not the figures
    c = config_lib.tiny_overrides(c)
    c.update(batch_size=8, num_epochs=3, warmup_epochs=1, max_steps=0, checkpoint_every_steps=1000,
             figure_every_steps=1000, keep_checkpoint_every_epochs=1, log_every_steps=5)
    c.finetune.update(log_every_steps=5)
    c.probe.update(log_every_steps=5)
    c.evaluate.update(num_images=20, batch_size=20)
    one = lambda epochs: {"finetune.num_epochs": epochs, "finetune.eval_every_epochs": epochs,
                          "probe.num_epochs": epochs, "probe.eval_every_epochs": epochs,
                          "finetune.batch_size": 4, "probe.batch_size": 4}
    c.study.update(labels=[(0.5, 2, one(2)), (1.0, 1, one(1))], along_epochs=(1,), along_fraction=0.5)
  elif arg not in (None, ""):
    raise config_lib.ConfigError(f"unknown config argument {arg!r}; use no argument or ':tiny'")
  return c
