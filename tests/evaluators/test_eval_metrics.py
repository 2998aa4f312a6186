"""Reconstruction metrics and kNN against references and hand computations."""

import jax.numpy as jnp
import numpy as np
import pytest

from mae_jax.data import sources
from mae_jax.evaluators import knn, reconstruction
from mae_jax.models.curriculum_losses import laplacian

skimage_metrics = pytest.importorskip("skimage.metrics", reason="scikit-image is a test-only reference")


def test_ssim_matches_scikit_image():
  rng = np.random.default_rng(0)
  a = rng.random((2, 32, 32, 3)).astype(np.float32)
  b = np.clip(a + 0.2 * rng.standard_normal(a.shape), 0, 1).astype(np.float32)
  got = np.asarray(reconstruction.ssim(jnp.asarray(a), jnp.asarray(b)))
  for i in range(2):
    want = skimage_metrics.structural_similarity(
        a[i], b[i], gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1.0,
        channel_axis=-1)
    assert got[i] == pytest.approx(want, abs=1e-5)
  np.testing.assert_allclose(reconstruction.ssim(jnp.asarray(a), jnp.asarray(a)), 1.0, atol=1e-5)


def test_psnr_by_hand():
  a = np.zeros((1, 4, 4, 3), np.float32)
  b = np.full((1, 4, 4, 3), 0.1, np.float32)  # MSE 0.01 -> 20 dB
  assert float(reconstruction.psnr(a, b)[0]) == pytest.approx(20.0, abs=1e-4)


def test_laplacian_by_hand():
  x = np.zeros((1, 5, 5, 1), np.float32)
  x[0, 2, 2, 0] = 1.0
  lap = np.asarray(laplacian(jnp.asarray(x)))[0, :, :, 0]
  want = np.zeros((5, 5), np.float32)
  want[2, 2] = -4.0
  want[1, 2] = want[3, 2] = want[2, 1] = want[2, 3] = 1.0
  np.testing.assert_array_equal(lap, want)


def test_knn_by_hand():
  # Memory: two clusters; the weighted vote of the 3 nearest decides.
  train_f = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9], [0.2, 0.8]], np.float32)
  train_f /= np.linalg.norm(train_f, axis=1, keepdims=True)
  train_y = np.array([0, 0, 1, 1, 1])
  test_f = np.array([[1, 0.05], [0.05, 1]], np.float32)
  test_f /= np.linalg.norm(test_f, axis=1, keepdims=True)
  assert knn.knn_accuracy(train_f, train_y, test_f, np.array([0, 1]), k=3, temperature=0.07) == 100.0
  assert knn.knn_accuracy(train_f, train_y, test_f, np.array([1, 1]), k=3, temperature=0.07) == 50.0
  # With k = 5 (all), class 1 has three votes; a high temperature makes the votes near-equal.
  assert knn.knn_accuracy(train_f, train_y, test_f[:1], np.array([1]), k=5, temperature=100.0) == 100.0


def test_subset_is_evenly_spaced():
  s = sources.evenly_spaced(list(range(100)), 5)
  assert [s[i] for i in range(len(s))] == [0, 25, 50, 74, 99]
  assert len(sources.evenly_spaced(list(range(7)), 0)) == 7
