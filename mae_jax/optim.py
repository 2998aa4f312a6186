"""Optimizer: AdamW (b2 0.95) with linear warmup + half-cycle cosine per step, as the official recipe."""

import jax
import jax.numpy as jnp
import optax

# Parameters never decayed besides biases and norms (official `no_weight_decay`).
NO_DECAY_NAMES = ("cls_token", "mask_token", "pos_embed")


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


def decay_mask(params):
  """True where weight decay applies: matrices, but not biases, norms, tokens, position embeddings."""
  def decays(path, p):
    name = getattr(path[-1], "key", str(path[-1]))
    return p.ndim > 1 and name not in NO_DECAY_NAMES
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(opt_cfg, schedule: optax.Schedule, grad_accum_steps: int = 1):
  """AdamW; with grad_accum_steps > 1, gradients of that many micro-batches are averaged first."""
  tx = optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, weight_decay=opt_cfg.weight_decay,
                   mask=decay_mask)
  if grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=grad_accum_steps)
  return tx
