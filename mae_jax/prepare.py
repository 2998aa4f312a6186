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

import sys

from absl import flags

from mae_jax import cli
from mae_jax.data.prepare import prepare

flags.DEFINE_string("folder", None, "Image folder: <folder>/<split>/<class>/<images>.")
flags.DEFINE_string("out", None, "Where the shards and metadata.json go (a new or empty folder).")
flags.DEFINE_string("splits", "", "Comma-separated splits (default: every sub-folder of --folder).")
flags.DEFINE_integer("max_side", 0, "Resize images whose longer side is larger to this (0: keep the bytes).")
flags.DEFINE_integer("quality", 90, "JPEG quality of resized images.")
flags.DEFINE_integer("shard_images", 50_000, "Images per shard.")
flags.DEFINE_integer("workers", 0, "Processes encoding images (0: one per core).")
flags.mark_flags_as_required(["folder", "out"])


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
