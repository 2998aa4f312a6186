"""Reconstruction panels: a perfect prediction gives back the original, with and without norm_pix_loss."""

import types

import numpy as np
import pytest
from PIL import Image

from mae_jax.evaluators import figures
from mae_jax.models.mae import normalize_patches, patchify


def _perfect_model(norm_pix: bool):
  """Stands in for the MAE: predicts every patch exactly, in the loss's target space."""
  def apply(variables, imgs, noise):
    target = patchify(imgs, 4)
    pred = normalize_patches(target) if norm_pix else target
    mask = (noise > 0.5).astype(np.float32)
    return 0.0, pred, mask
  return types.SimpleNamespace(apply=apply, patch_size=4, grid=(2, 2), norm_pix_loss=norm_pix)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_perfect_prediction_reconstructs_the_original(norm_pix):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
  noise = np.array([[0.1, 0.9, 0.2, 0.8], [0.7, 0.6, 0.3, 0.4]], np.float32)
  mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
  masked, recon, original = figures.reconstruction_panels(_perfect_model(norm_pix), {}, images, noise,
                                                          mean, std)
  np.testing.assert_allclose(original, images / 255.0, atol=1e-6)
  np.testing.assert_allclose(recon, original, atol=1e-4)
  # Removed patches (noise > 0.5) are grey in the masked panel, kept ones unchanged.
  np.testing.assert_allclose(masked[0, 0:4, 4:8], 0.5)
  np.testing.assert_allclose(masked[0, 0:4, 0:4], original[0, 0:4, 0:4], atol=1e-6)


def test_save_grid_writes_one_row_per_image(tmp_path):
  cols = [np.zeros((3, 8, 8, 3)), np.ones((3, 8, 8, 3)), np.full((3, 8, 8, 3), 0.5)]
  path = tmp_path / "g.png"
  figures.save_grid(str(path), cols, figures.PANEL_TITLES, min_size=32)
  w, h = Image.open(path).size
  assert w == 3 * (32 + 4) + 4 and h == 14 + 3 * (32 + 4) + 4
