"""Write an image folder once into ArrayRecord shards, for data sets read for many epochs.

  python -m mae_jax.prepare --folder=DIR --out=OUT [--max_side=N] [--splits=train,val]

DIR holds <split>/<class>/<images> as for `--config.dataset.source=folder`. OUT gets, per split,
shards `<split>-00000-of-000NN.array_record` of records (label, encoded image) and metadata.json
(the class names, one label map taken from the first split, and the shards). Training then reads
a few large files instead of one file per image:

  python -m mae_jax.main --config=... --config.dataset.source=prepared --config.dataset.folder=OUT

With --max_side, images whose longer side exceeds N are resized (bicubic) to N and stored as
JPEG (quality --quality): decoding then costs less every epoch, at the price of crops taken from
the smaller image. Without it, the files' own bytes are stored unchanged.
"""

import concurrent.futures
import io
import json
import multiprocessing
import os
import sys

from absl import flags
from PIL import Image

from mae_jax import cli, data, host, sources

flags.DEFINE_string("folder", None, "Image folder: <folder>/<split>/<class>/<images>.")
flags.DEFINE_string("out", None, "Where the shards and metadata.json go (a new or empty folder).")
flags.DEFINE_string("splits", "", "Comma-separated splits (default: every sub-folder of --folder).")
flags.DEFINE_integer("max_side", 0, "Resize images whose longer side is larger to this (0: keep the bytes).")
flags.DEFINE_integer("quality", 90, "JPEG quality of resized images.")
flags.DEFINE_integer("shard_images", 50_000, "Images per shard.")
flags.DEFINE_integer("workers", 0, "Processes encoding images (0: one per core).")
flags.mark_flags_as_required(["folder", "out"])


def encoded_image(path: str, max_side: int, quality: int) -> bytes:
  """The file's bytes, or with `max_side` and a larger image, the image resized to that longer
  side as a JPEG. Unreadable files raise DataError naming them."""
  with open(path, "rb") as f:
    raw = f.read()
  try:  # every file decoded once now: a bad one stops this, not a training run later
    pixels = data.decode_image(raw)
  except data.DataError as e:
    raise data.DataError(f"image file {path!r}: {e}") from None
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
    raise data.DataError(f"image folder {folder!r} does not exist")
  splits = list(splits) or sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
  if not splits:
    raise data.DataError(f"image folder {folder!r} has no split folders (<split>/<class>/<images>)")
  if os.path.isdir(out) and os.listdir(out):
    raise data.DataError(f"--out {out!r} is not empty; give a new folder (nothing was written)")
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
      for i, name in enumerate(names):
        writer = ArrayRecordWriter(os.path.join(out, name), "group_size:1")
        for index in range(i * shard_images, min(n, (i + 1) * shard_images)):
          writer.write(sources.encode_record(source.labels[index], next(encoded)))
        writer.close()
      meta["splits"][split] = {"count": n, "shards": names}
      print(f"{split}: {n} images in {num_shards} shard(s)", flush=True)
  finally:
    pool.shutdown(cancel_futures=True)
  with open(os.path.join(out, sources.PREPARED_METADATA), "w") as f:  # last: marks the folder complete
    json.dump(meta, f, indent=1)
  return meta


def main(argv):
  del argv
  f = flags.FLAGS
  splits = [s for s in f.splits.split(",") if s]
  code = cli.run_guarded(lambda: prepare(f.folder, f.out, splits, f.max_side, f.quality,
                                         f.shard_images, f.workers))
  if code == 0:
    print(f"done: {f.out}; train on it with --config.dataset.source=prepared --config.dataset.folder={f.out}")
  return code


if __name__ == "__main__":
  sys.exit(cli.run_app(main))
