"""A ViT classifier on the MAE encoder, and restoring a pretrained encoder into it.

Heads, as the official code:
  * fine-tuning: global average pool of the patch tokens + fc_norm (default) or the cls token
    after the final norm, then a linear head (trunc-normal std 2e-5);
  * linear probe: cls token (default) or pooled features, frozen, then BatchNorm without affine
    (eps 1e-6) and a linear head (trunc-normal std 0.01).
The encoder's parameter tree is the pretraining one (`params['encoder']`), so pretrained weights
drop straight in; the fine-tuned position embedding is learned, starting from the pretrained
sin-cos values (bicubic-interpolated when the image size changes).
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mae_jax.errors import CheckpointMismatchError
from mae_jax.models import masking
from mae_jax.models.layers import LN_EPS, layer_norm
from mae_jax.models.mae import Encoder, compute_settings, sincos_2d


class HeadBatchNorm(nn.Module):
  """PyTorch's BatchNorm1d(affine=False) in front of the probe's head: in training, features
  normalised by the batch mean and biased variance, the running statistics updated with
  momentum 0.1 from the batch mean and the *unbiased* variance (Flax's BatchNorm keeps the biased
  one); in evaluation, the running statistics."""
  epsilon: float = 1e-6
  momentum: float = 0.1

  @nn.compact
  def __call__(self, x, use_running_average: bool):
    d = x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (d,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (d,), jnp.float32)
    if use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      n = x.shape[0]
      mean = x.mean(axis=0)
      var = jnp.square(x - mean).mean(axis=0)
      if not self.is_initializing():
        m = self.momentum
        ra_mean.value = (1 - m) * ra_mean.value + m * mean
        ra_var.value = (1 - m) * ra_var.value + m * var * (n / max(n - 1, 1))
    return (x - mean) * jax.lax.rsqrt(var + self.epsilon)


class Classifier(nn.Module):
  num_classes: int
  image_size: tuple[int, int]
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  drop_path: float = 0.0
  global_pool: bool = True
  probe: bool = False            # frozen features -> BatchNorm (no affine) -> linear
  learned_pos_embed: bool = True
  dtype: Any = jnp.float32
  attention_impl: Optional[str] = None
  remat: str = "none"
  ln_eps: float = LN_EPS

  @property
  def grid(self):
    return masking.patch_grid(self.image_size, self.patch_size)

  def setup(self):
    self.encoder = Encoder(self.patch_size, self.grid, self.width, self.depth, self.num_heads,
                           self.mlp_ratio, self.drop_path, self.dtype, self.attention_impl,
                           learned_pos_embed=self.learned_pos_embed, final_norm=not self.global_pool,
                           remat="none" if self.probe else self.remat,  # a probe has no encoder gradients
                           ln_eps=self.ln_eps)
    if self.global_pool:
      self.fc_norm = layer_norm(self.dtype, "fc_norm", self.ln_eps)
    if self.probe:
      self.head_norm = HeadBatchNorm()
    std = 0.01 if self.probe else 2e-5
    self.head = nn.Dense(self.num_classes, kernel_init=nn.initializers.truncated_normal(std),
                         param_dtype=jnp.float32)

  def features(self, imgs, train: bool = False):
    """Pooled features (B, D): mean patch token + fc_norm, or the (normed) cls token."""
    tokens, _, _ = self.encoder(imgs, deterministic=not train)
    if self.global_pool:
      return self.fc_norm(tokens[:, 1:].mean(axis=1))
    return tokens[:, 0]

  def __call__(self, imgs, train: bool = False):
    x = self.features(imgs, train)
    if self.probe:
      x = self.head_norm(jax.lax.stop_gradient(x).astype(jnp.float32), use_running_average=not train)
    return self.head(x.astype(jnp.float32))


def classifier_from_config(config, num_classes: int, *, probe: bool, drop_path: float = 0.0,
                           global_pool: bool = True) -> Classifier:
  m = config.model
  size = config.dataset.image_size
  return Classifier(num_classes=num_classes, image_size=(size, size), patch_size=m.patch_size,
                    width=m.encoder_width, depth=m.encoder_depth, num_heads=m.encoder_heads,
                    mlp_ratio=m.mlp_ratio, drop_path=drop_path, global_pool=global_pool,
                    probe=probe, learned_pos_embed=not probe, **compute_settings(m, size, decoder=False))


# ----------------------------------------------------------------------------
# Restoring a pretrained encoder.
# ----------------------------------------------------------------------------
def interpolate_pos_embed(pos: np.ndarray, old_grid, new_grid) -> np.ndarray:
  """(1, 1 + gh*gw, D) -> (1, 1 + nh*nw, D): the cls row kept, the patch rows bicubic over the
  grid (as the official interpolate_pos_embed)."""
  if tuple(old_grid) == tuple(new_grid):
    return pos
  d = pos.shape[-1]
  grid = jnp.asarray(pos[:, 1:]).reshape(old_grid[0], old_grid[1], d)
  out = jax.image.resize(grid, (new_grid[0], new_grid[1], d), "bicubic")
  return np.concatenate([pos[:, :1], np.asarray(out).reshape(1, new_grid[0] * new_grid[1], d)], axis=1)


def merge_pretrained(params: dict, encoder: dict, old_grid, new_grid) -> dict:
  """Puts pretrained encoder weights into classifier `params` (encoder only; heads stay fresh).

  The pretrained model's final norm is dropped when the classifier pools into fc_norm (the
  official behaviour); a learned position embedding starts from the pretrained one.
  """
  new = dict(params["encoder"])
  for k, v in encoder.items():
    # Skipped: the position embedding (below), the final norm under fc_norm, and the encoder's
    # mask token (the mask-token ablation's, used only while pretraining).
    if k in ("pos_embed", "mask_token") or (k == "norm" and "norm" not in new):
      continue
    if jax.tree.map(np.shape, v) != jax.tree.map(np.shape, new[k]):
      raise CheckpointMismatchError(f"pretrained encoder weight {k} has another shape")
    new[k] = v
  if "pos_embed" in new:  # learned, with the cls row (zeros from a pretrained MAE), as timm's ViT
    old = encoder.get("pos_embed", sincos_2d(new["pos_embed"].shape[-1], old_grid, cls_token=True)[None])
    old = np.asarray(old)
    if old.shape[1] == old_grid[0] * old_grid[1]:  # saved before the cls row was a parameter
      old = np.concatenate([np.zeros_like(old[:, :1]), old], axis=1)
    new["pos_embed"] = interpolate_pos_embed(old, old_grid, new_grid)
  return {**params, "encoder": new}


# ----------------------------------------------------------------------------
# Which parameters train, and at what rate.
# ----------------------------------------------------------------------------
def _names(path):
  return [getattr(p, "key", str(p)) for p in path]


def layer_id(path, depth: int) -> int:
  """Official param_groups_lrd: embeddings 0, block i -> i + 1, everything after -> depth + 1."""
  names = _names(path)
  if names[0] == "encoder":
    if names[1] in ("patch_embed", "cls_token", "pos_embed"):
      return 0
    if names[1].startswith("block"):
      return int(names[1][len("block"):]) + 1
  return depth + 1


def layer_decay_scales(params, depth: int, decay: float):
  """Per-parameter lr multipliers decay^(depth + 1 - layer_id)."""
  return jax.tree_util.tree_map_with_path(lambda p, _: decay ** (depth + 1 - layer_id(p, depth)), params)


def trainable_labels(params, depth: int, trainable_blocks: Optional[int], probe: bool = False):
  """'train' or 'freeze' per parameter. A probe trains its head only. Fine-tuning trains all, or
  with trainable_blocks = k only the last k blocks and what follows them (final norm, fc_norm,
  head): the paper's partial fine-tuning."""
  def label(path, _):
    if probe:
      return "train" if _names(path)[0] == "head" else "freeze"
    if trainable_blocks is None:
      return "train"
    return "train" if layer_id(path, depth) > depth - trainable_blocks else "freeze"
  return jax.tree_util.tree_map_with_path(label, params)


def scale_by_tree(scales) -> optax.GradientTransformation:
  """Multiplies each update by its fixed scale (layer-wise lr decay on top of the optimizer)."""
  return optax.stateless(lambda updates, params=None: jax.tree.map(lambda u, s: u * s, updates, scales))
