"""Reconstruction figures: masked input | reconstruction (visible patches pasted back) | original."""

import io
import os
from typing import Sequence

import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

from mae_jax.data import pipeline
from mae_jax.models.mae import patchify, unnormalize_patches, unpatchify
from mae_jax.runtime import durable, paths


def reconstruction_panels(model, params, images_uint8, noise, mean, std):
  """Pure (jit it). Returns (masked, reconstruction, original), each (B, H, W, C) in [0, 1].

  With norm_pix_loss the decoder predicts per-patch normalised pixels, so the prediction is
  mapped back with each target patch's own mean and (unbiased) std before de-normalising.
  """
  imgs = pipeline.normalize(images_uint8, mean, std)
  _, pred, mask = model.apply({"params": params}, imgs, noise)
  p, grid = model.patch_size, model.grid
  target = patchify(imgs, p)
  if model.norm_pix_loss:
    pred = unnormalize_patches(pred, target)
  pred_img = unpatchify(pred, p, grid, imgs.shape[-1])
  removed = unpatchify(jnp.repeat(mask[:, :, None], target.shape[-1], axis=-1), p, grid, imgs.shape[-1])
  original = pipeline.denormalize(imgs, mean, std)
  masked = original * (1 - removed) + 0.5 * removed  # removed patches shown grey
  pasted = original * (1 - removed) + pipeline.denormalize(pred_img, mean, std) * removed
  return masked, pasted, original


def save_grid(path: str, columns: Sequence[np.ndarray], titles: Sequence[str], min_size: int = 96) -> np.ndarray:
  """One row per image, one column per panel; small images are enlarged (nearest) to `min_size`.
  Returns the grid as an (H, W, 3) uint8 array (for TensorBoard's image tab)."""
  cols = [np.asarray(c) for c in columns]
  n, h, w = cols[0].shape[:3]
  scale = max(1, -(-min_size // h))
  ch, cw, pad, header = h * scale, w * scale, 4, 14
  canvas = Image.new("RGB", (len(cols) * (cw + pad) + pad, header + n * (ch + pad) + pad), "white")
  draw = ImageDraw.Draw(canvas)
  for j, title in enumerate(titles):
    draw.text((pad + j * (cw + pad), 1), title, fill="black")
  for j, col in enumerate(cols):
    for i in range(n):
      tile = Image.fromarray((np.clip(np.nan_to_num(col[i]), 0, 1) * 255).round().astype(np.uint8))
      tile = tile.resize((cw, ch), Image.NEAREST)
      canvas.paste(tile, (pad + j * (cw + pad), header + pad + i * (ch + pad)))
  paths.makedirs(os.path.dirname(path) or ".")
  png = io.BytesIO()
  canvas.save(png, format="PNG")
  durable.write_bytes(path, png.getvalue())
  return np.asarray(canvas)


PANEL_TITLES = ("masked", "reconstruction", "original")
