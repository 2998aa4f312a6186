"""The extra pretraining losses of the STL-10 curriculum study (models/extra_losses.py and
models/curriculum_losses.py) by hand, and how they add to the MSE."""

import math

import jax
import numpy as np
import pytest

from mae_jax.models import curriculum_losses, extra_losses, mae


def test_masked_laplacian_loss_by_hand():
  pred = np.zeros((1, 5, 5, 1), np.float32)
  pred[0, 2, 2, 0] = 1.0  # Laplacian: -4 at the centre, +1 on its four neighbours
  target = np.zeros_like(pred)
  everywhere = np.ones_like(pred)
  assert float(curriculum_losses.masked_laplacian_loss(pred, target, everywhere)) == pytest.approx(8 / 25)
  centre_only = np.zeros_like(pred)
  centre_only[0, 2, 2, 0] = 1.0
  assert float(curriculum_losses.masked_laplacian_loss(pred, target, centre_only)) == pytest.approx(4.0)


def test_uniformity_loss_by_hand():
  z = np.array([[1.0, 0.0], [0.0, 2.0]], np.float32)  # normalised: orthogonal, |zi - zj|^2 = 2
  assert float(curriculum_losses.uniformity_loss(z)) == pytest.approx(-4.0, abs=1e-5)
  z3 = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], np.float32)
  want = math.log((math.exp(-4) + math.exp(-8) + math.exp(-4)) / 3)
  assert float(curriculum_losses.uniformity_loss(z3)) == pytest.approx(want, abs=1e-5)


def test_extra_losses_add_to_the_mse():
  m = mae.MAE(image_size=(16, 16), patch_size=4, encoder_width=32, encoder_depth=1, encoder_heads=2,
              decoder_width=16, decoder_depth=1, decoder_heads=2)
  weighted = m.clone(extra_losses=(extra_losses.LaplacianLoss(0.05), extra_losses.UniformityLoss(0.01)))
  imgs = jax.random.normal(jax.random.PRNGKey(0), (4, 16, 16, 3))
  noise = jax.random.uniform(jax.random.PRNGKey(1), (4, 16))
  p = m.init(jax.random.PRNGKey(2), imgs, noise)
  base = float(m.apply(p, imgs, noise)[0])
  (total, _, _), sown = weighted.apply(p, imgs, noise, mutable=["losses"])
  parts = {k: float(v[0]) for k, v in sown["losses"].items()}
  assert parts["mse"] == pytest.approx(base, rel=1e-6)
  assert float(total) == pytest.approx(base + 0.05 * parts["laplacian"] + 0.01 * parts["uniformity"], rel=1e-5)
