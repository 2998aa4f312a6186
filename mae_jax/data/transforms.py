"""Image operations on one example, in numpy and Pillow (run in grain's worker processes):
decoding any file to uint8 RGB, random-resized crops (torchvision's retries, or the official
probe's clamped box), resizing, and the evaluation resize + centre crop."""

import io
import math
from typing import Any

import numpy as np
import simplejpeg
from PIL import Image

from mae_jax.data import device_resample
from mae_jax.errors import DataError
from mae_jax.runtime import paths

ALPHA_BACKGROUND = 255


# ----------------------------------------------------------------------------
# Per-example transforms (run in grain worker processes).
# ----------------------------------------------------------------------------
def is_encoded(image: Any) -> bool:
  return isinstance(image, (str, bytes))


def decode_image(image: Any, crop=None):
  """A file path (str), encoded bytes or an array -> uint8 (H, W, 3). JPEGs in the colour
  spaces Pillow and libjpeg-turbo convert alike decode with simplejpeg, other files with Pillow
  (`to_rgb8`).

  With `crop`, a function (encoded bytes) -> anything that decodes only what it needs
  (`decode_crop_region`), an encoded image is handed to it instead of being decoded whole; its
  errors are reported as this image's.
  """
  if is_encoded(image):
    what = f"image file {image!r}" if isinstance(image, str) else "encoded image bytes"
    try:
      if isinstance(image, str):
        image = paths.read_bytes(image)  # one read: PIL reads a file in many small pieces
      if crop is not None:
        return crop(image)
      if _jpeg_header(image) is not None:  # Pillow's pixels, 9x faster for a 32 px CIFAR image
        return simplejpeg.decode_jpeg(image, "RGB")
      with Image.open(io.BytesIO(image)) as im:
        return to_rgb8(im)
    except DataError as e:
      raise DataError(f"{what}: {e}") from None
    except Exception as e:
      raise DataError(f"cannot decode {what} ({e}); remove or replace it") from e
  arr = np.asarray(image)
  if arr.ndim == 2:
    arr = arr[:, :, None]
  if arr.shape[-1] == 1:
    arr = np.repeat(arr, 3, axis=-1)
  return arr[..., :3].astype(np.uint8)


def to_rgb8(im: Image.Image) -> np.ndarray:
  """A PIL image of any mode -> uint8 (H, W, 3), each mode scaled from its own range.

  `Image.convert("RGB")` clips deeper modes instead of scaling them (a 16-bit PNG comes out
  nearly white, a [0, 1] float TIFF black) and drops alpha (transparent pixels show whatever
  colour is stored under them). Here: 16-bit modes scale [0, 65535] -> [0, 255]; 32-bit integer
  ('I') images whose values fit in [0, 65535] are 16-bit data (Pillow opens some 16-bit files so),
  others scale [0, 2**31 - 1]; float ('F') images scale [0, 1]; alpha (LA, RGBA, P or L with a
  transparent colour) is composited onto white; CMYK and YCbCr convert by Pillow's formulas.
  Values outside a mode's range (negative, or a float image beyond [0, 1]) have no defined
  colour and raise DataError.
  """
  mode = im.mode
  if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
    x = np.asarray(im).astype(np.float64)
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    if mode == "F":
      top = 1.0
    elif mode == "I" and hi > 65535:
      top = 2.0**31 - 1
    else:
      top = 65535.0
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0 or hi > top:
      raise DataError(f"{mode} image has values in [{lo:g}, {hi:g}], outside [0, {top:g}], so "
                      "their colour is undefined; convert it to 8-bit (or 16-bit) RGB")
    gray = np.round(x * (255.0 / top)).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=-1)
  if (mode in ("P", "L", "RGB") and "transparency" in im.info) or mode == "PA":
    im, mode = im.convert("RGBA"), "RGBA"
  if mode in ("LA", "La", "RGBA", "RGBa"):
    rgba = np.asarray(im.convert("RGBA")).astype(np.float64)  # La / RGBa are un-premultiplied
    alpha = rgba[..., 3:] / 255.0
    return np.round(rgba[..., :3] * alpha + ALPHA_BACKGROUND * (1.0 - alpha)).astype(np.uint8)
  if mode in ("RGB", "L", "1", "P", "CMYK", "YCbCr", "RGBX"):
    return np.asarray(im.convert("RGB"))
  raise DataError(f"image mode {mode!r} is not supported; convert the file to RGB")


_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST}


def resize(img: np.ndarray, size: tuple[int, int], interpolation: str) -> np.ndarray:
  if img.shape[:2] == size:
    return img
  return np.asarray(Image.fromarray(img).resize((size[1], size[0]), _RESAMPLE[interpolation]))


CROP_MODES = ("retry", "clamp")


def random_resized_crop_box(h, w, rng: np.random.Generator, scale, ratio=(3 / 4, 4 / 3),
                            mode: str = "retry"):
  """RandomResizedCrop's box, (top, left, height, width). mode 'retry': torchvision's get_params
  (up to 10 draws until the box fits, then a central crop); 'clamp': the official linear probe's
  util/crop.py (one draw, the box's sides clamped to the image)."""
  area = h * w
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10 if mode == "retry" else 1):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    cw = int(round(math.sqrt(target_area * aspect)))
    ch = int(round(math.sqrt(target_area / aspect)))
    if mode == "clamp":
      cw, ch = max(1, min(cw, w)), max(1, min(ch, h))
    if 0 < cw <= w and 0 < ch <= h:
      return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
  # Fallback: central crop at the nearest allowed aspect ratio.
  in_ratio = w / h
  if in_ratio < ratio[0]:
    cw, ch = w, int(round(w / ratio[0]))
  elif in_ratio > ratio[1]:
    ch, cw = h, int(round(h * ratio[1]))
  else:
    cw, ch = w, h
  return (h - ch) // 2, (w - cw) // 2, ch, cw


# libjpeg-turbo's colour spaces that simplejpeg turns into RGB exactly as Pillow does; CMYK and
# YCCK JPEGs go through Pillow (`to_rgb8`).
_TURBO_COLORSPACES = ("YCbCr", "Gray", "RGB")


def _jpeg_header(data: bytes):
  """(height, width) of a JPEG that simplejpeg decodes as Pillow would, else None."""
  if data[:2] != b"\xff\xd8":
    return None
  h, w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
  return (h, w) if colorspace in _TURBO_COLORSPACES else None


def decode_crop_region(data: bytes, rng: np.random.Generator, size: int, scale, mode: str = "retry"):
  """RandomResizedCrop's box, drawn from the header's size by `random_resized_crop_box`
  (the rule of `mode`), and the decoded pixels that cover it, nothing more resampled.

  Returns (region, box): region uint8 (h, w, 3), box (left, top, right, bottom) in region pixels,
  as Pillow's `resize(box=...)` takes it. A JPEG decodes with libjpeg-turbo (simplejpeg; the same
  pixels as Pillow, about 25% faster) at the coarsest DCT scale 1/2^k that leaves the box at least
  `size` pixels each way, where the box may fall between pixels; other files decode whole.
  """
  hw = _jpeg_header(data)
  if hw is None:
    with Image.open(io.BytesIO(data)) as im:
      return crop_region(to_rgb8(im), rng, scale, mode)
  h, w = hw
  top, left, ch, cw = random_resized_crop_box(h, w, rng, scale, mode=mode)
  k = 1  # the DCT scale 1/k; libjpeg-turbo's other (m/8) scales decode more slowly than 1/1
  while k < 8 and min(cw, ch) >= 2 * k * size:
    k *= 2
  img = simplejpeg.decode_jpeg(data, "RGB", min_height=-(-h // k), min_width=-(-w // k))
  sy, sx = img.shape[0] / h, img.shape[1] / w
  y0, x0, y1, x1 = top * sy, left * sx, (top + ch) * sy, (left + cw) * sx
  fy, fx = math.floor(y0), math.floor(x0)
  region = img[fy:min(math.ceil(y1), img.shape[0]), fx:min(math.ceil(x1), img.shape[1])]
  return region, (x0 - fx, y0 - fy, x1 - fx, y1 - fy)


def crop_region(img: np.ndarray, rng: np.random.Generator, scale, mode: str = "retry"):
  """`decode_crop_region` for a decoded uint8 image: (the box's pixels, the whole of them)."""
  top, left, ch, cw = random_resized_crop_box(img.shape[0], img.shape[1], rng, scale, mode=mode)
  return img[top:top + ch, left:left + cw], (0.0, 0.0, float(cw), float(ch))


def resize_region(region: np.ndarray, box, size: int, interpolation: str) -> np.ndarray:
  """The box of a region resampled to size x size on the host (Pillow), as torchvision's
  crop-then-resize: pixels outside the region do not take part."""
  if region.shape[:2] == (size, size) and tuple(box) == (0, 0, size, size):
    return region
  im = Image.fromarray(np.ascontiguousarray(region))
  return np.asarray(im.resize((size, size), _RESAMPLE[interpolation], box=tuple(box)))


# With dataset.resize_on='device', the loader sends each crop on a canvas CANVAS_FACTOR times the
# output size (mae_jax/data/device_resample.py), and the train step resamples it.
def crop_on_canvas(region: np.ndarray, box, size: int, flip: bool, interpolation: str):
  """(canvas uint8 (F*size, F*size, 3), crop float32 (6,)): the region in the canvas's top-left
  corner for the train step to resample; `flip` swaps the box's left and right, which mirrors
  the resampled image. A region larger than the canvas (a box wider than F * size at the
  decoded scale, e.g. a tall box of a wide image) is resampled here instead and sent as a
  size x size region."""
  n = device_resample.CANVAS_FACTOR * size
  canvas = np.zeros((n, n, 3), np.uint8)
  rh, rw = region.shape[:2]
  x0, y0, x1, y1 = box
  if rh > n or rw > n:
    region = resize_region(region, box, size, interpolation)
    (rh, rw), (x0, y0, x1, y1) = (size, size), (0, 0, size, size)
  canvas[:rh, :rw] = region
  if flip:
    x0, x1 = x1, x0
  return canvas, np.array([x0, y0, x1, y1, rw, rh], np.float32)


def center_crop_resize(img: np.ndarray, size: int, interpolation: str, crop_pct: float = 1.0) -> np.ndarray:
  """torchvision's Resize(int(size / crop_pct)) of the shorter side, then CenterCrop(size): with
  crop_pct 1 the image as it is where it is already size x size; the official evaluation
  transform (util/datasets.build_transform, main_linprobe.py) has crop_pct 224 / 256."""
  h, w = img.shape[:2]
  short = int(size / crop_pct)
  if (h, w) != (size, size) or short != size:
    s = short / min(h, w)  # the longer side as torchvision computes it: int(short * long / short_side)
    img = resize(img, (short, int(w * s)) if h <= w else (int(h * s), short), interpolation)
    h, w = img.shape[:2]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    img = img[top:top + size, left:left + size]
  return img
