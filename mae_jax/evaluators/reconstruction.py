"""Reconstruction quality of an MAE on images: masked-patch MSE (loss units and [0, 1] pixels),
PSNR, SSIM (Gaussian 11x11, sigma 1.5), the masked Laplacian error, and LPIPS where weights
are given; summed per batch and summarised over the test split."""


import jax.numpy as jnp
import numpy as np

from mae_jax.data import pipeline
from mae_jax.evaluators import lpips
from mae_jax.models.curriculum_losses import depthwise_filter, laplacian
from mae_jax.models.mae import normalize_patches, patchify, unnormalize_patches, unpatchify


# ----------------------------------------------------------------------------
# Image metrics (pure; per image).
# ----------------------------------------------------------------------------
def gaussian_kernel(size: int = 11, sigma: float = 1.5) -> np.ndarray:
  g = np.exp(-((np.arange(size) - (size - 1) / 2) ** 2) / (2 * sigma**2))
  g /= g.sum()
  return np.outer(g, g).astype(np.float32)


def ssim(a, b, data_range: float = 1.0):
  """Mean SSIM per image of (N, H, W, C) images; the mean over the valid window positions and
  channels (= skimage's structural_similarity(gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=1, channel_axis=-1))."""
  k = gaussian_kernel()
  if min(a.shape[1:3]) < k.shape[0]:  # images smaller than the window: shrink it
    k = gaussian_kernel(min(a.shape[1:3]) // 2 * 2 - 1, 1.5)
  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  mu_a, mu_b = depthwise_filter(a, k), depthwise_filter(b, k)
  var_a = depthwise_filter(a * a, k) - mu_a**2
  var_b = depthwise_filter(b * b, k) - mu_b**2
  cov = depthwise_filter(a * b, k) - mu_a * mu_b
  s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
  return s.mean(axis=(1, 2, 3))


def psnr(a, b, data_range: float = 1.0):
  mse = jnp.mean((a - b) ** 2, axis=(1, 2, 3))
  return 10.0 * jnp.log10(data_range**2 / jnp.maximum(mse, 1e-12))


def reconstruction_sums(model, params, images_uint8, noise, valid, mean, std, lpips_weights: dict):
  """Pure: per-batch sums of every reconstruction metric over the valid images."""
  imgs = pipeline.normalize(images_uint8, mean, std)
  _, pred, mask = model.apply({"params": params}, imgs, noise)
  p, grid, c = model.patch_size, model.grid, imgs.shape[-1]
  target = patchify(imgs, p)
  w_mask = mask * valid[:, None]
  loss_target = normalize_patches(target) if model.norm_pix_loss else target
  sums = {"images": valid.sum(), "masked_patches": w_mask.sum(),
          "mse_norm": (jnp.mean((pred - loss_target) ** 2, -1) * w_mask).sum()}
  if model.norm_pix_loss:  # back to the dataset-normalised space with each patch's statistics
    pred = unnormalize_patches(pred, target)
  pred_px = pipeline.denormalize(unpatchify(pred, p, grid, c), mean, std)
  orig_px = pipeline.denormalize(imgs, mean, std)
  removed = unpatchify(jnp.repeat(mask[:, :, None], target.shape[-1], -1), p, grid, c)
  sums["mse_pixel"] = (jnp.mean((patchify(pred_px, p) - patchify(orig_px, p)) ** 2, -1) * w_mask).sum()
  pasted = orig_px * (1 - removed) + pred_px * removed
  sums["psnr"] = (psnr(pasted, orig_px) * valid).sum()
  sums["ssim"] = (ssim(pasted, orig_px) * valid).sum()
  lap_err = jnp.abs(laplacian(pred_px) - laplacian(orig_px)) * removed
  sums["laplacian_l1"] = (lap_err.sum(axis=(1, 2, 3)) * valid).sum()
  sums["masked_values"] = (removed.sum(axis=(1, 2, 3)) * valid).sum()
  for net, net_weights in lpips_weights.items():
    sums[f"lpips_{net}"] = (lpips.lpips(net_weights, pasted, orig_px, net) * valid).sum()
  return sums


def summarize(sums: dict) -> dict:
  out = {"images": int(sums["images"]),
         "masked_mse_normalized": sums["mse_norm"] / sums["masked_patches"],
         "masked_mse_pixel": sums["mse_pixel"] / sums["masked_patches"],
         "psnr": sums["psnr"] / sums["images"],
         "ssim": sums["ssim"] / sums["images"],
         "masked_laplacian_l1": sums["laplacian_l1"] / sums["masked_values"]}
  for k in sums:
    if k.startswith("lpips_"):
      out[k] = sums[k] / sums["images"]
  return out
