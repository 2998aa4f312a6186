"""Sources: random access to a data set's records, `len()` and `[i]` -> {"image", "label"}.

  * tfds (`tfds.data_source`, ArrayRecord; downloaded and prepared on first use);
  * an image folder, `root/<split>/<class>/**/<image>` (`ImageFolderSource`);
  * a folder written by `python -m mae_jax.prepare` (`PreparedSource`).

`labelled_sources` gives the labelled training split of probing and fine-tuning, cut to the
config's class-balanced label subset (`label_subset`), and the evaluation split, whole.
"""

import dataclasses
import json
import os
import shutil
import struct
from typing import Optional, Sequence

import grain
import numpy as np
from absl import logging

from mae_jax.errors import DataError
from mae_jax.runtime import durable, paths

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
# Where an image has transparency, it is composited onto this colour (as it shows on a white page).


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


# ----------------------------------------------------------------------------
# Sources: random access, `len()` and `[i]` -> {"image": ..., "label": int}.
# ----------------------------------------------------------------------------
def _images_under(folder: str):
  """Image files below `folder`, in sorted order (nested folders, e.g. Tiny ImageNet's
  <wnid>/images/, included)."""
  for dirpath, dirnames, names in sorted(paths.walk(folder)):
    dirnames.sort()
    for name in sorted(names):
      if name.lower().endswith(IMAGE_EXTENSIONS):
        yield os.path.join(dirpath, name)


def folder_classes(root: str, split: str) -> list[str]:
  """The classes of `root/<split>/`: its class folders that hold at least one image, sorted.
  Folders without images are skipped (with a warning) the same way in every split."""
  split_dir = os.path.join(root, split)
  if not paths.isdir(split_dir):
    raise DataError(
        f"image folder {split_dir!r} does not exist; expected <folder>/{split}/<class>/*.jpg|png "
        f"(set --config.dataset.folder to the folder that holds '{split}/')")
  found = sorted(d for d in paths.listdir(split_dir) if paths.isdir(os.path.join(split_dir, d)))
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


# Where shards of a prepared folder on a bucket are copied to be read (ArrayRecord reads local files).
CACHE_DIR = os.environ.get("MAE_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "mae_jax"))


def _local_copy(url: str) -> str:
  """A local copy of the object `url` under CACHE_DIR/<scheme>/<bucket path>, made once (whole,
  renamed into place: runtime/durable.py) and reused while its size matches the object's."""
  scheme, rest = url.split("://", 1)
  local = os.path.join(CACHE_DIR, scheme, rest)
  remote = paths.epath(url)
  size = remote.stat().length
  if os.path.exists(local) and os.path.getsize(local) == size:
    return local
  logging.info("copying %s (%.1f MB) to %s", url, size / 1e6, local)
  os.makedirs(os.path.dirname(local), exist_ok=True)
  with durable.replacing(local) as tmp, remote.open("rb") as src, open(tmp, "wb") as dst:
    shutil.copyfileobj(src, dst, 16 << 20)
  return local


class PreparedSource:
  """A folder written by `python -m mae_jax.prepare`: ArrayRecord shards per split holding each
  image's encoded bytes and label, and metadata.json with the class names (one label map for
  every split) and the shard files."""

  def __init__(self, root: str, split: str):
    meta_path = os.path.join(root, PREPARED_METADATA)
    try:
      meta = json.loads(paths.read_text(meta_path))
    except (OSError, ValueError) as e:
      raise DataError(f"{root!r} is not a folder written by mae_jax.prepare ({meta_path}: {e}); "
                      f"write one with python -m mae_jax.prepare --folder=IMAGES --out={root}") from None
    if split not in meta["splits"]:
      raise DataError(f"prepared folder {root!r} has no split {split!r} (it has "
                      f"{', '.join(sorted(meta['splits']))})")
    self.classes = list(meta["classes"])
    self.shards = [os.path.join(root, name) for name in meta["splits"][split]["shards"]]
    if paths.is_remote(root):  # ArrayRecord reads local files: the shards are copied once
      self.shards = [_local_copy(p) for p in self.shards]
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
  def chosen(name):  # the config's split, else the dataset's default
    return getattr(info, name) if dataset_cfg[name] is None else dataset_cfg[name]
  return chosen("train_split" if labelled else "pretrain_split"), chosen("eval_split")


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


def num_classes(dataset_cfg, source) -> int:
  """Classes of a source: an image folder's class folders, else the registry's count."""
  return len(source.classes) if hasattr(source, "classes") else DATASETS[dataset_cfg.name].num_classes

