"""Optimizers: the lr schedule (linear warmup + half-cycle cosine per step), AdamW for pretraining
as the official recipe, the official LARS, and the probe's and fine-tuning's optimizers on their
trainable parameters."""

import jax
import jax.numpy as jnp
import optax

from mae_jax import errors
from mae_jax.models import classifier


def peak_lr(base_lr: float, batch_size: int) -> float:
  """The linear scaling rule: lr = base_lr * effective batch / 256."""
  return base_lr * batch_size / 256


def warmup_cosine(peak: float, min_lr: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
  """lr(s) = peak * s / W during warmup, then min + (peak - min) * (1 + cos(pi * t)) / 2."""
  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak * step / max(warmup_steps, 1)
    t = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    cos = min_lr + (peak - min_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * jnp.clip(t, 0.0, 1.0)))
    return jnp.where(step < warmup_steps, warm, cos)
  return schedule


def _leaf_name(path) -> str:
  return getattr(path[-1], "key", str(path[-1]))


def pretrain_decay_mask(params):
  """True where pretraining decays: every parameter of two or more dimensions, the 3-D cls and
  mask tokens included; not biases and norms (official main_pretrain.py, timm's add_weight_decay).
  The position embeddings are fixed, not parameters. Scanned layers (under `blocks`) carry one
  leading layer axis more, which does not count."""
  def decays(path, p):
    stacked = any(getattr(k, "key", None) == "blocks" for k in path)
    return p.ndim - stacked > 1
  return jax.tree_util.tree_map_with_path(decays, params)


# Fine-tuning's exemptions besides biases and norms (official models_vit.no_weight_decay).
FINETUNE_NO_DECAY = ("pos_embed", "cls_token")


def finetune_decay_mask(params):
  """True where fine-tuning and probing decay: matrices, but not biases, norms, the (learned)
  position embedding and the cls token (official param_groups_lrd with no_weight_decay)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, p: p.ndim > 1 and _leaf_name(path) not in FINETUNE_NO_DECAY, params)


def pretraining_optimizer(opt_cfg, schedule: optax.Schedule):
  """AdamW with the pretraining decay mask. (Gradient accumulation happens inside the step.)"""
  return optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, weight_decay=opt_cfg.weight_decay,
                     mask=pretrain_decay_mask)


def lars(learning_rate: optax.ScalarOrSchedule, weight_decay: float = 0.0, momentum: float = 0.9,
         trust_coefficient: float = 0.001, mask=finetune_decay_mask) -> optax.GradientTransformation:
  """LARS as the official linear probe's util/lars.py (from MoCo v3): on the parameters `mask`
  marks (matrices: not biases and norms), weight decay is added to the gradient and the sum
  scaled by the trust ratio trust_coefficient * |p| / |g| (1 where either norm is 0); the
  momentum buffer accumulates these steps before any lr, mu = momentum * mu + g, and the
  parameter moves by -lr(step) * mu. (`optax.lars` scales by the lr first, mu = momentum * mu +
  lr * g: the two differ whenever the lr changes, i.e. all through warmup and cosine.)"""
  return optax.chain(
      optax.add_decayed_weights(weight_decay, mask),
      optax.masked(optax.scale_by_trust_ratio(trust_coefficient=trust_coefficient), mask),
      optax.trace(decay=momentum),
      optax.scale_by_learning_rate(learning_rate))


def classification_optimizer(section, schedule, params, depth: int, probe: bool) -> optax.GradientTransformation:
  """The section's optimizer on the trainable parameters (others frozen): the probe's choice of
  optimizer; for fine-tuning AdamW with layer-wise lr decay and, optionally, only the last blocks."""
  kind = section.optimizer if probe else "adamw"
  if kind == "adamw":
    base = optax.adamw(schedule, b1=section.b1, b2=section.b2, weight_decay=section.weight_decay,
                       mask=finetune_decay_mask)
  elif kind == "lars":  # as the official util/lars.py: no decay or trust ratio on biases and norms
    base = lars(schedule, weight_decay=section.weight_decay, momentum=section.momentum,
                      mask=finetune_decay_mask)
  elif kind == "sgd":
    base = optax.chain(optax.add_decayed_weights(section.weight_decay, finetune_decay_mask),
                       optax.sgd(schedule, momentum=section.momentum))
  else:
    raise errors.ConfigError(f"optimizer={kind!r} must be 'lars', 'adamw' or 'sgd'")
  labels = classifier.trainable_labels(params, depth, None if probe else section.trainable_blocks, probe)
  tx = optax.multi_transform({"train": base, "freeze": optax.set_to_zero()}, labels)
  decay = 1.0 if probe else section.layer_decay
  if decay < 1.0:
    tx = optax.chain(tx, classifier.scale_by_tree(classifier.layer_decay_scales(params, depth, decay)))
  return tx
