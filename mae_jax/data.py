"""Data: tfds ArrayRecord sources, image folders or folders written by mae_jax.prepare, fed
through grain.

An example flows as: source[i] -> DecodeImage (uint8 HxWx3) -> crop/flip (train) or
resize + center crop (eval) -> Batch. Images stay uint8 until they reach the device;
normalisation with the dataset mean/std happens inside the jitted step (`normalize`).

Every random choice comes from the per-record generator that grain derives from the
sampler seed and the record's position, so a given seed gives the same stream, and
an iterator restored from a checkpoint continues it exactly.
"""

import dataclasses
import io
import math
import multiprocessing
import os
import signal
import threading
import time
from typing import Any, Iterator, Optional, Sequence

import grain
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import simplejpeg

from mae_jax import augment, device_resample, masking
from mae_jax.sources import DataError
from mae_jax.host import available_cores

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
        with open(image, "rb") as f:  # one read: PIL reads a file in many small pieces
          image = f.read()
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


# With dataset.resize_on='device', the loader sends each crop on a canvas this many times the

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


_worker_ready = False


def _prepare_worker_process() -> None:
  """Once per grain worker process: leave Ctrl-C and SIGTERM to the main process (which saves a
  checkpoint and then ends the workers; a terminal's Ctrl-C reaches the whole process group and
  printed a KeyboardInterrupt traceback per worker), and exit as soon as the main process is gone
  (after a kill -9 the workers lived on for minutes, holding memory)."""
  global _worker_ready
  _worker_ready = True
  parent = multiprocessing.parent_process()
  if parent is None:  # the main process itself (worker_count=0)
    return
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)

  def exit_with_parent():
    while os.getppid() == parent.pid:
      time.sleep(0.5)
    os._exit(0)

  threading.Thread(target=exit_with_parent, daemon=True, name="exit-with-parent").start()


@dataclasses.dataclass
class DecodeImage(grain.transforms.Map):
  """Decodes the image and keeps only the fields the model needs (the first transform of every
  loader, so it also prepares each worker process). With `defer`, an encoded image is left for a
  transform that decodes only its random crop (TrainAugment)."""
  defer: bool = False

  def map(self, element):
    if not _worker_ready:
      _prepare_worker_process()
    image = element["image"]
    if not (self.defer and is_encoded(image)):
      image = decode_image(image)
    return {"image": image, "label": np.int32(element["label"])}


@dataclasses.dataclass
class TrainAugment(grain.transforms.RandomMap):
  """RandomResizedCrop(scale) (else resize + center crop), horizontal flip, RandAugment; each
  optional. With `resize_on_device`, the crop is not resampled here: the image goes out as its
  crop on a canvas (`crop_on_canvas`) with a 'crop' field, for the train step's `train_images`."""
  size: int
  random_resized_crop: bool
  crop_scale: tuple[float, float]
  hflip: bool
  interpolation: str
  randaug_num_ops: int = 0  # 0: no RandAugment
  randaug_magnitude: float = 9.0
  randaug_magnitude_std: float = 0.5
  resize_on_device: bool = False
  crop_mode: str = "retry"  # random_resized_crop_box's rule: 'retry' (torchvision) or 'clamp'

  def random_map(self, element, rng: np.random.Generator):
    img = element["image"]
    if self.random_resized_crop:
      if is_encoded(img):  # decoded here, only as much as the crop needs
        region, box = decode_image(img, lambda b: decode_crop_region(b, rng, self.size, self.crop_scale,
                                                                     self.crop_mode))
      else:
        region, box = crop_region(img, rng, self.crop_scale, self.crop_mode)
      flip = self.hflip and rng.random() < 0.5
      if self.resize_on_device:
        canvas, crop = crop_on_canvas(region, box, self.size, flip, self.interpolation)
        return {**element, "image": canvas, device_resample.CROP_FIELD: crop}
      img = resize_region(region, box, self.size, self.interpolation)
    else:
      img = center_crop_resize(img, self.size, self.interpolation)
      flip = self.hflip and rng.random() < 0.5
    if flip:
      img = img[:, ::-1]
    if self.randaug_num_ops > 0:
      img = augment.rand_augment(np.ascontiguousarray(img), rng, self.randaug_num_ops,
                                 self.randaug_magnitude, self.randaug_magnitude_std)
    return {**element, "image": np.ascontiguousarray(img)}



def train_augment(dataset_cfg, section=None, randaug: bool = False) -> TrainAugment:
  """The pretraining transform of `config.dataset`, or a probe's or fine-tuning's: the crop and
  flip fields of its config section (`config.probe`, `config.finetune`) in place of the
  dataset's, and with `randaug` (fine-tuning) the section's RandAugment."""
  s = dataset_cfg if section is None else section
  ops, magnitude, magnitude_std = ((section.randaug_num_ops, section.randaug_magnitude,
                                    section.randaug_magnitude_std) if randaug else (0, 9.0, 0.5))
  return TrainAugment(dataset_cfg.image_size, s.random_resized_crop, tuple(s.crop_scale), s.hflip,
                      dataset_cfg.interpolation, ops, magnitude, magnitude_std,
                      device_resample.enabled(dataset_cfg, s.random_resized_crop, ops), s.crop_mode)


@dataclasses.dataclass
class BlockMaskNoise(grain.transforms.RandomMap):
  """Adds 'mask_noise' (L,) float32 encoding a BEiT blockwise mask of exactly the asked ratio."""
  grid: tuple[int, int]
  mask_ratio: float

  def random_map(self, element, rng: np.random.Generator):
    mask = masking.block_mask(rng, self.grid, self.mask_ratio)
    return {**element, "mask_noise": masking.mask_to_noise(mask, rng)}


@dataclasses.dataclass
class EvalResize(grain.transforms.Map):
  size: int
  interpolation: str
  crop_pct: float = 1.0

  def map(self, element):
    return {**element, "image": center_crop_resize(element["image"], self.size, self.interpolation,
                                                   self.crop_pct)}


# ----------------------------------------------------------------------------
# Loaders.
# ----------------------------------------------------------------------------
MAX_AUTO_WORKERS = 32
READ_AHEAD_PER_THREAD = 4


def read_options(read_threads: int) -> grain.ReadOptions:
  """grain's record reading: `read_threads` threads and 4 records ahead per thread.

  Not grain's default (16 threads, 500 records ahead): its reader walks the whole read-ahead
  buffer on every record to measure it, 0.6 ms per record with 500 (as long as a 224 px crop's
  resample), and image records are decoded much more slowly than they are read.
  """
  return grain.ReadOptions(num_threads=read_threads,
                           prefetch_buffer_size=READ_AHEAD_PER_THREAD * read_threads)


def resolve_workers(num_workers: int, cores: Optional[int] = None) -> int:
  """`dataset.num_workers`, with -1 resolved from the cores this process may use: one per core
  but one (left to the training loop), at least 1 and at most 32."""
  if num_workers >= 0:
    return num_workers
  return max(1, min((cores or available_cores()) - 1, MAX_AUTO_WORKERS))


def make_loader(config, source, *, train: bool, global_batch_size: int, seed: int,
                augment=None,
                worker_count: Optional[int] = None) -> grain.DataLoader:
  """A grain DataLoader yielding this process's share of each global batch.

  Training loaders shuffle and repeat forever (epochs are counted by the trainer) and apply
  `augment`, one transform or a list (default: the pretraining transform of `config.dataset`);
  evaluation loaders make one
  ordered pass, resize + center crop, and keep the last, smaller batch. Each process reads only
  its shard.
  """
  d = config.dataset
  if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; a plain script never parses them
    flags.FLAGS.mark_as_parsed()
  num_processes = jax.process_count()
  if global_batch_size % num_processes:
    raise ValueError(f"global batch {global_batch_size} is not divisible by {num_processes} processes")
  if train:  # equal shards, the surplus dropped
    shard = grain.sharding.ShardByJaxProcess(drop_remainder=True)
  else:
    # Evaluation keeps every example: this process reads its own contiguous slice (sizes differ
    # by at most one; `eval_batches` evens out the batch counts). Not grain's sharding, whose
    # loader stops every shard at floor(N / processes) records when they are uneven.
    source, shard = ProcessSlice(source), grain.sharding.NoSharding()
  sampler = grain.samplers.IndexSampler(len(source), shard_options=shard, shuffle=train,
                                        num_epochs=None if train else 1, seed=seed)
  if train:
    transforms = augment or train_augment(d)
  else:
    transforms = EvalResize(d.image_size, d.interpolation, d.eval_crop_pct)
  if not isinstance(transforms, (list, tuple)):
    transforms = [transforms]
  # The train crop decodes the image itself (only what its box needs) when it comes first.
  defer = isinstance(transforms[0], TrainAugment) and transforms[0].random_resized_crop
  ops = [DecodeImage(defer), *transforms,
         grain.transforms.Batch(global_batch_size // num_processes, drop_remainder=train)]
  return grain.DataLoader(data_source=source, sampler=sampler, operations=ops,
                          read_options=read_options(d.read_threads),
                          worker_count=resolve_workers(d.num_workers) if worker_count is None else worker_count)


class ProcessSlice:
  """This process's contiguous share of a source: records [start, end) of an even split."""

  def __init__(self, source):
    n, count, index = len(source), jax.process_count(), jax.process_index()
    self.source = source
    self.start = index * (n // count) + min(index, n % count)
    self.end = self.start + n // count + (index < n % count)

  def __len__(self):
    return self.end - self.start

  def __getitem__(self, i):
    return self.source[self.start + int(i)]


def eval_batches(config, source, global_batch_size: int, fields: Sequence[str]) -> Iterator[dict]:
  """Every example of `source` once, as this process's share of each global batch, padded to
  one static shape with 'valid' marking the real rows (see `pad_batch`).

  Every process yields the same number of batches, ceil(ceil(N / processes) / local batch),
  a process whose shard ends early yielding all-padding ones, so that the collectives of the
  evaluation step line up across processes.
  """
  num_processes = jax.process_count()
  if len(source) < num_processes:
    raise ValueError(f"the evaluation source has {len(source)} examples, fewer than the "
                     f"{num_processes} processes that share it; evaluate on a larger split")
  local_size = global_batch_size // num_processes
  largest_shard = -(-len(source) // num_processes)
  num_batches = -(-largest_shard // local_size)
  batches = iter(make_loader(config, source, train=False, global_batch_size=global_batch_size, seed=0))
  last = None
  for _ in range(num_batches):
    local = next(batches, None)
    if local is None:  # this shard is done: a batch of no rows, padded below
      local = {k: v[:0] for k, v in last.items()}
    last = {k: np.asarray(local[k]) for k in fields}
    yield pad_batch(last, local_size)


def pad_batch(batch: dict, size: int) -> dict:
  """Pads a (last, smaller) batch to `size` rows and adds 'valid' (1 for real rows), so that
  evaluation keeps one static shape."""
  n = len(batch["image"])
  out = {k: np.concatenate([v, np.zeros((size - n,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}
  out["valid"] = (np.arange(size) < n).astype(np.float32)
  return out



def load_images(source, indices, size: int, interpolation: str = "bicubic") -> np.ndarray:
  """A fixed set of images (uint8, N x size x size x 3), e.g. for reconstruction figures."""
  return np.stack([center_crop_resize(decode_image(source[int(i)]["image"]), size, interpolation)
                   for i in indices])


def normalize(images_uint8: jax.Array, mean, std) -> jax.Array:
  """uint8 pixels -> (x / 255 - mean) / std in float32, on device."""
  x = images_uint8.astype(jnp.float32) / 255.0
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def denormalize(images, mean, std):
  """Normalised images -> [0, 1] pixels (clipped)."""
  x = images * jnp.asarray(std, jnp.float32) + jnp.asarray(mean, jnp.float32)
  return jnp.clip(x, 0.0, 1.0)

