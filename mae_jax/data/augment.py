"""Fine-tuning augmentations, as the official recipe (timm): RandAugment on the host; mixup,
cutmix, label smoothing and random erasing on the device, inside the jitted step.

Host ops take a numpy Generator (grain's per-record one), so they are reproducible and resume
exactly; device ops take a PRNG key derived from the step.
"""

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageEnhance, ImageOps

# ----------------------------------------------------------------------------
# RandAugment, timm's 'rand-m9-mstd0.5-inc1': 2 ops drawn with replacement from the 15
# "increasing" ops, each applied with probability 0.5, magnitude ~ N(9, 0.5) clipped to [0, 10].
# ----------------------------------------------------------------------------
_MAX_LEVEL = 10.0
_FILL = (124, 116, 104)  # ImageNet mean in uint8, timm's fill for geometric ops


def _signed(v, rng):
  return -v if rng.random() < 0.5 else v


# The official fine-tuning passes interpolation='bicubic' to timm's create_transform, which
# RandAugment's geometric ops then resample with.
_RESAMPLE = Image.BICUBIC


def _affine(img, matrix):
  return img.transform(img.size, Image.AFFINE, matrix, resample=_RESAMPLE, fillcolor=_FILL)


def _rotate(img, m, rng):
  return img.rotate(_signed(m / _MAX_LEVEL * 30.0, rng), resample=_RESAMPLE, fillcolor=_FILL)


def _shear_x(img, m, rng):
  return _affine(img, (1, _signed(m / _MAX_LEVEL * 0.3, rng), 0, 0, 1, 0))


def _shear_y(img, m, rng):
  return _affine(img, (1, 0, 0, _signed(m / _MAX_LEVEL * 0.3, rng), 1, 0))


def _translate_x(img, m, rng):
  return _affine(img, (1, 0, _signed(m / _MAX_LEVEL * 0.45, rng) * img.size[0], 0, 1, 0))


def _translate_y(img, m, rng):
  return _affine(img, (1, 0, 0, 0, 1, _signed(m / _MAX_LEVEL * 0.45, rng) * img.size[1]))


def _posterize(img, m, rng):
  bits = 4 - int(m / _MAX_LEVEL * 4)  # keeps 4 bits down to 0 as m grows (0: black, as timm)
  return Image.fromarray(np.asarray(img) & np.uint8((0xFF << (8 - bits)) & 0xFF))


def _solarize(img, m, rng):
  return ImageOps.solarize(img, 256 - int(m / _MAX_LEVEL * 256))


def _solarize_add(img, m, rng):
  a = np.asarray(img).astype(np.int32)
  add = int(m / _MAX_LEVEL * 110)
  return Image.fromarray(np.where(a < 128, np.minimum(a + add, 255), a).astype(np.uint8))


def _enhance(cls):
  return lambda img, m, rng: cls(img).enhance(1.0 + _signed(m / _MAX_LEVEL * 0.9, rng))


RAND_OPS = {
    "AutoContrast": lambda img, m, rng: ImageOps.autocontrast(img),
    "Equalize": lambda img, m, rng: ImageOps.equalize(img),
    "Invert": lambda img, m, rng: ImageOps.invert(img),
    "Rotate": _rotate,
    "PosterizeIncreasing": _posterize,
    "SolarizeIncreasing": _solarize,
    "SolarizeAdd": _solarize_add,
    "ColorIncreasing": _enhance(ImageEnhance.Color),
    "ContrastIncreasing": _enhance(ImageEnhance.Contrast),
    "BrightnessIncreasing": _enhance(ImageEnhance.Brightness),
    "SharpnessIncreasing": _enhance(ImageEnhance.Sharpness),
    "ShearX": _shear_x,
    "ShearY": _shear_y,
    "TranslateXRel": _translate_x,
    "TranslateYRel": _translate_y,
}


def rand_augment(img: np.ndarray, rng: np.random.Generator, num_ops: int = 2, magnitude: float = 9.0,
                 magnitude_std: float = 0.5, prob: float = 0.5) -> np.ndarray:
  """uint8 (H, W, 3) -> uint8 (H, W, 3)."""
  pil = Image.fromarray(img)
  names = list(RAND_OPS)
  for name in rng.choice(names, num_ops, replace=True):
    if rng.random() > prob:
      continue
    m = magnitude if magnitude_std <= 0 else rng.normal(magnitude, magnitude_std)
    pil = RAND_OPS[name](pil, float(np.clip(m, 0.0, _MAX_LEVEL)), rng)
  return np.asarray(pil)


# ----------------------------------------------------------------------------
# Device-side ops (pure, static shapes).
# ----------------------------------------------------------------------------
def one_hot(labels, num_classes: int, smoothing: float = 0.0):
  """Smoothed one-hot targets: 1 - smoothing + smoothing / K on the label, smoothing / K elsewhere."""
  off = smoothing / num_classes
  return jax.nn.one_hot(labels, num_classes) * (1.0 - smoothing) + off


def _box_mask(h, w, top, left, bh, bw):
  """(H, W) float mask: 1 inside rows [top, top + bh) and columns [left, left + bw)."""
  rows = jnp.arange(h)[:, None]
  cols = jnp.arange(w)[None, :]
  return ((rows >= top) & (rows < top + bh) & (cols >= left) & (cols < left + bw)).astype(jnp.float32)


def mixup_cutmix(key, images, targets, mixup_alpha: float, cutmix_alpha: float,
                 switch_prob: float = 0.5, prob: float = 1.0):
  """timm's batch-mode Mixup: each batch is mixed with its reverse, by mixup or by cutmix.

  Cutmix's lambda is corrected to the pasted box's true area. Returns (images, targets).
  """
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    return images, targets
  k_apply, k_switch, k_mix, k_cut, k_cy, k_cx = jax.random.split(key, 6)
  b, h, w, _ = images.shape
  use_cutmix = (cutmix_alpha > 0) & ((mixup_alpha <= 0) | (jax.random.uniform(k_switch) < switch_prob))
  lam_mix = jax.random.beta(k_mix, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else jnp.float32(1)
  lam_cut = jax.random.beta(k_cut, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0 else jnp.float32(1)
  # Cutmix box: side ratio sqrt(1 - lam), centre uniform, clipped to the image.
  cut = jnp.sqrt(1.0 - lam_cut)
  ch, cw = (h * cut).astype(jnp.int32), (w * cut).astype(jnp.int32)
  cy, cx = jax.random.randint(k_cy, (), 0, h), jax.random.randint(k_cx, (), 0, w)
  y0, y1 = jnp.clip(cy - ch // 2, 0, h), jnp.clip(cy + ch // 2, 0, h)
  x0, x1 = jnp.clip(cx - cw // 2, 0, w), jnp.clip(cx + cw // 2, 0, w)
  box = _box_mask(h, w, y0, x0, y1 - y0, x1 - x0)[None, :, :, None]
  lam_cut = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
  applied = jax.random.uniform(k_apply) < prob
  lam = jnp.where(applied, jnp.where(use_cutmix, lam_cut, lam_mix), 1.0)
  flipped = images[::-1]
  mixed = jnp.where(use_cutmix, images * (1 - box) + flipped * box, images * lam + flipped * (1 - lam))
  images = jnp.where(applied, mixed, images)
  return images, targets * lam + targets[::-1] * (1.0 - lam)


def random_erasing(key, images, prob: float, min_area: float = 0.02, max_area: float = 1 / 3,
                   min_aspect: float = 0.3, tries: int = 10):
  """timm's RandomErasing(mode='pixel', max_count=1) on normalised images, each image on its own
  (timm erases in the loader's transform, before mixup): with probability `prob`, up to `tries`
  boxes are drawn (area U(min_area, max_area) of the image, log-aspect uniform in
  [log min_aspect, -log min_aspect], sides rounded) and the first that fits (both sides smaller
  than the image's) is placed uniformly and filled with N(0, 1) noise per pixel and channel.
  An image where no draw fits is left as it is, as in timm."""
  if prob <= 0:
    return images
  b, h, w, c = images.shape
  k_apply, k_area, k_aspect, k_top, k_left, k_noise = jax.random.split(key, 6)
  area = jax.random.uniform(k_area, (b, tries), minval=min_area, maxval=max_area) * h * w
  log_r = jax.random.uniform(k_aspect, (b, tries), minval=np.log(min_aspect), maxval=np.log(1 / min_aspect))
  bh = jnp.round(jnp.sqrt(area * jnp.exp(log_r))).astype(jnp.int32)
  bw = jnp.round(jnp.sqrt(area / jnp.exp(log_r))).astype(jnp.int32)
  fits = (bh < h) & (bw < w)
  first = jnp.argmax(fits, axis=1)[:, None]  # the first draw that fits
  bh = jnp.take_along_axis(bh, first, axis=1)[:, 0]
  bw = jnp.take_along_axis(bw, first, axis=1)[:, 0]
  top = (jax.random.uniform(k_top, (b,)) * (h - bh + 1)).astype(jnp.int32)
  left = (jax.random.uniform(k_left, (b,)) * (w - bw + 1)).astype(jnp.int32)
  masks = jax.vmap(lambda t, l, hh, ww: _box_mask(h, w, t, l, hh, ww))(top, left, bh, bw)
  erase = (jax.random.uniform(k_apply, (b,)) < prob) & fits.any(axis=1)
  masks = masks * erase[:, None, None].astype(jnp.float32)
  noise = jax.random.normal(k_noise, images.shape, images.dtype)
  return images * (1 - masks[..., None]) + noise * masks[..., None]
