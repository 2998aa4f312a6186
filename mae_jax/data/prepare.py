"""Writes an image folder once into ArrayRecord shards (`python -m mae_jax.prepare`, which
says when to)."""

import concurrent.futures
import io
import multiprocessing
import os

from PIL import Image

from mae_jax import errors
from mae_jax.data import sources, transforms
from mae_jax.runtime import durable, host
from mae_jax.runtime.progress import PassProgress


def encoded_image(path: str, max_side: int, quality: int) -> bytes:
  """The file's bytes, or with `max_side` and a larger image, the image resized to that longer
  side as a JPEG. Unreadable files raise DataError naming them."""
  with open(path, "rb") as f:
    raw = f.read()
  try:  # every file decoded once now: a bad one stops this, not a training run later
    pixels = transforms.decode_image(raw)
  except errors.DataError as e:
    raise errors.DataError(f"image file {path!r}: {e}") from None
  if max_side <= 0 or max(pixels.shape[:2]) <= max_side:
    return raw  # stored as it is
  img = Image.fromarray(pixels)
  s = max_side / max(img.size)
  img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.BICUBIC)
  out = io.BytesIO()
  img.save(out, "JPEG", quality=quality)
  return out.getvalue()


def _encode(args):
  path, max_side, quality = args
  return encoded_image(path, max_side, quality)


def prepare(folder: str, out: str, splits=(), max_side: int = 0, quality: int = 90,
            shard_images: int = 50_000, workers: int = 0) -> dict:
  """Writes `folder`'s splits to `out`; returns the metadata written."""
  from array_record.python.array_record_module import ArrayRecordWriter
  if not os.path.isdir(folder):
    raise errors.DataError(f"image folder {folder!r} does not exist")
  splits = list(splits) or sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
  if not splits:
    raise errors.DataError(f"image folder {folder!r} has no split folders (<split>/<class>/<images>)")
  if os.path.isdir(out) and os.listdir(out):
    if os.path.exists(os.path.join(out, sources.PREPARED_METADATA)) or not _only_shards(out):
      raise errors.DataError(f"--out {out!r} is not empty; give a new folder (nothing was written)")
    # Shards without the metadata file that marks a folder complete: an interrupted prepare.
    print(f"{out} holds the shards of an interrupted prepare (no {sources.PREPARED_METADATA}); "
          "writing them again", flush=True)
    for entry in os.listdir(out):
      os.remove(os.path.join(out, entry))
  folders = {splits[0]: sources.ImageFolderSource(folder, splits[0])}
  classes = folders[splits[0]].classes
  for split in splits[1:]:  # the same classes in every split, or an error naming the difference
    folders[split] = sources.ImageFolderSource(folder, split, classes, splits[0])
  os.makedirs(out, exist_ok=True)
  meta = {"classes": classes, "source": os.path.abspath(folder), "max_side": max_side, "splits": {}}
  # spawn, not fork: this process has imported JAX, whose threads a fork would copy mid-flight.
  pool = concurrent.futures.ProcessPoolExecutor(workers or host.available_cores(),
                                                mp_context=multiprocessing.get_context("spawn"))
  try:
    for split, source in folders.items():
      n = len(source)
      num_shards = max(1, -(-n // shard_images))
      names = [f"{split}-{i:05d}-of-{num_shards:05d}.array_record" for i in range(num_shards)]
      jobs = ((path, max_side, quality) for path in source.files)
      encoded = pool.map(_encode, jobs, chunksize=64)
      progress = PassProgress(f"{split}", n)
      for i, name in enumerate(names):  # each under a temporary name until complete and on the disk
        with durable.replacing(os.path.join(out, name)) as tmp:
          writer = ArrayRecordWriter(tmp, "group_size:1")
          for index in range(i * shard_images, min(n, (i + 1) * shard_images)):
            writer.write(sources.encode_record(source.labels[index], next(encoded)))
            progress.update(index + 1)
          writer.close()
      meta["splits"][split] = {"count": n, "shards": names}
      print(f"{split}: {n} images in {num_shards} shard(s)", flush=True)
  finally:
    pool.shutdown(cancel_futures=True)
  durable.write_json(os.path.join(out, sources.PREPARED_METADATA), meta, indent=1)  # last: marks it complete
  return meta


def _only_shards(folder: str) -> bool:
  """Whether `folder` holds nothing but shards (and temporary copies) that prepare writes."""
  return all(e.endswith(".array_record") or (e.startswith(".") and durable.PARTIAL in e)
             for e in os.listdir(folder))
