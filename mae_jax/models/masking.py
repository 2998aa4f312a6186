"""Mask sampling strategies, all expressed as the per-patch noise that `random_masking` sorts:
the patches with the smallest noise are kept, so every strategy shares the same static-shaped
shuffle / unshuffle code and keeps exactly `int(L * (1 - mask_ratio))` patches.

  * random: uniform noise (the paper's default), drawn on the device;
  * grid: keep one patch in every 2x2 cell (the top-left), mask ratio 0.75 (the CIFAR-10 ViT-T/2 ablation study), device;
  * block: BEiT's blockwise masking, drawn on the host in the data pipeline (it is a
    data-dependent loop), from grain's per-record generator, so it is reproducible and resumes.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

STRATEGIES = ("random", "block", "grid")


def patch_grid(image_size, patch_size: int) -> tuple[int, int]:
  """(rows, columns) of patches of an image of `image_size` (one side, or (height, width))."""
  h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
  return (h // patch_size, w // patch_size)


def num_kept(length: int, mask_ratio: float) -> int:
  """The patches an MAE keeps of `length`, as the official random_masking: int(L * (1 - ratio))."""
  return int(length * (1 - mask_ratio))


def random_noise(key, batch: int, num_patches: int):
  return jax.random.uniform(key, (batch, num_patches))


def grid_noise(key, batch: int, grid: tuple[int, int]):
  """Noise in [0, 0.5) on the top-left patch of every 2x2 cell, [0.5, 1) elsewhere."""
  rows, cols = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")
  kept = ((rows % 2 == 0) & (cols % 2 == 0)).reshape(-1).astype(np.float32)
  u = jax.random.uniform(key, (batch, grid[0] * grid[1]))
  return 0.5 * u + 0.5 * (1.0 - jnp.asarray(kept))[None]


def block_mask(rng: np.random.Generator, grid: tuple[int, int], mask_ratio: float,
               min_block: int = 4, aspect: float = 0.3) -> np.ndarray:
  """BEiT's blockwise masking, made exact: (gh, gw) bool, True on masked patches, exactly
  L - int(L * (1 - mask_ratio)) of them.

  Blocks of at least `min_block` patches with log-uniform aspect in [aspect, 1/aspect] are added
  while they fit the remaining count (BEiT's generator, which may stop short); the shortfall is
  then filled with unmasked patches next to the mask (or anywhere if none border it).
  """
  gh, gw = grid
  length = gh * gw
  target = length - num_kept(length, mask_ratio)
  mask = np.zeros((gh, gw), bool)
  log_aspect = (math.log(aspect), math.log(1 / aspect))
  count = 0
  while count < target:
    remaining = target - count
    delta = 0
    for _ in range(10):
      area = rng.uniform(min_block, max(min_block, remaining))
      ar = math.exp(rng.uniform(*log_aspect))
      h, w = int(round(math.sqrt(area * ar))), int(round(math.sqrt(area / ar)))
      if 0 < h < gh and 0 < w < gw:
        top, left = int(rng.integers(0, gh - h + 1)), int(rng.integers(0, gw - w + 1))
        new = h * w - int(mask[top:top + h, left:left + w].sum())
        if 0 < new <= remaining:
          mask[top:top + h, left:left + w] = True
          delta = new
          break
    if delta == 0:
      break
    count += delta
  while count < target:  # exact ratio: grow the mask from its border
    border = np.zeros_like(mask)
    border[1:] |= mask[:-1]
    border[:-1] |= mask[1:]
    border[:, 1:] |= mask[:, :-1]
    border[:, :-1] |= mask[:, 1:]
    candidates = np.flatnonzero((border & ~mask).reshape(-1))
    if candidates.size == 0:
      candidates = np.flatnonzero(~mask.reshape(-1))
    mask.reshape(-1)[rng.choice(candidates)] = True
    count += 1
  return mask


def curriculum_ratio(step: int, steps_per_epoch: int, start: float, final: float, epochs: float,
                     shape: str = "linear", bucket: float = 0.05) -> float:
  """Curriculum masking (the STL-10 study of Rana et al.): the mask ratio ramps from `start` to `final` over `epochs` (linear or
  cosine), rounded to a multiple of `bucket`.

  Why buckets: the ratio sets how many patches the encoder sees, which is a shape, and XLA
  compiles one program per shape. Rounding to 0.05 means 0.5 -> 0.75 costs six compilations in
  all, while every step still drops the masked tokens. (Padding to a fixed length with attention
  masks would compile once but spend the encoder's compute on padding, the cost MAE exists to avoid.)
  """
  progress = min(step / max(epochs * steps_per_epoch, 1), 1.0)
  if shape == "cosine":
    progress = 0.5 * (1.0 - math.cos(math.pi * progress))
  ratio = start + (final - start) * progress
  if bucket > 0:
    ratio = round(round(ratio / bucket) * bucket, 6)
  lo, hi = min(start, final), max(start, final)
  return float(min(max(ratio, lo), hi))


def fixed_noise(strategy: str, seed: int, n: int, grid: tuple[int, int], mask_ratio: float) -> np.ndarray:
  """(n, L) noise for a fixed, reproducible set of masks of any strategy (figures, evaluation)."""
  if strategy == "block":
    rng = np.random.default_rng(seed)
    return np.stack([mask_to_noise(block_mask(rng, grid, mask_ratio), rng) for _ in range(n)])
  key = jax.random.PRNGKey(seed)
  if strategy == "grid":
    return np.asarray(grid_noise(key, n, grid))
  return np.asarray(random_noise(key, n, grid[0] * grid[1]))


def mask_to_noise(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """A bool mask -> noise that `random_masking` turns back into the same mask."""
  flat = mask.reshape(-1).astype(np.float32)
  return (0.5 * rng.random(flat.shape) + 0.5 * flat).astype(np.float32)
