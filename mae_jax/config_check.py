"""Config validation: every numeric field against its range, and the fields' combinations,
before any work. Raises ConfigError saying what is wrong and how to fix it."""

import importlib.util
import math

import jax

from mae_jax import config_lib
from mae_jax.data import device_resample, sources, transforms
from mae_jax.errors import ConfigError
from mae_jax.models import masking
from mae_jax.runtime import paths

# The range of every numeric field: '>= a', '> a', or an interval '[a, b)' (brackets as in maths).
RANGES = {
    "seed": ">= 0", "batch_size": ">= 1", "grad_accum_steps": ">= 1", "num_epochs": ">= 1",
    "warmup_epochs": ">= 0", "max_steps": ">= 0", "log_every_steps": ">= 1",
    "figure_every_steps": ">= 1", "num_figure_images": ">= 1", "checkpoint_every_steps": ">= 1",
    "keep_checkpoints": ">= 1", "keep_checkpoint_every_epochs": ">= 0",
    "profile_start_step": ">= 1", "profile_num_steps": ">= 1",
    "dataset.image_size": ">= 1", "dataset.eval_crop_pct": "(0, 1]", "dataset.num_workers": ">= -1", "dataset.read_threads": ">= 0",
    "dataset.label_fraction": "(0, 1]", "dataset.labels_per_class": ">= 0", "dataset.label_seed": ">= 0",
    "model.patch_size": ">= 1", "model.encoder_width": ">= 1", "model.encoder_depth": ">= 1",
    "model.encoder_heads": ">= 1", "model.decoder_width": ">= 1", "model.decoder_depth": ">= 1",
    "model.decoder_heads": ">= 1", "model.mlp_ratio": "> 0", "model.layer_norm_eps": "> 0", "model.mask_ratio": "[0, 1)",
    "model.curriculum_epochs": "> 0", "model.curriculum_bucket": "[0, 1)",
    "model.laplacian_weight": ">= 0", "model.uniformity_weight": ">= 0",
    "optimizer.base_lr": "> 0", "optimizer.min_lr": ">= 0", "optimizer.weight_decay": ">= 0",
    "optimizer.b1": "[0, 1)", "optimizer.b2": "[0, 1)",
    "evaluate.batch_size": ">= 1", "evaluate.num_images": ">= 0", "evaluate.mask_ratio": "[0, 1)",
    "evaluate.figure_images": ">= 1", "evaluate.knn_k": ">= 1", "evaluate.knn_temperature": "> 0",
    "evaluate.knn_every_steps": ">= 0", "evaluate.knn_train_examples": ">= 0",
    **{f"{job}.{k}": v for job in ("probe", "finetune") for k, v in {
        "num_epochs": ">= 1", "warmup_epochs": ">= 0", "batch_size": ">= 1", "base_lr": "> 0",
        "min_lr": ">= 0", "weight_decay": ">= 0", "b1": "[0, 1)", "b2": "[0, 1)",
        "log_every_steps": ">= 1", "checkpoint_every_steps": ">= 1", "eval_every_epochs": ">= 1"}.items()},
    "probe.momentum": "[0, 1)",
    "finetune.grad_accum_steps": ">= 1", "finetune.layer_decay": "(0, 1]", "finetune.drop_path": "[0, 1)",
    "finetune.mixup": ">= 0", "finetune.cutmix": ">= 0", "finetune.label_smoothing": "[0, 1)",
    "finetune.randaug_num_ops": ">= 0", "finetune.randaug_magnitude": ">= 0",
    "finetune.randaug_magnitude_std": ">= 0", "finetune.random_erasing": "[0, 1]",
    "finetune.trainable_blocks": ">= 0",
}


def in_range(value, spec: str) -> bool:
  """Whether `value` satisfies a RANGES spec ('>= 1', '> 0', '[0, 1)', '(0, 1]')."""
  if spec.startswith((">=", ">")):
    bound = float(spec.lstrip(">= "))
    return value >= bound if spec.startswith(">=") else value > bound
  lo, hi = (float(x) for x in spec[1:-1].split(","))
  return (lo <= value if spec[0] == "[" else lo < value) and (value <= hi if spec[-1] == "]" else value < hi)


def validate(config, jobs=("pretrain",)) -> None:
  """Checks the config before any work; raises ConfigError saying what is wrong and how to fix it.

  Every numeric field is checked against its range; the batch sizes against the devices only
  for the `jobs` that will run (a probe's batch does not concern pretraining)."""
  m, d = config.model, config.dataset
  problems = []

  def need(ok, msg):
    if not ok:
      problems.append(msg)

  out_of_range = set()
  for name, spec in RANGES.items():
    value = config_lib.field(config, name)
    if value is None or (name == "model.curriculum_epochs" and m.curriculum_start_ratio is None):
      continue  # unset, or curriculum off
    if not in_range(value, spec):
      out_of_range.add(name)
      need(False, f"{name}={value} must be {'in ' if spec[0] in '[(' else ''}{spec}")
  good = lambda *names: not out_of_range.intersection(names)  # the checks below divide by these

  sizes = good("dataset.image_size", "model.patch_size", "model.mask_ratio")
  if sizes:
    need(d.image_size % m.patch_size == 0,
         f"dataset.image_size={d.image_size} is not divisible by model.patch_size={m.patch_size}; "
         "pick sizes where image_size % patch_size == 0")
    num_patches = math.prod(masking.patch_grid(d.image_size, m.patch_size))
    need(masking.num_kept(num_patches, m.mask_ratio) >= 1,
         f"model.mask_ratio={m.mask_ratio} keeps no patch of {num_patches}; lower it")
  for part in ("encoder", "decoder"):
    width, heads = m[f"{part}_width"], m[f"{part}_heads"]
    if good(f"model.{part}_width", f"model.{part}_heads"):
      need(width % heads == 0, f"model.{part}_width={width} is not divisible by model.{part}_heads={heads}")
      need(width % 4 == 0, f"model.{part}_width={width} must be divisible by 4 (2D sin-cos position embedding)")
  need(not (d.labels_per_class > 0 and d.label_fraction < 1.0),
       f"dataset.labels_per_class={d.labels_per_class} and dataset.label_fraction={d.label_fraction} "
       "both choose the label subset; set one (the other at 0 / 1.0)")
  need(m.mask_sampling in masking.STRATEGIES,
       f"model.mask_sampling={m.mask_sampling!r} must be one of {', '.join(masking.STRATEGIES)}")
  if m.mask_sampling == "grid" and sizes:
    grid_side = masking.patch_grid(d.image_size, m.patch_size)[0]
    need(m.mask_ratio == 0.75 and grid_side % 2 == 0,
         f"grid masking keeps 1 patch in every 2x2: it needs mask_ratio=0.75 (got {m.mask_ratio}) and an "
         f"even patch grid (got {grid_side})")
  if m.curriculum_start_ratio is not None:
    need(0.0 <= m.curriculum_start_ratio < 1.0 and m.curriculum_shape in ("linear", "cosine"),
         "curriculum: model.curriculum_start_ratio in [0, 1) (None: off), model.curriculum_shape "
         "'linear' or 'cosine'")
    need(m.mask_sampling == "random", "curriculum masking works with mask_sampling='random'")
  need(m.dtype != "float16", "model.dtype='float16' would train without loss scaling, which "
       "mae_jax does not do: small gradients underflow to zero. Use model.dtype='bfloat16' (same "
       "speed on GPUs since Ampere and on TPUs, float32's range) or 'float32'")
  need(m.dtype in ("float32", "bfloat16", "float16"),
       f"model.dtype={m.dtype!r} must be 'float32' or 'bfloat16'")
  need(m.attention_impl in (None, "xla", "cudnn"),
       f"model.attention_impl={m.attention_impl!r} must be 'xla', 'cudnn' or None (cuDNN where it can train)")
  need(m.remat in ("none", "block", "dots"), f"model.remat={m.remat!r} must be 'none', 'block' or 'dots'")

  if config.get("wandb_project") is not None:
    need(config.wandb_project != "", "wandb_project='' names no project: give one, or leave it unset (no W&B)")
    need(importlib.util.find_spec("wandb") is not None,
         "wandb_project is set but wandb is not installed: pip install -e \".[wandb]\"")

  need(d.name in sources.DATASETS,
       f"unknown dataset.name={d.name!r}; known: {', '.join(sorted(sources.DATASETS))}")
  need(d.source in ("tfds", "folder", "prepared"),
       f"dataset.source={d.source!r} must be 'tfds', 'folder' or 'prepared'")
  if d.name in sources.DATASETS and d.source == "tfds":
    need(sources.DATASETS[d.name].tfds_name is not None,
         f"dataset {d.name!r} is not in tfds; use --config.dataset.source=folder --config.dataset.folder=DIR")
  if d.source in ("folder", "prepared"):
    need(bool(d.folder), f"dataset.source={d.source!r} needs --config.dataset.folder=DIR "
         + ("(DIR/<split>/<class>/*.jpg|png)" if d.source == "folder" else
            "(a folder written by python -m mae_jax.prepare)"))
    if d.folder:
      need(paths.isdir(d.folder), f"dataset.folder={d.folder!r} does not exist")
  for split in ("pretrain_split", "train_split", "eval_split"):
    need(d[split] != "", f"dataset.{split}='' names no split: give a split name or leave it "
         "unset (None: the dataset's default)")
  need(len(d.mean) == 3 and len(d.std) == 3 and min(d.std) > 0,
       f"dataset.mean={tuple(d.mean)} and dataset.std={tuple(d.std)} need 3 values each, std > 0")
  for section in (d, config.probe, config.finetune):
    lo, hi = section.crop_scale
    name = "dataset" if section is d else ("probe" if section is config.probe else "finetune")
    need(0.0 < lo <= hi <= 1.0, f"{name}.crop_scale={(lo, hi)} must satisfy 0 < low <= high <= 1")
    need(section.crop_mode in transforms.CROP_MODES,
         f"{name}.crop_mode={section.crop_mode!r} must be one of {', '.join(transforms.CROP_MODES)}")
  need(d.interpolation in ("bicubic", "bilinear", "nearest"),
       f"dataset.interpolation={d.interpolation!r} must be bicubic, bilinear or nearest")
  need(d.resize_on in device_resample.RESIZE_ON,
       f"dataset.resize_on={d.resize_on!r} must be one of {', '.join(device_resample.RESIZE_ON)}")
  need(d.resize_on != "device" or d.interpolation in device_resample.DEVICE_INTERPOLATIONS,
       f"dataset.resize_on='device' resamples with {' or '.join(device_resample.DEVICE_INTERPOLATIONS)}, not "
       f"{d.interpolation!r}; use --config.dataset.resize_on=host for it")

  need(config.warmup_epochs <= config.num_epochs,
       f"warmup_epochs={config.warmup_epochs} must be within [0, num_epochs={config.num_epochs}]")
  need(config.probe.optimizer in ("lars", "adamw", "sgd"),
       f"probe.optimizer={config.probe.optimizer!r} must be 'lars', 'adamw' or 'sgd'")
  n_dev, n_proc = jax.device_count(), jax.process_count()
  batches = {"pretrain": ("", config), "probe": ("probe.", config.probe), "finetune": ("finetune.", config.finetune)}
  for job in jobs:
    if job not in batches or not good(*(batches[job][0] + k for k in ("batch_size", "grad_accum_steps"))):
      continue
    prefix, sec = batches[job]
    need(sec.warmup_epochs <= sec.num_epochs,
         f"{prefix}warmup_epochs={sec.warmup_epochs} must be within [0, {prefix}num_epochs={sec.num_epochs}]")
    accum = 1 if job == "probe" else sec.grad_accum_steps  # a probe does not accumulate
    if sec.batch_size % accum:
      need(False, f"{prefix}batch_size={sec.batch_size} is not divisible by {prefix}grad_accum_steps={accum}")
      continue
    micro = sec.batch_size // accum
    what = "global micro-batch" if accum > 1 or job == "pretrain" else "batch"
    need(micro % n_dev == 0,
         f"{job}: the {what} {micro} ({prefix}batch_size" + (f" / {prefix}grad_accum_steps" if job != "probe" else "")
         + f") is not divisible by the {n_dev} devices; change {prefix}batch_size so that it is")
    need(micro % n_proc == 0, f"{job}: the {what} {micro} is not divisible by {n_proc} processes")
  ft = config.finetune
  need(ft.trainable_blocks is None or ft.trainable_blocks <= m.encoder_depth,
       f"finetune.trainable_blocks={ft.trainable_blocks} exceeds the encoder's {m.encoder_depth} blocks")
  if problems:
    raise ConfigError("invalid config: " + problems[0] if len(problems) == 1 else
                      "invalid config:\n  - " + "\n  - ".join(problems))
