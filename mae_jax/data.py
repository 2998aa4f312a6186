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
import functools
import io
import json
import math
import multiprocessing
import os
import signal
import struct
import threading
import time
from typing import Any, Iterator, Optional, Sequence

import grain
from absl import flags, logging
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import simplejpeg

from mae_jax import augment, masking
from mae_jax.host import available_cores

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
# Where an image has transparency, it is composited onto this colour (as it shows on a white page).
ALPHA_BACKGROUND = 255


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the code needs to know of a named dataset."""
  tfds_name: Optional[str]  # None: image folder only
  num_classes: int
  pretrain_split: str
  train_split: str
  eval_split: str


# Names accepted in `config.dataset.name`. Folder-only datasets read
# `<folder>/<split>/<class>/*.jpg|png`.
DATASETS = {
    "cifar10": DatasetInfo("cifar10", 10, "train", "train", "test"),
    "stl10": DatasetInfo("stl10", 10, "unlabelled", "train", "test"),
    "imagenette": DatasetInfo("imagenette", 10, "train", "train", "validation"),
    "imagenet2012": DatasetInfo("imagenet2012", 1000, "train", "train", "validation"),
    "tiny_imagenet": DatasetInfo(None, 200, "train", "train", "val"),
    "wikiart": DatasetInfo(None, 0, "train", "train", "test"),
    "image_folder": DatasetInfo(None, 0, "train", "train", "test"),
}


class DataError(ValueError):
  """Raised for data that cannot be read: missing folder, corrupt image."""


# ----------------------------------------------------------------------------
# Sources: random access, `len()` and `[i]` -> {"image": ..., "label": int}.
# ----------------------------------------------------------------------------
def _images_under(folder: str):
  """Image files below `folder`, in sorted order (nested folders, e.g. Tiny ImageNet's
  <wnid>/images/, included)."""
  for dirpath, dirnames, names in sorted(os.walk(folder)):
    dirnames.sort()
    for name in sorted(names):
      if name.lower().endswith(IMAGE_EXTENSIONS):
        yield os.path.join(dirpath, name)


def folder_classes(root: str, split: str) -> list[str]:
  """The classes of `root/<split>/`: its class folders that hold at least one image, sorted.
  Folders without images are skipped (with a warning) the same way in every split."""
  split_dir = os.path.join(root, split)
  if not os.path.isdir(split_dir):
    raise DataError(
        f"image folder {split_dir!r} does not exist; expected <folder>/{split}/<class>/*.jpg|png "
        f"(set --config.dataset.folder to the folder that holds '{split}/')")
  found = sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))
  classes = [c for c in found if next(_images_under(os.path.join(split_dir, c)), None)]
  empty = [c for c in found if c not in classes]
  if empty:
    logging.warning("image folder %r: skipping %d class folder(s) without images: %s", split_dir,
                    len(empty), ", ".join(empty))
  if not classes:
    raise DataError(
        f"image folder {split_dir!r} holds no images; expected {split}/<class>/*.jpg|png "
        f"(extensions {', '.join(IMAGE_EXTENSIONS)})")
  return classes


class ImageFolderSource:
  """`root/<split>/<class>/**/<file>`. Labels number `classes` (default: this split's own class
  folders, sorted); given, the split must hold exactly those classes, so that every split of a
  data set labels a class alike."""

  def __init__(self, root: str, split: str, classes: Optional[Sequence[str]] = None,
               classes_from: str = ""):
    found = folder_classes(root, split)
    if classes is not None and list(classes) != found:
      ref = f"'{classes_from}'" if classes_from else "the label map"
      extra = [c for c in found if c not in classes]
      missing = [c for c in classes if c not in found]
      what = [f"class '{c}' has images in '{split}' but not in {ref}" for c in extra]
      what += [f"class '{c}' has images in {ref} but not in '{split}'" for c in missing]
      raise DataError(f"the splits of image folder {root!r} disagree on their classes: "
                      f"{'; '.join(what)}. Every split needs the same class folders, each with images")
    self.classes = list(found)
    self.files, self.labels = [], []
    for label, cls in enumerate(self.classes):
      for path in _images_under(os.path.join(root, split, cls)):
        self.files.append(path)
        self.labels.append(label)

  def __len__(self):
    return len(self.files)

  def __getitem__(self, i):
    return {"image": self.files[i], "label": self.labels[i]}

  def __repr__(self):
    return f"ImageFolderSource({len(self)} images, {len(self.classes)} classes)"


PREPARED_METADATA = "metadata.json"


def encode_record(label: int, image_bytes: bytes) -> bytes:
  """One record of a prepared folder: the label (int32, little-endian), then the encoded image."""
  return struct.pack("<i", label) + image_bytes


class PreparedSource:
  """A folder written by `python -m mae_jax.prepare`: ArrayRecord shards per split holding each
  image's encoded bytes and label, and metadata.json with the class names (one label map for
  every split) and the shard files."""

  def __init__(self, root: str, split: str):
    meta_path = os.path.join(root, PREPARED_METADATA)
    try:
      with open(meta_path) as f:
        meta = json.load(f)
    except (OSError, ValueError) as e:
      raise DataError(f"{root!r} is not a folder written by mae_jax.prepare ({meta_path}: {e}); "
                      f"write one with python -m mae_jax.prepare --folder=IMAGES --out={root}") from None
    if split not in meta["splits"]:
      raise DataError(f"prepared folder {root!r} has no split {split!r} (it has "
                      f"{', '.join(sorted(meta['splits']))})")
    self.classes = list(meta["classes"])
    self.shards = [os.path.join(root, name) for name in meta["splits"][split]["shards"]]
    self._records = grain.sources.ArrayRecordDataSource(self.shards)
    if len(self._records) != meta["splits"][split]["count"]:
      raise DataError(f"prepared folder {root!r}, split {split!r}: the shards hold "
                      f"{len(self._records)} records, metadata.json says {meta['splits'][split]['count']}; "
                      "write the folder again")

  def __len__(self):
    return len(self._records)

  def __getitem__(self, i):
    record = self._records[i]
    return {"image": record[4:], "label": struct.unpack("<i", record[:4])[0]}

  def labels(self) -> list:
    """Every record's label, from the records' 4-byte headers (all records are read)."""
    out = []
    for start in range(0, len(self), 1024):
      records = self._records.__getitems__(range(start, min(start + 1024, len(self))))
      out += [struct.unpack("<i", r[:4])[0] for r in records]
    return out

  def __repr__(self):
    return f"PreparedSource({len(self)} images, {len(self.classes)} classes)"


def make_source(dataset_cfg, split: str, labels_from: str = ""):
  """The random-access source for one split of `config.dataset`. `labels_from` names the split
  whose classes define the labels (the labelled training split): an image folder's split must
  then hold the same classes. tfds data sets carry their own label map."""
  if dataset_cfg.source == "prepared":  # labels fixed when it was written, alike in every split
    return PreparedSource(dataset_cfg.folder, split)
  if dataset_cfg.source == "folder":
    # The label map's own split is numbered by its own classes; another split is checked against them.
    classes = folder_classes(dataset_cfg.folder, labels_from) if labels_from not in ("", split) else None
    return ImageFolderSource(dataset_cfg.folder, split, classes, labels_from)
  import tensorflow_datasets as tfds  # imported late: it is slow to import
  info = DATASETS[dataset_cfg.name]
  try:
    # ArrayRecord (random access, what grain reads) also when a data_dir is given: tfds then
    # leaves the format at its TFRecord default, which data_source cannot read.
    return tfds.data_source(info.tfds_name, split=split, data_dir=dataset_cfg.tfds_data_dir,
                            download=dataset_cfg.download,
                            builder_kwargs={"file_format": "array_record"})
  except Exception as e:  # tfds raises many kinds; say what to do
    raise DataError(
        f"could not open tfds dataset {info.tfds_name!r} split {split!r} "
        f"(data_dir={dataset_cfg.tfds_data_dir}): {e}\nWithout internet, point the config at a "
        "prepared tfds data dir (--config.dataset.tfds_data_dir=DIR) or at an image folder "
        "(--config.dataset.source=folder --config.dataset.folder=DIR).") from e


def resolved_splits(dataset_cfg, labelled: bool = False) -> tuple[str, str]:
  """(training split, evaluation split): the pretraining split, or with `labelled` the labelled
  training split of probing and fine-tuning."""
  info = DATASETS[dataset_cfg.name]
  train = (dataset_cfg.train_split or info.train_split) if labelled else (
      dataset_cfg.pretrain_split or info.pretrain_split)
  return train, dataset_cfg.eval_split or info.eval_split


def labelled_sources(dataset_cfg):
  """(labelled training source, evaluation source), labelled by one label map: the training
  split's (probe, fine-tune, kNN). The training source is the config's label subset of its split
  (`label_subset`); the evaluation split is always whole."""
  train_split, eval_split = resolved_splits(dataset_cfg, labelled=True)
  train = make_source(dataset_cfg, train_split, labels_from=train_split)
  return (label_subset(train, dataset_cfg), make_source(dataset_cfg, eval_split, labels_from=train_split))


class Subset:
  """The records `indices` of a source, in that order (its class names kept)."""

  def __init__(self, source, indices, info: Optional[dict] = None):
    self.source, self.indices = source, np.asarray(indices, np.int64)
    self.info = info  # how the subset was chosen (label_subset), for results.json
    if hasattr(source, "classes"):
      self.classes = source.classes

  def __len__(self):
    return len(self.indices)

  def __getitem__(self, i):
    return self.source[int(self.indices[i])]

  def __repr__(self):
    return f"Subset({len(self)} of {self.source!r})"


def evenly_spaced(source, n: int):
  """`n` records of a source evenly spaced from the first to the last (a fixed, ordered sample);
  n = 0 or n >= len: the whole source."""
  if 0 < n < len(source):
    return Subset(source, np.linspace(0, len(source) - 1, n).round().astype(int))
  return source


def source_labels(source) -> np.ndarray:
  """Every record's label: an image folder's from its paths, a prepared folder's from the records'
  headers, a tfds source's by reading its records (once; a large data set takes a while)."""
  if hasattr(source, "labels"):
    return np.asarray(source.labels() if callable(source.labels) else source.labels, np.int64)
  if len(source) > 100_000:
    logging.warning("reading the labels of %d records to draw the label subset", len(source))
  return np.array([int(source[i]["label"]) for i in range(len(source))], np.int64)


def label_subset_indices(labels: np.ndarray, fraction: float = 1.0, per_class: int = 0,
                         seed: int = 0) -> np.ndarray:
  """Sorted record indices of a class-balanced random subset: from every class, `per_class`
  records (> 0; all of a class that has fewer), else round(fraction x the class's count) (at
  least 1). The records of each class are drawn by one permutation seeded by `seed` and the
  class, so that a subset grows with the fraction (10% holds the 1% subset of the same seed)."""
  chosen = []
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    take = per_class if per_class > 0 else max(1, int(round(fraction * len(members))))
    order = np.random.default_rng([seed, int(c)]).permutation(len(members))
    chosen.append(members[order[:take]])
  return np.sort(np.concatenate(chosen))


def label_subset(source, dataset_cfg):
  """`source` (a labelled training split) cut to the config's label subset
  (`dataset.label_fraction`, `dataset.labels_per_class`, `dataset.label_seed`), or whole."""
  d = dataset_cfg
  if d.labels_per_class <= 0 and d.label_fraction >= 1.0:
    return source
  labels = source_labels(source)
  indices = label_subset_indices(labels, d.label_fraction, d.labels_per_class, d.label_seed)
  per_class = np.bincount(labels[indices])
  info = {"examples": len(indices), "of": len(source), "label_fraction": d.label_fraction,
          "labels_per_class": d.labels_per_class, "label_seed": d.label_seed,
          "per_class_min": int(per_class[per_class > 0].min()), "per_class_max": int(per_class.max())}
  if d.labels_per_class > 0 and info["per_class_min"] < d.labels_per_class:
    logging.warning("labels_per_class=%d: some classes have fewer (the smallest %d); all of theirs "
                    "are used", d.labels_per_class, info["per_class_min"])
  return Subset(source, indices, info)


def subset_info(source) -> Optional[dict]:
  """How a labelled training source was cut (`label_subset`), or None for a whole split."""
  return getattr(source, "info", None)


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


def random_resized_crop_box(h, w, rng: np.random.Generator, scale, ratio=(3 / 4, 4 / 3)):
  """torchvision's RandomResizedCrop.get_params: (top, left, height, width)."""
  area = h * w
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    cw = int(round(math.sqrt(target_area * aspect)))
    ch = int(round(math.sqrt(target_area / aspect)))
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


def decode_crop_region(data: bytes, rng: np.random.Generator, size: int, scale):
  """RandomResizedCrop's box, drawn from the header's size by `random_resized_crop_box`
  (torchvision's rule), and the decoded pixels that cover it, nothing more resampled.

  Returns (region, box): region uint8 (h, w, 3), box (left, top, right, bottom) in region pixels,
  as Pillow's `resize(box=...)` takes it. A JPEG decodes with libjpeg-turbo (simplejpeg; the same
  pixels as Pillow, about 25% faster) at the coarsest DCT scale 1/2^k that leaves the box at least
  `size` pixels each way, where the box may fall between pixels; other files decode whole.
  """
  hw = _jpeg_header(data)
  if hw is None:
    with Image.open(io.BytesIO(data)) as im:
      return crop_region(to_rgb8(im), rng, scale)
  h, w = hw
  top, left, ch, cw = random_resized_crop_box(h, w, rng, scale)
  k = 1  # the DCT scale 1/k; libjpeg-turbo's other (m/8) scales decode more slowly than 1/1
  while k < 8 and min(cw, ch) >= 2 * k * size:
    k *= 2
  img = simplejpeg.decode_jpeg(data, "RGB", min_height=-(-h // k), min_width=-(-w // k))
  sy, sx = img.shape[0] / h, img.shape[1] / w
  y0, x0, y1, x1 = top * sy, left * sx, (top + ch) * sy, (left + cw) * sx
  fy, fx = math.floor(y0), math.floor(x0)
  region = img[fy:min(math.ceil(y1), img.shape[0]), fx:min(math.ceil(x1), img.shape[1])]
  return region, (x0 - fx, y0 - fy, x1 - fx, y1 - fy)


def crop_region(img: np.ndarray, rng: np.random.Generator, scale):
  """`decode_crop_region` for a decoded uint8 image: (the box's pixels, the whole of them)."""
  top, left, ch, cw = random_resized_crop_box(img.shape[0], img.shape[1], rng, scale)
  return img[top:top + ch, left:left + cw], (0.0, 0.0, float(cw), float(ch))


def resize_region(region: np.ndarray, box, size: int, interpolation: str) -> np.ndarray:
  """The box of a region resampled to size x size on the host (Pillow), as torchvision's
  crop-then-resize: pixels outside the region do not take part."""
  if region.shape[:2] == (size, size) and tuple(box) == (0, 0, size, size):
    return region
  im = Image.fromarray(np.ascontiguousarray(region))
  return np.asarray(im.resize((size, size), _RESAMPLE[interpolation], box=tuple(box)))


# With dataset.resize_on='device', the loader sends each crop on a canvas this many times the
# image size (448 x 448 for 224) and the train step resamples it (`resize_crops`).
CANVAS_FACTOR = 2
# The crop field then sent with each canvas: the box (left, top, right, bottom) and the region's
# (width, height), in canvas pixels from its top-left corner. A mirrored crop has left > right.
CROP_FIELD = "crop"


def crop_on_canvas(region: np.ndarray, box, size: int, flip: bool, interpolation: str):
  """(canvas uint8 (F*size, F*size, 3), crop float32 (6,)): the region in the canvas's top-left
  corner for the train step to resample; `flip` swaps the box's left and right, which mirrors
  the resampled image. A region larger than the canvas (a box wider than F * size at the
  decoded scale, e.g. a tall box of a wide image) is resampled here instead and sent as a
  size x size region."""
  n = CANVAS_FACTOR * size
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


def _resample_weights(start, end, extent, out: int, n: int, interpolation: str):
  """(out, n) weights of Pillow's antialiased resample along one axis: output pixel i takes the
  box [start, end) of a row whose first `extent` of n pixels are the image (the rest padding);
  start > end samples it mirrored."""
  scale = (end - start) / out
  support = jnp.maximum(jnp.abs(scale), 1.0)  # downsampling widens the filter (antialiasing)
  center = start + (jnp.arange(out) + 0.5) * scale
  x = jnp.abs((jnp.arange(n) + 0.5 - center[:, None]) / support)
  if interpolation == "bicubic":  # Pillow's cubic, a = -0.5
    a = -0.5
    k = jnp.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                  jnp.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))
  else:  # bilinear: the triangle
    k = jnp.maximum(1.0 - x, 0.0)
  k = k * (jnp.arange(n) < extent)
  return k / jnp.sum(k, axis=-1, keepdims=True)


def resize_crops(canvases: jax.Array, crops: jax.Array, size: int,
                 interpolation: str = "bicubic") -> jax.Array:
  """On device: (B, n, n, 3) uint8 canvases and their (B, 6) crops (`crop_on_canvas`) ->
  (B, size, size, 3) uint8, Pillow's resample of each box: horizontal pass, rounding to uint8,
  vertical pass. Within 1 grey level of Pillow in over 99.5% of pixels (Pillow 13 chooses the
  order of its passes itself; where it goes vertical first a few pixels differ by up to 4). Two
  batched matrix products, about 0.4 GFLOP per 224 px image from a 448 canvas."""
  n = canvases.shape[-2]
  weights = jax.vmap(functools.partial(_resample_weights, out=size, n=n, interpolation=interpolation))
  wx = weights(crops[:, 0], crops[:, 2], crops[:, 4])
  wy = weights(crops[:, 1], crops[:, 3], crops[:, 5])
  hi = jax.lax.Precision.HIGHEST  # pixel values, not activations: no reduced-precision passes
  to_uint8 = lambda x: jnp.clip(jnp.floor(x + 0.5), 0, 255)
  rows = to_uint8(jnp.einsum("bsw,bhwc->bhsc", wx, canvases.astype(jnp.float32), precision=hi))
  return to_uint8(jnp.einsum("brh,bhsc->brsc", wy, rows, precision=hi)).astype(jnp.uint8)


def train_images(batch: dict, interpolation: str = "bicubic") -> jax.Array:
  """A train batch's uint8 images: as they came, or resampled here from their canvases when the
  loader sent crops (dataset.resize_on='device'; the canvas is CANVAS_FACTOR x the image size)."""
  if CROP_FIELD not in batch:
    return batch["image"]
  size = batch["image"].shape[-2] // CANVAS_FACTOR
  return resize_crops(batch["image"], batch[CROP_FIELD], size, interpolation)


def center_crop_resize(img: np.ndarray, size: int, interpolation: str) -> np.ndarray:
  """Resize the shorter side to `size`, then take the central size x size crop."""
  h, w = img.shape[:2]
  if (h, w) != (size, size):
    s = size / min(h, w)
    img = resize(img, (max(size, round(h * s)), max(size, round(w * s))), interpolation)
    h, w = img.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
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

  def random_map(self, element, rng: np.random.Generator):
    img = element["image"]
    if self.random_resized_crop:
      if is_encoded(img):  # decoded here, only as much as the crop needs
        region, box = decode_image(img, lambda b: decode_crop_region(b, rng, self.size, self.crop_scale))
      else:
        region, box = crop_region(img, rng, self.crop_scale)
      flip = self.hflip and rng.random() < 0.5
      if self.resize_on_device:
        canvas, crop = crop_on_canvas(region, box, self.size, flip, self.interpolation)
        return {**element, "image": canvas, CROP_FIELD: crop}
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


RESIZE_ON = ("auto", "host", "device")
DEVICE_INTERPOLATIONS = ("bicubic", "bilinear")


def resize_on_device(dataset_cfg, random_resized_crop: bool = True, randaug_num_ops: int = 0) -> bool:
  """Whether the train crop is resampled by the train step (dataset.resize_on): 'device' says so,
  'auto' on a GPU or TPU; never without a random crop, or with RandAugment (which works on the
  resampled image on the host)."""
  where = dataset_cfg.get("resize_on", "host")
  if not random_resized_crop or randaug_num_ops > 0 or where == "host":
    return False
  if dataset_cfg.interpolation not in DEVICE_INTERPOLATIONS:
    return False
  return where == "device" or jax.default_backend() != "cpu"


def train_augment(dataset_cfg, section=None) -> TrainAugment:
  """The train transform of `config.dataset`, with the crop/flip/RandAugment fields of a job's
  config section (`config.probe`, `config.finetune`) taking precedence where it has them."""
  get = lambda k, default: section[k] if section is not None and k in section else default
  crop, randaug = get("random_resized_crop", dataset_cfg.random_resized_crop), get("randaug_num_ops", 0)
  return TrainAugment(dataset_cfg.image_size, crop, tuple(get("crop_scale", dataset_cfg.crop_scale)),
                      get("hflip", dataset_cfg.hflip), dataset_cfg.interpolation, randaug,
                      get("randaug_magnitude", 9.0), get("randaug_magnitude_std", 0.5),
                      resize_on_device(dataset_cfg, crop, randaug))


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

  def map(self, element):
    return {**element, "image": center_crop_resize(element["image"], self.size, self.interpolation)}


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
    transforms = EvalResize(d.image_size, d.interpolation)
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


def num_classes(dataset_cfg, source) -> int:
  """Classes of a source: an image folder's class folders, else the registry's count."""
  return len(source.classes) if hasattr(source, "classes") else DATASETS[dataset_cfg.name].num_classes


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
