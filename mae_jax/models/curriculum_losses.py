"""The extra losses of curriculum masking with Laplacian and uniformity losses (STL-10): a
masked high-frequency (Laplacian) L1 between prediction and target, and the uniformity of the
encoder's pooled features; and the depthwise filtering they share with evaluation's SSIM.
"""

import jax
import jax.numpy as jnp
import numpy as np

LAPLACIAN = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], np.float32)


def depthwise_filter(x, kernel, pad: bool = False):
  """Each channel of (N, H, W, C) filtered with a (k, k) kernel: 'valid' positions only, or with
  `pad` zero padding that keeps the size (odd k). float32 products at full precision: these are
  pixel metrics, not activations."""
  c, k = x.shape[-1], np.asarray(kernel).shape[0]
  if pad:
    x = jnp.pad(x, ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)))
  weights = jnp.tile(jnp.asarray(kernel, x.dtype)[:, :, None, None], (1, 1, 1, c))
  return jax.lax.conv_general_dilated(x, weights, (1, 1), "VALID", feature_group_count=c,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      precision=jax.lax.Precision.HIGHEST)


def laplacian(images):
  """Per-channel Laplacian of (B, H, W, C) images, zero padding, same size."""
  return depthwise_filter(images, LAPLACIAN, pad=True)


def masked_laplacian_loss(pred_images, target_images, mask_images):
  """The frequency loss of curriculum masking with Laplacian and uniformity losses (STL-10): mean |Lap(pred) - Lap(target)| over the masked pixels (x channels)."""
  err = jnp.abs(laplacian(pred_images) - laplacian(target_images)) * mask_images
  return err.sum() / jnp.maximum(mask_images.sum(), 1.0)


def uniformity_loss(features, t: float = 2.0):
  """Wang & Isola's uniformity of (B, D) features, L2-normalised here: log mean over pairs i < j
  of exp(-t ||z_i - z_j||^2)."""
  z = features.astype(jnp.float32)
  z = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
  sq = jnp.maximum(2.0 - 2.0 * z @ z.T, 0.0)  # squared distances of unit vectors
  b = z.shape[0]
  pairs = jnp.triu(jnp.ones((b, b), bool), k=1)
  return jnp.log(jnp.sum(jnp.where(pairs, jnp.exp(-t * sq), 0.0)) / (b * (b - 1) / 2))



def visible_mean(tokens, mask, all_positions: bool):
  """(B, D): the mean of the encoder's patch tokens (B, n, D) over the visible patches. With
  `all_positions` (the mask-token ablation) the tokens are every position and `mask` picks the
  visible ones; otherwise they are the visible ones already."""
  if not all_positions:
    return tokens.mean(axis=1)
  keep = (1.0 - mask)[:, :, None]
  return (tokens * keep).sum(axis=1) / keep.sum(axis=1)
