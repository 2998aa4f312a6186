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
import multiprocessing
import os
import signal
import threading
import time
from typing import Iterator, Optional, Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from mae_jax.data import augment, device_resample, transforms
from mae_jax.models import masking
from mae_jax.runtime.host import available_cores

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
    if not (self.defer and transforms.is_encoded(image)):
      image = transforms.decode_image(image)
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
      if transforms.is_encoded(img):  # decoded here, only as much as the crop needs
        region, box = transforms.decode_image(img, lambda b: transforms.decode_crop_region(
            b, rng, self.size, self.crop_scale, self.crop_mode))
      else:
        region, box = transforms.crop_region(img, rng, self.crop_scale, self.crop_mode)
      flip = self.hflip and rng.random() < 0.5
      if self.resize_on_device:
        canvas, crop = transforms.crop_on_canvas(region, box, self.size, flip, self.interpolation)
        return {**element, "image": canvas, device_resample.CROP_FIELD: crop}
      img = transforms.resize_region(region, box, self.size, self.interpolation)
    else:
      img = transforms.center_crop_resize(img, self.size, self.interpolation)
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
  return TrainAugment(size=dataset_cfg.image_size, random_resized_crop=s.random_resized_crop,
                      crop_scale=tuple(s.crop_scale), hflip=s.hflip, interpolation=dataset_cfg.interpolation,
                      randaug_num_ops=ops, randaug_magnitude=magnitude, randaug_magnitude_std=magnitude_std,
                      resize_on_device=device_resample.enabled(dataset_cfg, s.random_resized_crop, ops),
                      crop_mode=s.crop_mode)


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
    return {**element, "image": transforms.center_crop_resize(element["image"], self.size, self.interpolation,
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


def make_loader(dataset_cfg, source, *, train: bool, global_batch_size: int, seed: int,
                augment=None,
                worker_count: Optional[int] = None) -> grain.DataLoader:
  """A grain DataLoader yielding this process's share of each global batch.

  Training loaders shuffle and repeat forever (epochs are counted by the trainer) and apply
  `augment`, one transform or a list (default: the pretraining transform of `dataset_cfg`,
  a `config.dataset`);
  evaluation loaders make one
  ordered pass, resize + center crop, and keep the last, smaller batch. Each process reads only
  its shard.
  """
  d = dataset_cfg
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


def eval_batches(dataset_cfg, source, global_batch_size: int, fields: Sequence[str]) -> Iterator[dict]:
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
  batches = iter(make_loader(dataset_cfg, source, train=False, global_batch_size=global_batch_size, seed=0))
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
  return np.stack([transforms.center_crop_resize(transforms.decode_image(source[int(i)]["image"]), size,
                                                 interpolation)
                   for i in indices])


def normalize(images_uint8: jax.Array, mean, std) -> jax.Array:
  """uint8 pixels -> (x / 255 - mean) / std in float32, on device."""
  x = images_uint8.astype(jnp.float32) / 255.0
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def denormalize(images, mean, std):
  """Normalised images -> [0, 1] pixels (clipped)."""
  x = images * jnp.asarray(std, jnp.float32) + jnp.asarray(mean, jnp.float32)
  return jnp.clip(x, 0.0, 1.0)

