"""mae_jax's training input feed against torchvision's, side by side on this machine.

  python -m benchmarks.feed_vs_torch [--folder=DIR] [--workers=2] [--batch=64] [--reps=5]
                                    [--resize_on=host|device]

Both sides read the same image folder (DIR/train/<class>/*.jpg) and do the MAE pretraining
augmentation: RandomResizedCrop(224, scale=(0.2, 1.0), bicubic), horizontal flip, batching.
mae_jax: its grain loader (`pipeline.make_loader`), uint8 batches as they go to the device (where
the normalisation happens), resampling the crop in the workers as mae_jax does by default. With
--resize_on=device the workers decode and crop, and the bicubic resample runs in the train step
(mae_jax/data/device_resample.py): its cost on this machine's JAX backend is printed separately, not
counted in the feed's figures. torchvision: `ImageFolder` + `RandomResizedCrop` + `RandomHorizontalFlip`
+ `ToTensor` + `Normalize` in a `DataLoader`, as the official MAE's main_pretrain.py. Each side
runs `--workers` worker processes; the repetitions alternate and the figures are medians, in
images per second per worker. The last line reads
`feed: mae_jax A img/s/worker, torchvision B img/s/worker, ratio R.RRx`. Each repetition starts
its side's workers afresh and ends them before the other side runs.

Without --folder, the script writes 2,000 ImageNet-sized JPEGs (random crops of about 500x375 of
the photographs that ship with scikit-image, quality 90) to a temporary folder first.
torch, torchvision and scikit-image come with the dev extra (pip install -e ".[dev]").
"""

import argparse
import gc
import os
import statistics
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SIZE = 224
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "retina",
          "hubble_deep_field")


def write_folder(root: str, count: int, seed: int = 0) -> str:
  """`count` JPEGs of about 500x375 (quality 90) in 10 classes under root/train."""
  import numpy as np
  import skimage.data
  from PIL import Image
  rng = np.random.default_rng(seed)
  photos = [Image.fromarray(getattr(skimage.data, name)()).convert("RGB") for name in PHOTOS]
  for i in range(count):
    photo = photos[i % len(photos)]
    w, h = (500, 375) if rng.random() < 0.75 else (375, 500)
    w, h = int(w * rng.uniform(0.9, 1.1)), int(h * rng.uniform(0.9, 1.1))
    # A random region of the photograph, resampled to w x h: every file differs.
    s = rng.uniform(0.5, 1.0)
    cw, ch = int(photo.width * s), int(photo.height * s)
    x, y = rng.integers(0, photo.width - cw + 1), rng.integers(0, photo.height - ch + 1)
    img = photo.resize((w, h), Image.BICUBIC, box=(x, y, x + cw, y + ch))
    folder = os.path.join(root, "train", f"class{i % 10}")
    os.makedirs(folder, exist_ok=True)
    img.save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)
  return root


def mae_jax_feed(folder: str, workers: int, batch: int, prepared: str = "", resize_on: str = "host"):
  """An endless iterator of mae_jax's training batches from `folder` (or the `prepared` one);
  with resize_on='device', canvases and crops for the train step to resample."""
  from mae_jax import config_lib
  from mae_jax.data import pipeline
  from mae_jax.data import sources
  config = config_lib.load_config_file(os.path.join(REPO, "configs", "imagenet_vit_b.py"), None)
  config.dataset.update(source="prepared" if prepared else "folder", folder=prepared or folder, image_size=SIZE, random_resized_crop=True,
                        crop_scale=(0.2, 1.0), hflip=True, interpolation="bicubic",
                        num_workers=workers, resize_on=resize_on)
  source = sources.make_source(config.dataset, "train")
  return iter(pipeline.make_loader(config.dataset, source, train=True, global_batch_size=batch, seed=0))


def torchvision_feed(folder: str, workers: int, batch: int):
  """An endless iterator of torchvision's batches, as the official MAE's main_pretrain.py."""
  from benchmarks import torch_cpu
  datasets = torch_cpu.tolerant_import("torchvision.datasets")
  transforms = torch_cpu.tolerant_import("torchvision.transforms")
  import torch
  transform = transforms.Compose([
      transforms.RandomResizedCrop(SIZE, scale=(0.2, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
      transforms.RandomHorizontalFlip(),
      transforms.ToTensor(),
      transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])
  dataset = datasets.ImageFolder(os.path.join(folder, "train"), transform=transform)
  loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                                       drop_last=True, persistent_workers=workers > 0)

  def forever():
    it = None
    try:
      while True:  # epoch after epoch; the persistent workers carry on between them
        it = iter(loader)
        yield from it
    finally:
      if hasattr(it, "_shutdown_workers"):  # on close(): stop the workers now
        it._shutdown_workers()
  return forever()


def device_resample_ms(folder: str, batch: int, prepared: str = "", reps: int = 5) -> float:
  """Milliseconds per image of the train step's resample (`device_resample.resize_crops`) on this
  machine's JAX backend, compiled, on one batch of the device feed."""
  import jax
  from mae_jax.data import device_resample
  batches = mae_jax_feed(folder, 0, batch, prepared, "device")
  b = {k: jax.device_put(v) for k, v in next(batches).items() if k in ("image", device_resample.CROP_FIELD)}
  resample = jax.jit(device_resample.train_images)
  resample(b).block_until_ready()
  t = time.perf_counter()
  for _ in range(reps):
    resample(b).block_until_ready()
  return (time.perf_counter() - t) / reps / batch * 1e3


def stop(batches) -> None:
  """Ends the worker processes of a side's iterator: the torch side's generator shuts its
  loader's workers down on close(); grain's iterator stops its workers once collected."""
  close = getattr(batches, "close", None)
  if close is not None:
    close()


def images_per_second(batches, batch: int, count: int) -> float:
  t = time.perf_counter()
  for _ in range(count):
    next(batches)
  return batch * count / (time.perf_counter() - t)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--folder", default="", help="image folder with a train/ split (default: write one)")
  p.add_argument("--prepared", default="", help="mae_jax reads this folder written by "
                 "python -m mae_jax.prepare from --folder instead of the image folder")
  p.add_argument("--images", type=int, default=2000, help="images to write when --folder is not given")
  p.add_argument("--workers", type=int, default=2, help="worker processes per side")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--batches", type=int, default=48, help="batches per timed repetition "
                 "(48 of 64: longer than one of torchvision's epochs of the default folder)")
  p.add_argument("--warmup", type=int, default=2, help="untimed batches after the workers start")
  p.add_argument("--reps", type=int, default=5, help="alternated repetitions per side")
  p.add_argument("--resize_on", choices=("host", "device"), default="host",
                 help="mae_jax's dataset.resize_on: 'device' sends "
                 "each crop on a canvas and the train step resamples it; 'host' resamples in the workers")
  a = p.parse_args()
  folder = a.folder
  if not folder:
    folder = tempfile.mkdtemp(prefix="mae_jax_feed_")
    print(f"writing {a.images} JPEGs of about 500x375 to {folder} ...", flush=True)
    write_folder(folder, a.images)
  sides = {"mae_jax": lambda: mae_jax_feed(folder, a.workers, a.batch, a.prepared, a.resize_on),
           "torchvision": lambda: torchvision_feed(folder, a.workers, a.batch)}
  per_worker = max(a.workers, 1)
  from mae_jax.runtime import host
  print(f"{host.cpu_description()} | {a.workers} worker(s) per side | folder {folder}"
        + (f" (mae_jax: prepared {a.prepared})" if a.prepared else "")
        + f" | mae_jax resamples on the {a.resize_on} | batch {a.batch} | {a.reps} alternated "
        f"repetitions of {a.batches} batches | RandomResizedCrop({SIZE}, scale=(0.2, 1.0), bicubic) + flip",
        flush=True)
  rates = {name: [] for name in sides}
  for rep in range(a.reps):
    for name, start in sides.items():
      # Fresh workers each time, and gone before the other side runs: neither side's workers fill
      # their buffers (or take the cores) while the other is timed. The first batches (worker
      # start-up) are not timed.
      batches = start()
      images_per_second(batches, a.batch, a.warmup)
      rates[name].append(images_per_second(batches, a.batch, a.batches) / per_worker)
      stop(batches)
      del batches
      gc.collect()
    print(f"rep {rep + 1}: " + ", ".join(f"{n} {r[-1]:.1f} img/s/worker" for n, r in rates.items()),
          flush=True)
  if a.resize_on == "device":
    import jax
    print(f"the train step's resample, not in the figures above: "
          f"{device_resample_ms(folder, a.batch, a.prepared):.2f} ms per image on "
          f"this machine's {jax.default_backend()} backend", flush=True)
  ours, theirs = (statistics.median(rates[n]) for n in ("mae_jax", "torchvision"))
  print(f"feed: mae_jax {ours:.1f} img/s/worker, torchvision {theirs:.1f} img/s/worker, "
        f"ratio {ours / theirs:.2f}x")


if __name__ == "__main__":
  main()
