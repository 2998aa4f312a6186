"""Mask sampling strategies: exact ratios, the grid pattern, block contiguity, reproducibility."""

import jax
import numpy as np
import pytest
from scipy import ndimage

from mae_jax.models import masking
from mae_jax.models.mae import random_masking


def _mask_from_noise(noise, ratio):
  x = np.zeros(noise.shape + (1,), np.float32)
  _, mask, _ = random_masking(x, noise, ratio)
  return np.asarray(mask)


def test_grid_keeps_one_in_every_2x2():
  noise = masking.grid_noise(jax.random.PRNGKey(0), 3, (4, 6))
  mask = _mask_from_noise(noise, 0.75).reshape(3, 4, 6)
  want = np.ones((4, 6))
  want[::2, ::2] = 0  # the top-left patch of each cell is kept
  for m in mask:
    np.testing.assert_array_equal(m, want)


@pytest.mark.parametrize("ratio", [0.5, 0.75, 0.9])
def test_block_mask_exact_ratio_and_contiguous(ratio):
  grid = (16, 16)
  target = 256 - int(256 * (1 - ratio))
  for seed in range(20):
    mask = masking.block_mask(np.random.default_rng(seed), grid, ratio)
    assert mask.sum() == target
    # Blocks, not scattered patches: few connected pieces, each patch touching another.
    _, pieces = ndimage.label(mask)
    assert pieces <= 6
    lone = mask & ~ndimage.binary_dilation(mask, structure=[[0, 1, 0], [1, 0, 1], [0, 1, 0]])
    assert not lone.any()
    # Round trip through the noise that random_masking sorts.
    noise = masking.mask_to_noise(mask, np.random.default_rng(seed))[None]
    np.testing.assert_array_equal(_mask_from_noise(noise, ratio)[0], mask.reshape(-1))


def test_same_seed_same_mask():
  a = masking.block_mask(np.random.default_rng(3), (8, 8), 0.5)
  np.testing.assert_array_equal(a, masking.block_mask(np.random.default_rng(3), (8, 8), 0.5))
  assert not np.array_equal(a, masking.block_mask(np.random.default_rng(4), (8, 8), 0.5))
  k = jax.random.PRNGKey(1)
  np.testing.assert_array_equal(masking.random_noise(k, 2, 16), masking.random_noise(k, 2, 16))
  np.testing.assert_array_equal(masking.grid_noise(k, 2, (4, 4)), masking.grid_noise(k, 2, (4, 4)))


def test_random_is_exact_too():
  noise = masking.random_noise(jax.random.PRNGKey(0), 4, 64)
  np.testing.assert_array_equal(_mask_from_noise(noise, 0.75).sum(1), 48)
