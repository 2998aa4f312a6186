"""The official linear probe and fine-tuning (facebookresearch/mae `main_linprobe.py`,
`main_finetune.py`, `engine_finetune.py`), written out in PyTorch as references to measure
`mae_jax.probe` and `mae_jax.finetune` against, at any image size and model shape.

What each piece is, by the official file it follows:
  * `official_vit`: `models_vit.VisionTransformer` is timm's ViT with qkv bias, LayerNorm eps 1e-6,
    a learned position embedding with a cls row, and either the cls token after the final norm
    (`global_pool=False`) or the mean patch token through `fc_norm` with no final norm
    (`global_pool=True`); timm's `VisionTransformer(global_pool='token' | 'avg')` is exactly that,
    with the official parameter names (so the official checkpoint layout loads into it);
  * `LARS`: util/lars.py (MoCo v3): decay and trust ratio on parameters of 2+ dimensions, the
    momentum buffer of the unscaled steps, times the current lr;
  * `param_groups_lrd`: util/lr_decay.py (BEiT's layer ids; no decay on 1-D tensors and
    `no_weight_decay()`, i.e. pos_embed and cls_token);
  * `lr_at`: util/lr_sched.adjust_learning_rate, per iteration, times each group's `lr_scale`;
  * `probe_train_transform`: util/crop.RandomResizedCrop (one draw, clamped), bicubic, flip;
  * `finetune_train_transform`: timm's `create_transform` with the official arguments
    (RandAugment 'rand-m9-mstd0.5-inc1', bicubic, RandomErasing pixel mode, count 1);
  * `eval_transform`: util/datasets.build_transform: Resize(int(size / (224 / 256))) bicubic,
    CenterCrop(size);
  * the losses: timm's Mixup (mixup 0.8 / cutmix 1.0, label smoothing inside) with
    SoftTargetCrossEntropy, else LabelSmoothingCrossEntropy, else plain cross-entropy.

Used by benchmarks/eval_vs_official.py and tests/integration/test_official_eval.py. torch and timm come with
the dev extra.
"""

import functools
import math
import random

import numpy as np
import torch
from torch import nn
from benchmarks import official_mae
from benchmarks import torch_cpu

timm_vit = torch_cpu.tolerant_import("timm.models.vision_transformer")
timm_data = torch_cpu.tolerant_import("timm.data")
timm_loss = torch_cpu.tolerant_import("timm.loss")
timm_layers = torch_cpu.tolerant_import("timm.layers")
transforms = torch_cpu.tolerant_import("torchvision.transforms")

JOBS = ("probe", "finetune")


def _posterize_zero_bits_black(posterize):
  """timm's PosterizeIncreasing keeps 4 - int(m / 10 * 4) bits: none at magnitude 10, which
  'mstd0.5' reaches on about 2% of draws. Pillow made all-black of 0 bits until Pillow 10 and
  raises since ('bits must be between or equal to 1 and 8'), which stops the official loader;
  the reference keeps the older result (mae_jax's op gives black too)."""
  from PIL import Image

  def safe(img, bits_to_keep, **kwargs):
    if bits_to_keep <= 0:
      return Image.new(img.mode, img.size)
    return posterize(img, bits_to_keep, **kwargs)
  return safe


for _name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
  timm_data.auto_augment.NAME_TO_OP[_name] = _posterize_zero_bits_black(
      timm_data.auto_augment.NAME_TO_OP[_name])


def official_vit(image_size: int, patch: int, width: int, depth: int, heads: int, num_classes: int,
                 global_pool: bool, drop_path: float = 0.0) -> nn.Module:
  """models_vit.VisionTransformer of this shape (see the module docstring)."""
  return timm_vit.VisionTransformer(
      img_size=image_size, patch_size=patch, embed_dim=width, depth=depth, num_heads=heads,
      mlp_ratio=4.0, qkv_bias=True, num_classes=num_classes, drop_path_rate=drop_path,
      global_pool="avg" if global_pool else "token",
      norm_layer=functools.partial(nn.LayerNorm, eps=1e-6))


def load_encoder(model: nn.Module, state_dict: dict, job: str) -> nn.Module:
  """As both official scripts: the checkpoint's encoder into the model (strict=False; the
  decoder and, under fc_norm, the final norm are left out), the head trunc-normal (std 0.01 for
  the probe, 2e-5 for fine-tuning, bias zero); the probe then puts BatchNorm1d(affine=False,
  eps 1e-6) before the head and freezes everything else."""
  sd = {k: v for k, v in state_dict.items() if k not in ("head.weight", "head.bias")}
  missing, _ = model.load_state_dict(sd, strict=False)
  expected = {"head.weight", "head.bias"} | ({"fc_norm.weight", "fc_norm.bias"}
                                             if isinstance(model.fc_norm, nn.LayerNorm) else set())
  assert set(missing) == expected, missing
  with torch.no_grad():
    timm_layers.trunc_normal_(model.head.weight, std=0.01 if job == "probe" else 2e-5)
    nn.init.zeros_(model.head.bias)
  if job == "probe":
    model.head = nn.Sequential(nn.BatchNorm1d(model.head.in_features, affine=False, eps=1e-6), model.head)
    for p in model.parameters():
      p.requires_grad = False
    for p in model.head.parameters():
      p.requires_grad = True
  return model


class LARS(torch.optim.Optimizer):
  """util/lars.py: for a parameter of 2+ dimensions, g + wd * p scaled by
  trust_coefficient * |p| / |g + wd * p| (1 where a norm is 0); mu = momentum * mu + that;
  p -= lr * mu. Biases and norms take the plain gradient into the momentum."""

  def __init__(self, params, lr=0.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001):
    super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                  trust_coefficient=trust_coefficient))

  @torch.no_grad()
  def step(self):
    for group in self.param_groups:
      for p in group["params"]:
        if p.grad is None:
          continue
        step = p.grad
        if p.ndim > 1:
          step = step.add(p, alpha=group["weight_decay"])
          p_norm, s_norm = torch.norm(p), torch.norm(step)
          ratio = group["trust_coefficient"] * p_norm / s_norm
          step = step * torch.where((p_norm > 0) & (s_norm > 0), ratio, torch.ones_like(ratio))
        mu = self.state[p].setdefault("mu", torch.zeros_like(p))
        mu.mul_(group["momentum"]).add_(step)
        p.add_(mu, alpha=-group["lr"])


def layer_id(name: str, depth: int) -> int:
  """util/lr_decay.get_layer_id_for_vit: embeddings 0, blocks.i -> i + 1, the rest depth + 1."""
  if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
    return 0
  if name.startswith("blocks."):
    return int(name.split(".")[1]) + 1
  return depth + 1


def param_groups_lrd(model: nn.Module, weight_decay: float, layer_decay: float) -> list:
  """util/lr_decay.param_groups_lrd: one group per (layer id, decay or not), lr_scale
  layer_decay ** (depth + 1 - layer id); no decay on 1-D tensors and model.no_weight_decay()."""
  depth, skip = len(model.blocks), model.no_weight_decay()
  groups = {}
  for name, p in model.named_parameters():
    if not p.requires_grad:
      continue
    decay = not (p.ndim == 1 or name in skip)
    lid = layer_id(name, depth)
    group = groups.setdefault((lid, decay), {"lr_scale": layer_decay ** (depth + 1 - lid),
                                             "weight_decay": weight_decay if decay else 0.0,
                                             "params": [], "names": []})
    group["params"].append(p)
    group["names"].append(name)
  return list(groups.values())


def lr_at(progress_epochs: float, r: dict) -> float:
  """util/lr_sched.adjust_learning_rate's lr at a fractional epoch (before lr_scale)."""
  lr = r["base_lr"] * r["batch"] / 256
  return official_mae.lr_at(progress_epochs, lr, r["min_lr"], r["warmup_epochs"], r["epochs"])


def set_lr(optimizer, lr: float) -> None:
  for group in optimizer.param_groups:
    group["lr"] = lr * group.get("lr_scale", 1.0)


def make_optimizer(model: nn.Module, job: str, r: dict):
  if job == "probe":
    return LARS(model.head.parameters(), weight_decay=r["weight_decay"])
  groups = param_groups_lrd(model, r["weight_decay"], r["layer_decay"])
  return torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups], lr=0.0)


def criterion(job: str, r: dict):
  """(mixup_fn or None, loss) as main_finetune.py picks them; the probe: cross-entropy."""
  if job == "probe":
    return None, nn.CrossEntropyLoss()
  if r["mixup"] > 0 or r["cutmix"] > 0:
    mix = timm_data.Mixup(mixup_alpha=r["mixup"], cutmix_alpha=r["cutmix"], prob=1.0, switch_prob=0.5,
                          mode="batch", label_smoothing=r["label_smoothing"], num_classes=r["num_classes"])
    return mix, timm_loss.SoftTargetCrossEntropy()
  if r["label_smoothing"] > 0:
    return None, timm_loss.LabelSmoothingCrossEntropy(smoothing=r["label_smoothing"])
  return None, nn.CrossEntropyLoss()


# ----------------------------------------------------------------------------
# Transforms.
# ----------------------------------------------------------------------------
class ClampedRandomResizedCrop(transforms.RandomResizedCrop):
  """util/crop.RandomResizedCrop: one draw of area and log-aspect, the box's sides clamped to
  the image, its corner uniform (no retries, no central fallback)."""

  @staticmethod
  def get_params(img, scale, ratio):
    width, height = img.size
    area = height * width
    target_area = area * torch.empty(1).uniform_(scale[0], scale[1]).item()
    log_ratio = torch.log(torch.tensor(ratio))
    aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
    w = min(int(round(math.sqrt(target_area * aspect))), width)
    h = min(int(round(math.sqrt(target_area / aspect))), height)
    i = torch.randint(0, height - h + 1, size=(1,)).item()
    j = torch.randint(0, width - w + 1, size=(1,)).item()
    return i, j, h, w


def probe_train_transform(size: int, mean, std):
  return transforms.Compose([ClampedRandomResizedCrop(size, interpolation=3),
                             transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                             transforms.Normalize(mean, std)])


def finetune_train_transform(size: int, mean, std, r: dict):
  return timm_data.create_transform(
      input_size=size, is_training=True, color_jitter=None, auto_augment=r["randaug"],
      interpolation="bicubic", re_prob=r["random_erasing"], re_mode="pixel", re_count=1,
      mean=mean, std=std)


def eval_transform(size: int, mean, std):
  crop_pct = 224 / 256 if size <= 224 else 1.0
  return transforms.Compose([transforms.Resize(int(size / crop_pct), interpolation=3),
                             transforms.CenterCrop(size), transforms.ToTensor(),
                             transforms.Normalize(mean, std)])


# ----------------------------------------------------------------------------
# The loop (engine_finetune.train_one_epoch and evaluate).
# ----------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
  torch.manual_seed(seed)
  np.random.seed(seed)  # timm's Mixup and RandAugment's op choice
  random.seed(seed)     # RandAugment's magnitudes and signs, RandomErasing


def train_step(model, optimizer, mixup_fn, loss_fn, images, labels) -> float:
  """One iteration: mixup, forward, loss, backward, step (the lr already set)."""
  if mixup_fn is not None:
    images, labels = mixup_fn(images, labels)
  loss = loss_fn(model(images), labels)
  optimizer.zero_grad()
  loss.backward()
  optimizer.step()
  return loss.item()


@torch.no_grad()
def top1(model, loader) -> tuple[float, int]:
  """Top-1 (%) over every example of `loader`, the model in eval mode."""
  model.eval()
  hits = count = 0
  for images, labels in loader:
    hits += (model(images).argmax(-1) == labels).sum().item()
    count += len(labels)
  return 100.0 * hits / count, count
