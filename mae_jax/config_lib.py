"""The default pretraining config, its presets (`:tiny`, `:official_eval`) and loading.

Config files in `configs/` start from `pretrain_config()` and change what their
setting needs; every field can be overridden on the command line
(`--config.batch_size=512`, `--config.model.decoder_depth=2`).
"""

import os

import jax
import ml_collections

from mae_jax.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def pretrain_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.dataset = ml_collections.ConfigDict(dict(
      name="cifar10",            # a key of mae_jax.sources.DATASETS
      source="tfds",             # 'tfds' (tfds.data_source), 'folder' (root/<split>/<class>/*.jpg)
                                 # or 'prepared' (written by python -m mae_jax.prepare)
      tfds_data_dir=ml_collections.FieldReference(None, field_type=str),
      download=True,             # let tfds download and prepare on first use
      folder=ml_collections.FieldReference(None, field_type=str),
      # Split names; None: the dataset's default (sources.DATASETS).
      pretrain_split=ml_collections.FieldReference(None, field_type=str),
      train_split=ml_collections.FieldReference(None, field_type=str),  # labelled: probe, fine-tune
      eval_split=ml_collections.FieldReference(None, field_type=str),
      image_size=224,
      mean=IMAGENET_MEAN,
      std=IMAGENET_STD,
      random_resized_crop=True,
      crop_scale=(0.2, 1.0),
      hflip=True,
      interpolation="bicubic",
      crop_mode="retry",         # RandomResizedCrop's rule: 'retry' (torchvision: up to 10 draws)
                                 # or 'clamp' (one draw clamped to the image: util/crop.py)
      eval_crop_pct=0.875,       # evaluation: resize the shorter side to int(image_size / this),
                                 # centre-crop image_size (official 224 / 256; 1.0: the image as it is)
      num_workers=-1,            # grain worker processes (-1: from the cores, pipeline.resolve_workers;
                                 # 0: decode in the main process)
      read_threads=2,            # threads per loader process reading records ahead (raise for
                                 # remote storage: GCS, NFS); 0 reads in the decoding thread
      label_fraction=1.0,        # probe / fine-tune / kNN on a class-balanced subset of the
      labels_per_class=0,        # labelled train split: this fraction of every class, or (> 0)
      label_seed=0,              # this many images per class; the subset drawn with label_seed
      resize_on="host",          # where the train crop is resampled: 'host' (the loader's
                                 # workers) or 'device' (the train step; the workers decode and
                                 # crop only: mae_jax/data/device_resample.py)
  ))

  c.model = ml_collections.ConfigDict(dict(
      patch_size=16,
      encoder_width=768, encoder_depth=12, encoder_heads=12,
      decoder_width=512, decoder_depth=8, decoder_heads=16,
      mlp_ratio=4.0,
      mask_ratio=0.75,
      mask_sampling="random",    # 'random', 'block' (BEiT blockwise) or 'grid' (1 in every 2x2; ratio 0.75)
      mask_token_in_encoder=False,  # ablation: the encoder sees every patch, mask tokens in place
      # Curriculum masking: the ratio ramps from this ratio in [0, 1) to mask_ratio; None: off.
      curriculum_start_ratio=ml_collections.FieldReference(None, field_type=float),
      curriculum_epochs=5.0,
      curriculum_shape="linear",    # 'linear' or 'cosine'
      curriculum_bucket=0.05,       # ratios rounded to this: one compilation per bucket
      laplacian_weight=0.0,      # masked Laplacian L1 (the STL-10 curriculum study: 0.05)
      uniformity_weight=0.0,     # uniformity of pooled encoder features (the STL-10 study: 0.01)
      norm_pix_loss=True,
      dtype="float32",           # compute dtype; 'bfloat16' on GPU/TPU. Params stay float32.
      # None: cuDNN's fused attention where it can train, else XLA's; 'xla' or 'cudnn' to choose.
      attention_impl=ml_collections.FieldReference(None, field_type=str),
      remat="none",              # 'block': recompute each block's activations in the backward
                                 # pass (memory for about 1/3 more compute); 'dots': keep matmuls
      scan_layers=False,         # pretraining: the encoder and decoder blocks as one nn.scan each
                                 # (compiles one block, not depth of them; parameters stacked)
      layer_norm_eps=1e-6,       # the official code's; weights converted from Hugging Face keep its 1e-12
  ))

  c.sharding = ml_collections.ConfigDict(dict(
      fsdp=False,                # split parameters and optimizer state over the devices (large
                                 # models: each device holds 1/N of them); False: replicated
  ))

  c.batch_size = 4096            # effective (global) batch per optimizer update
  c.grad_accum_steps = 1         # micro-batches per update: each is batch_size / grad_accum_steps
  c.num_epochs = 800
  c.warmup_epochs = 40
  c.max_steps = 0                # > 0: stop after this many steps (updates; smoke runs, benchmarks)
  c.skip_nonfinite = False       # a non-finite loss or gradient: False stops the run with an error
                                 # (the last good checkpoint kept); True skips that update, counted

  c.optimizer = ml_collections.ConfigDict(dict(
      base_lr=1.5e-4,            # lr = base_lr * batch_size / 256
      min_lr=0.0,
      weight_decay=0.05,
      b1=0.9,
      b2=0.95,
  ))

  # Linear probe (mae_jax.probe): the paper's recipe (LARS, batch 16384, 90 epochs).
  c.probe = ml_collections.ConfigDict(dict(
      num_epochs=90, warmup_epochs=10, batch_size=16384,
      optimizer="lars",          # 'lars', 'adamw' or 'sgd'
      base_lr=0.1, min_lr=0.0, weight_decay=0.0, momentum=0.9, b1=0.9, b2=0.999,
      global_pool=False,         # cls-token features (the paper's probe); True: mean patch token
      random_resized_crop=True, crop_scale=(0.08, 1.0), hflip=True,
      crop_mode="clamp",         # main_linprobe.py's RandomResizedCrop (util/crop.py)
      log_every_steps=50, checkpoint_every_steps=1000, eval_every_epochs=10,
  ))
  # Fine-tuning (mae_jax.finetune), also from scratch without --pretrained: the paper's ViT-B recipe.
  c.finetune = ml_collections.ConfigDict(dict(
      num_epochs=100, warmup_epochs=5, batch_size=1024, grad_accum_steps=1,
      base_lr=5e-4, min_lr=1e-6, layer_decay=0.65, weight_decay=0.05, b1=0.9, b2=0.999,
      drop_path=0.1, mixup=0.8, cutmix=1.0, label_smoothing=0.1,
      randaug_num_ops=2, randaug_magnitude=9.0, randaug_magnitude_std=0.5,  # num_ops 0: off
      random_erasing=0.25,
      random_resized_crop=True, crop_scale=(0.08, 1.0), hflip=True, crop_mode="retry",
      global_pool=True,          # mean patch token + fc_norm; False: cls token
      # k: fine-tune only the last k blocks (the paper's partial fine-tuning); None: all of them.
      trainable_blocks=ml_collections.FieldReference(None, field_type=int),
      log_every_steps=50, checkpoint_every_steps=1000, eval_every_epochs=5,
  ))
  # Reconstruction metrics and kNN (mae_jax.evaluate; kNN also during pretraining).
  c.evaluate = ml_collections.ConfigDict(dict(
      batch_size=256,
      num_images=0,              # test images measured; 0: the whole split
      mask_ratio=ml_collections.FieldReference(None, field_type=float),  # None: the model's
      # Paths of LPIPS weight files (.npz, python -m mae_jax.lpips); None skips that LPIPS.
      lpips_alex=ml_collections.FieldReference(None, field_type=str),
      lpips_vgg=ml_collections.FieldReference(None, field_type=str),
      figure_images=16,
      knn_k=20, knn_temperature=0.07,
      knn_every_steps=0,         # > 0: kNN accuracy during pretraining, written to metrics.jsonl
      knn_train_examples=0,      # 0: the whole train split as the kNN memory
  ))

  c.log_every_steps = 50
  c.figure_every_steps = 2000
  c.num_figure_images = 8
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.keep_checkpoint_every_epochs = 0  # > 0: also keep the checkpoint at every N epochs of
                                      # pretraining, for probing / fine-tuning along the way
                                      # (--pretrained_step)
  # A jax.profiler trace of `profile_num_steps` steps from this step on, into workdir/profile
  # (TensorBoard's Profile tab or XProf); None: no trace. Any job (pretrain, probe, fine-tune).
  c.profile_start_step = ml_collections.FieldReference(None, field_type=int)
  c.profile_num_steps = 3
  # Weights & Biases (opt-in; the wandb extra): the project to log to, None: no W&B.
  c.wandb_project = ml_collections.FieldReference(None, field_type=str)
  c.wandb_entity = ml_collections.FieldReference(None, field_type=str)  # None: your default entity
  return c


def tiny_overrides(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A CPU-sized model and schedule for smoke runs and tests (a few minutes on 2 cores)."""
  c.model.update(patch_size=4, encoder_width=64, encoder_depth=2, encoder_heads=2,
                 decoder_width=32, decoder_depth=1, decoder_heads=2)
  c.batch_size, c.grad_accum_steps = 64, 1
  c.num_epochs = 1
  c.warmup_epochs = 0
  c.max_steps = 60
  c.optimizer.base_lr = 1.5e-3
  c.log_every_steps = 10
  c.figure_every_steps = 50
  c.checkpoint_every_steps = 50
  c.dataset.num_workers = 2
  c.probe.update(batch_size=64, num_epochs=1, warmup_epochs=0, optimizer="adamw", base_lr=4e-3,
                 log_every_steps=10, checkpoint_every_steps=50, eval_every_epochs=1)
  c.finetune.update(batch_size=64, num_epochs=1, warmup_epochs=0, base_lr=2e-3, layer_decay=0.75,
                    drop_path=0.0, log_every_steps=10, checkpoint_every_steps=50, eval_every_epochs=1)
  c.evaluate.update(batch_size=100, num_images=500, figure_images=8, knn_train_examples=5000)
  return c


def official_evaluation(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The probe and fine-tuning recipes of the official main_linprobe.py and main_finetune.py
  (their defaults) and their evaluation transform; the schedule lengths and batch sizes stay the
  config's, and so does the normalisation (the pretraining's). docs/numerics.md shows the two
  jobs train and evaluate as the official scripts do."""
  c.dataset.update(eval_crop_pct=224 / 256, interpolation="bicubic")
  c.probe.update(optimizer="lars", base_lr=0.1, min_lr=0.0, weight_decay=0.0, momentum=0.9,
                 global_pool=False, random_resized_crop=True, crop_scale=(0.08, 1.0), hflip=True,
                 crop_mode="clamp")
  c.finetune.update(base_lr=1e-3, min_lr=1e-6, layer_decay=0.75, weight_decay=0.05, b1=0.9, b2=0.999,
                    drop_path=0.1, mixup=0.8, cutmix=1.0, label_smoothing=0.1, randaug_num_ops=2,
                    randaug_magnitude=9.0, randaug_magnitude_std=0.5, random_erasing=0.25,
                    random_resized_crop=True, crop_scale=(0.08, 1.0), hflip=True, crop_mode="retry",
                    global_pool=True, trainable_blocks=None)
  return c


CONFIG_ARGS = {"tiny": tiny_overrides, "official_eval": official_evaluation}


def apply_arg(c: ml_collections.ConfigDict, arg) -> ml_collections.ConfigDict:
  """The config-file argument every config accepts: '' (full size), or comma-separated words of
  CONFIG_ARGS: 'tiny' (CPU-sized preset), 'official_eval' (the official probe and fine-tuning
  recipes), e.g. ':tiny,official_eval'. 'tiny' goes first whatever the order."""
  if arg in (None, ""):
    return c
  words = arg.split(",")
  unknown = [w for w in words if w not in CONFIG_ARGS]
  if unknown:
    raise ConfigError(f"unknown config argument {unknown[0]!r}; use no argument or words of "
                      f"{', '.join(CONFIG_ARGS)} joined by ',' (e.g. ':tiny,official_eval')")
  for word in sorted(set(words), key=list(CONFIG_ARGS).index):
    c = CONFIG_ARGS[word](c)
  return c


VIT_SIZES = {  # the paper's encoders: (patch, width, depth, heads)
    "b": (16, 768, 12, 12),
    "l": (16, 1024, 24, 16),
    "h": (14, 1280, 32, 16),
}


def imagenet_config(size: str, arg=None) -> ml_collections.ConfigDict:
  """The paper's ImageNet-1K recipe for ViT-B/16, ViT-L/16 and ViT-H/14."""
  c = pretrain_config()
  patch, width, depth, heads = VIT_SIZES[size]
  c.dataset.update(name="imagenet2012", image_size=224, random_resized_crop=True,
                   crop_scale=(0.2, 1.0), hflip=True, interpolation="bicubic")
  c.model.update(patch_size=patch, encoder_width=width, encoder_depth=depth, encoder_heads=heads,
                 decoder_width=512, decoder_depth=8, decoder_heads=16, mask_ratio=0.75,
                 norm_pix_loss=True, dtype="bfloat16")
  c.batch_size, c.num_epochs, c.warmup_epochs = 4096, 800, 40
  c.sharding.fsdp = size in ("l", "h")  # 1.2 GB (L) and 2.5 GB (H) of float32 params, x4 with AdamW
  c.optimizer.update(base_lr=1.5e-4, weight_decay=0.05, b1=0.9, b2=0.95)
  # The paper's fine-tuning (B: 100 epochs, lr 5e-4, decay 0.65, drop path 0.1; L/H: 50 epochs,
  # lr 1e-3, decay 0.75, drop path 0.2/0.3) and linear probe (LARS, batch 16384, 90/50 epochs).
  ft = {"b": (100, 5e-4, 0.65, 0.1), "l": (50, 1e-3, 0.75, 0.2), "h": (50, 1e-3, 0.75, 0.3)}[size]
  c.finetune.update(num_epochs=ft[0], base_lr=ft[1], layer_decay=ft[2], drop_path=ft[3])
  c.probe.update(num_epochs=90 if size == "b" else 50)
  return apply_arg(c, arg)


def load_config_file(path: str, arg=None) -> ml_collections.ConfigDict:
  """`get_config(arg)` of a config file, by path (as --config=path:arg does)."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def study_config(study_file: str, base: str, arg, *, title: str, axis: str, metric: str, runs,
                 jobs=("pretrain", "probe", "finetune")) -> ml_collections.ConfigDict:
  """A study (mae_jax.sweep): the base config file (relative to the study file), each run's
  label and overrides, the jobs. With arg 'tiny', the base's CPU preset and short jobs."""
  c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(study_file)), base), arg)
  if arg == "tiny":
    c.max_steps = 200
    c.evaluate.update(num_images=500, knn_train_examples=2000)
    c.probe.global_pool = True  # at a few hundred steps the cls token is not trained yet
  c.sweep = ml_collections.ConfigDict(dict(title=title, axis=axis, metric=metric,
                                           runs=[(label, dict(o)) for label, o in runs],
                                           jobs=tuple(jobs)))
  return c


def field(config, dotted: str):
  node = config
  for name in dotted.split("."):
    node = node[name]
  return node


def set_fields(config, overrides: dict):
  """Sets each `{"dotted.name": value}` of `overrides` in `config` (in place); returns it."""
  for dotted, value in overrides.items():
    parent, _, leaf = dotted.rpartition(".")
    (field(config, parent) if parent else config)[leaf] = value
  return config


def eval_batch_size(config) -> int:
  """`evaluate.batch_size` rounded up to a multiple of the device count (evaluation pads its
  batches, so any size works on any number of devices)."""
  n = jax.device_count()
  return -(-config.evaluate.batch_size // n) * n


def upgrade(saved: dict) -> dict:
  """A config dict read back from a checkpoint or converted weights, with every field added to
  `pretrain_config` since it was written filled with today's default: the one place where a
  default stands in for a missing field (code reads every field directly)."""
  def merge(default, have):
    if not (isinstance(default, dict) and isinstance(have, dict)):
      return have
    return {**default, **{k: merge(default[k], v) if k in default else v for k, v in have.items()}}
  merged = merge(pretrain_config().to_dict(), saved)
  for section, name in UNSET_WAS_NEGATIVE:  # written before None meant unset: -1 did
    value = merged.get(section, {}).get(name)
    if isinstance(value, (int, float)) and value < 0:
      merged[section][name] = None
  for section, name in UNSET_WAS_EMPTY:  # and '' did for these
    if merged.get(section, {}).get(name) == "":
      merged[section][name] = None
  return merged


# Fields whose 'unset' was a negative number, or '', in configs written before it became None.
UNSET_WAS_NEGATIVE = (("model", "curriculum_start_ratio"), ("finetune", "trainable_blocks"),
                      ("evaluate", "mask_ratio"))
UNSET_WAS_EMPTY = (("dataset", "pretrain_split"), ("dataset", "train_split"),
                   ("dataset", "eval_split"), ("model", "attention_impl"),
                   ("evaluate", "lpips_alex"), ("evaluate", "lpips_vgg"))


ENCODER_FIELDS = ("patch_size", "encoder_width", "encoder_depth", "encoder_heads", "mlp_ratio")
DECODER_FIELDS = ("decoder_width", "decoder_depth", "decoder_heads")


def model_signature(config, encoder_only: bool = False) -> dict:
  """What must match for a checkpoint to be restored into this config's model (its encoder
  alone with `encoder_only`: probing, fine-tuning)."""
  keys = ENCODER_FIELDS + (() if encoder_only else DECODER_FIELDS)
  return {k: config.model[k] for k in keys}
