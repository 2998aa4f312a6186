"""The Masked Autoencoder: patchify, masking, ViT encoder, lightweight decoder, loss.

Follows facebookresearch/mae `models_mae.py` numerically (docs/numerics.md has the details and
how they are checked):
  * patches flattened in (p, p, C) order, row-major over the patch grid;
  * fixed 2D sin-cos position embeddings, zeros for the cls token;
  * masking by the ranks (argsort) of uniform noise, cls token prepended after masking;
  * pre-norm blocks, LayerNorm eps 1e-6, exact (erf) GELU, qkv with bias;
  * xavier-uniform Linear layers with zero biases, except the patch projection's bias, which keeps
    PyTorch's conv default; normal(0.02) cls and mask tokens;
  * loss on masked patches only, optional per-patch normalised target
    with the unbiased variance.

Parameters are float32; `dtype` sets the compute dtype (bfloat16 on accelerators).
The loss is always computed in float32.
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mae_jax.models import extra_losses, masking
from mae_jax.models.attention_backends import attention_from_config
from mae_jax.models.layer_stack import block_stack
from mae_jax.models.layers import LN_EPS, conv_default_bias, dense, layer_norm, normal_02


# ----------------------------------------------------------------------------
# Patches and position embeddings (plain functions: no parameters).
# ----------------------------------------------------------------------------
def patchify(imgs: jax.Array, p: int) -> jax.Array:
  """(B, H, W, C) -> (B, L, p*p*C), each patch flattened in (p, p, C) order."""
  b, h, w, c = imgs.shape
  gh, gw = h // p, w // p
  x = imgs.reshape(b, gh, p, gw, p, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)  # (B, gh, gw, p, p, C)
  return x.reshape(b, gh * gw, p * p * c)


def unpatchify(x: jax.Array, p: int, grid: tuple[int, int], channels: int = 3) -> jax.Array:
  """(B, L, p*p*C) -> (B, H, W, C); the inverse of `patchify`."""
  b = x.shape[0]
  gh, gw = grid
  x = x.reshape(b, gh, gw, p, p, channels)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, gh * p, gw * p, channels)


def sincos_1d(embed_dim: int, pos: np.ndarray) -> np.ndarray:
  """(M,) positions -> (M, embed_dim): [sin(pos * w_k), cos(pos * w_k)], w_k = 10000^(-2k/D)."""
  omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
  omega = 1.0 / 10000**omega
  out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(embed_dim: int, grid: tuple[int, int], cls_token: bool = False) -> np.ndarray:
  """Fixed 2D sin-cos position embedding, (gh*gw [+1], embed_dim), float32.

  As in the official code, the first half of the channels encodes the column
  (w) index and the second half the row (h) index; the cls row is zeros.
  """
  if embed_dim % 4:
    raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {embed_dim}")
  gh, gw = grid
  cols, rows = np.meshgrid(np.arange(gw, dtype=np.float64), np.arange(gh, dtype=np.float64))
  emb = np.concatenate([sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], axis=1)
  if cls_token:
    emb = np.concatenate([np.zeros((1, embed_dim)), emb], axis=0)
  return emb.astype(np.float32)


def noise_ranks(noise: jax.Array) -> jax.Array:
  """(B, L) -> each patch's position when its row is sorted ascending, ties by index: the
  official `argsort(argsort(noise))`, counted by comparisons (B x L x L) instead of two sorts,
  which XLA runs slowly on CPU and TPU."""
  length = noise.shape[1]
  idx = jnp.arange(length)
  before = (noise[:, :, None] < noise[:, None, :]) | (
      (noise[:, :, None] == noise[:, None, :]) & (idx[:, None] < idx[None, :]))
  return before.sum(axis=1, dtype=jnp.int32)


def random_masking(x: jax.Array, noise: jax.Array, mask_ratio: float):
  """Keeps the `int(L * (1 - mask_ratio))` patches with the smallest noise.

  Returns (x_kept (B, len_keep, D) in ascending noise order, mask (B, L) with 1 on removed
  patches, ids_restore (B, L) such that gathering the [kept, removed] order with it gives back
  the original order). Static-shaped: len_keep is a Python int.
  """
  length = x.shape[1]
  len_keep = masking.num_kept(length, mask_ratio)  # int(L * (1 - mask_ratio))
  ids_restore = noise_ranks(noise)  # = argsort(ids_shuffle), ids_shuffle = argsort(noise)
  # ids_keep[:, r] = the patch of rank r, for the len_keep smallest ranks.
  is_rank = ids_restore[:, None, :] == jnp.arange(len_keep)[None, :, None]  # (B, len_keep, L)
  ids_keep = jnp.sum(jnp.where(is_rank, jnp.arange(length), 0), axis=-1)
  x_kept = jnp.take_along_axis(x, ids_keep[:, :, None], axis=1)
  mask = (ids_restore >= len_keep).astype(jnp.float32)
  return x_kept, mask, ids_restore


class Encoder(nn.Module):
  """ViT encoder. With `noise`, only the visible patches go through the blocks."""
  patch_size: int
  grid: tuple[int, int]
  width: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  drop_path: float = 0.0
  dtype: Any = jnp.float32
  attention_impl: Optional[str] = None
  learned_pos_embed: bool = False  # fine-tuning learns it (from the sin-cos values), as timm's ViT
  final_norm: bool = True          # off when a classifier pools patch tokens into its own fc_norm
  remat: str = "none"              # 'none', 'block' or 'dots' (see REMAT_POLICIES)
  scan: bool = False               # the blocks as one nn.scan (see block_stack)
  ln_eps: float = LN_EPS

  @nn.compact
  def __call__(self, imgs, noise=None, mask_ratio: float = 0.0, deterministic: bool = True):
    """Returns (tokens (B, 1 + len_keep, D), after the final norm if any; mask; ids_restore)."""
    x = patchify(imgs, self.patch_size).astype(self.dtype)
    # The patch projection is a Linear on flattened patches (= the official conv: xavier on its
    # flattened weight, the conv's default bias).
    x = dense(self.width, self.dtype, "patch_embed", conv_default_bias(x.shape[-1]))(x)
    # (1, 1 + L, D): the cls row is zeros. Fine-tuning learns all of it, the cls row a parameter
    # of its own beside the cls token (timm's ViT, which the official fine-tuning uses).
    pos = sincos_2d(self.width, self.grid, cls_token=True)[None]
    if self.learned_pos_embed:
      pos = self.param("pos_embed", lambda *_: jnp.asarray(pos), pos.shape)
    x, mask, ids_restore = self.position_and_mask(x, pos[:, 1:].astype(self.dtype), noise, mask_ratio)
    cls = self.param("cls_token", normal_02, (1, 1, self.width), jnp.float32)
    if self.learned_pos_embed:  # the fixed cls row is zeros: the token goes in as it is
      cls = cls + pos[:, :1]
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (x.shape[0], 1, self.width)), x], 1)
    rates = np.linspace(0, self.drop_path, self.depth)  # stochastic depth decay rule
    x = block_stack(x, self.depth, rates, num_heads=self.num_heads, mlp_ratio=self.mlp_ratio,
                    dtype=self.dtype, attention_impl=self.attention_impl, remat=self.remat,
                    scan=self.scan, deterministic=deterministic, ln_eps=self.ln_eps)
    if self.final_norm:
      x = layer_norm(self.dtype, "norm", self.ln_eps)(x)
    return x, mask, ids_restore

  def position_and_mask(self, x, pos, noise, mask_ratio: float):
    """Patch tokens (B, L, D) + their position embedding, then (with `noise`) the visible ones
    kept: (tokens, mask, ids_restore), mask and ids_restore None without noise."""
    x = x + pos
    if noise is None:
      return x, None, None
    return random_masking(x, noise, mask_ratio)


class MaskTokenEncoder(Encoder):
  """The mask-token ablation (the paper's, and the CIFAR-10 ViT-T/2 study's; SimMIM-like): the
  encoder sees every position, removed patches replaced by a learned mask token. Its tokens are
  in patch order, so ids_restore is None and the decoder inserts nothing."""

  def position_and_mask(self, x, pos, noise, mask_ratio: float):
    if noise is None:
      return x + pos, None, None
    _, mask, _ = random_masking(x, noise, mask_ratio)
    token = self.param("mask_token", normal_02, (1, 1, self.width), jnp.float32).astype(self.dtype)
    return jnp.where(mask[:, :, None] > 0, token, x) + pos, mask, None


class Decoder(nn.Module):
  """Lightweight decoder: embed, insert mask tokens, unshuffle, blocks, predict pixels."""
  patch_size: int
  grid: tuple[int, int]
  width: int
  depth: int
  num_heads: int
  channels: int = 3
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32
  attention_impl: Optional[str] = None
  remat: str = "none"
  scan: bool = False
  ln_eps: float = LN_EPS

  @nn.compact
  def __call__(self, latent, ids_restore):
    """latent (B, 1 + len_keep, D_enc) -> predicted patches (B, L, p*p*C). With ids_restore None
    the latent already holds every position in order (mask tokens in the encoder)."""
    x = dense(self.width, self.dtype, "embed")(latent)
    if ids_restore is not None:
      b, length = ids_restore.shape
      mask_token = self.param("mask_token", normal_02, (1, 1, self.width), jnp.float32)
      fill = jnp.broadcast_to(mask_token.astype(self.dtype), (b, length + 1 - x.shape[1], self.width))
      x_ = jnp.concatenate([x[:, 1:], fill], axis=1)  # [kept, removed] order, no cls
      x_ = jnp.take_along_axis(x_, ids_restore[:, :, None], axis=1)  # back to patch order
      x = jnp.concatenate([x[:, :1], x_], axis=1)
    x = x + sincos_2d(self.width, self.grid, cls_token=True).astype(self.dtype)[None]
    x = block_stack(x, self.depth, np.zeros(self.depth), num_heads=self.num_heads,
                    mlp_ratio=self.mlp_ratio, dtype=self.dtype, attention_impl=self.attention_impl,
                    remat=self.remat, scan=self.scan, ln_eps=self.ln_eps)
    x = layer_norm(self.dtype, "norm", self.ln_eps)(x)
    x = dense(self.patch_size**2 * self.channels, self.dtype, "pred")(x)
    return x[:, 1:]  # drop the cls position


def mae_loss(target_patches, pred, mask, norm_pix_loss: bool):
  """Mean squared error per patch, averaged over the masked (removed) patches only."""
  target = target_patches.astype(jnp.float32)
  pred = pred.astype(jnp.float32)
  if norm_pix_loss:
    target = normalize_patches(target)
  per_patch = jnp.mean((pred - target) ** 2, axis=-1)
  return jnp.sum(per_patch * mask) / jnp.sum(mask)


def normalize_patches(patches, eps: float = 1e-6):
  """Per-patch (t - mean) / sqrt(var + eps), with the unbiased variance (torch's .var default)."""
  mean = patches.mean(axis=-1, keepdims=True)
  var = patches.var(axis=-1, keepdims=True, ddof=1)
  return (patches - mean) / jnp.sqrt(var + eps)


def unnormalize_patches(pred, target_patches, eps: float = 1e-6):
  """The inverse of `normalize_patches` with the target patches' own statistics: maps a
  norm_pix_loss prediction back to the (dataset-normalised) pixel space, for display and metrics."""
  mean = target_patches.mean(axis=-1, keepdims=True)
  var = target_patches.var(axis=-1, keepdims=True, ddof=1)
  return pred * jnp.sqrt(var + eps) + mean


class MAE(nn.Module):
  """Masked autoencoder with a ViT encoder (`encoder`) and a lightweight decoder (`decoder`)."""
  image_size: tuple[int, int]
  patch_size: int
  encoder_width: int
  encoder_depth: int
  encoder_heads: int
  decoder_width: int
  decoder_depth: int
  decoder_heads: int
  mlp_ratio: float = 4.0
  mask_ratio: float = 0.75
  norm_pix_loss: bool = False
  channels: int = 3
  dtype: Any = jnp.float32
  attention_impl: Optional[str] = None
  encoder_type: type = Encoder         # MaskTokenEncoder: the mask-token ablation
  extra_losses: tuple = ()             # plug-ins added to the MSE (models/extra_losses.py)
  remat: str = "none"                  # rematerialised blocks: 'none', 'block' or 'dots'
  scan_layers: bool = False            # encoder and decoder blocks as one nn.scan each
  ln_eps: float = LN_EPS               # LayerNorm epsilon (weights converted from Hugging Face: 1e-12)

  @property
  def grid(self) -> tuple[int, int]:
    return masking.patch_grid(self.image_size, self.patch_size)

  @property
  def num_patches(self) -> int:
    return self.grid[0] * self.grid[1]

  def setup(self):
    self.encoder = self.encoder_type(
        self.patch_size, self.grid, self.encoder_width, self.encoder_depth, self.encoder_heads,
        self.mlp_ratio, 0.0, self.dtype, self.attention_impl, remat=self.remat,
        scan=self.scan_layers, ln_eps=self.ln_eps)
    self.decoder = Decoder(self.patch_size, self.grid, self.decoder_width, self.decoder_depth,
                           self.decoder_heads, self.channels, self.mlp_ratio, self.dtype,
                           self.attention_impl, self.remat, self.scan_layers, self.ln_eps)

  def __call__(self, imgs, noise):
    """imgs (B, H, W, C) normalised; noise (B, L) uniform. Returns (loss, pred, mask).

    The loss is the masked MSE plus each of `extra_losses` times its weight; every term is also
    sown into the 'losses' collection for logging.
    """
    latent, mask, ids_restore = self.encoder(imgs, noise, self.mask_ratio)
    pred = self.decoder(latent, ids_restore).astype(jnp.float32)
    target = patchify(imgs, self.patch_size)
    loss = mae_loss(target, pred, mask, self.norm_pix_loss)
    self.sow("losses", "mse", loss)
    if self.extra_losses:
      target = target.astype(jnp.float32)
      inputs = extra_losses.LossInputs(
          target=normalize_patches(target) if self.norm_pix_loss else target, pred=pred, mask=mask,
          latent=latent, all_positions=ids_restore is None,
          to_images=lambda x: unpatchify(x, self.patch_size, self.grid, self.channels))
      for extra in self.extra_losses:
        value = extra(inputs)
        self.sow("losses", extra.name, value)
        loss = loss + extra.weight * value
    return loss, pred, mask


def compute_settings(model_cfg, image_size: int, decoder: bool = True) -> dict:
  """How every model built from a `config.model` computes: dtype, attention backend (for the
  encoder's heads, and the decoder's with `decoder`, at `image_size`), LayerNorm epsilon, remat."""
  return dict(dtype=jnp.dtype(model_cfg.dtype), ln_eps=model_cfg.layer_norm_eps, remat=model_cfg.remat,
              attention_impl=attention_from_config(model_cfg, image_size, decoder))


def encoder_from_config(model_cfg, image_size: int, **changes) -> Encoder:
  """The MAE's encoder alone (kNN features, the classifier's backbone), with `changes`."""
  m, grid = model_cfg, masking.patch_grid(image_size, model_cfg.patch_size)
  return Encoder(m.patch_size, grid, m.encoder_width, m.encoder_depth, m.encoder_heads,
                 m.mlp_ratio, **{**compute_settings(m, image_size, decoder=False), **changes})


def mae_from_config(model_cfg, image_size: int, scan_layers: Optional[bool] = None) -> MAE:
  """Builds the MAE module from a `config.model` ConfigDict (`scan_layers` overrides the
  config's layer layout)."""
  m = model_cfg
  return MAE(image_size=(image_size, image_size), patch_size=m.patch_size,
             encoder_width=m.encoder_width, encoder_depth=m.encoder_depth,
             encoder_heads=m.encoder_heads, decoder_width=m.decoder_width,
             decoder_depth=m.decoder_depth, decoder_heads=m.decoder_heads, mlp_ratio=m.mlp_ratio,
             mask_ratio=m.mask_ratio, norm_pix_loss=m.norm_pix_loss,
             encoder_type=MaskTokenEncoder if m.mask_token_in_encoder else Encoder,
             extra_losses=extra_losses.from_config(m),
             scan_layers=m.scan_layers if scan_layers is None else scan_layers, **compute_settings(m, image_size))
