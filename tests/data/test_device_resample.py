"""data/device_resample.py: crops resampled in the step equal Pillow's, and the loader sends canvases."""

import jax
import numpy as np

from mae_jax.data import device_resample, pipeline, sources, transforms

from conftest import photo_jpeg, tiny_config


def test_crops_resampled_on_device_match_pillow(tmp_path):
  """dataset.resize_on='device': the crop goes out on a canvas, flipped or not, and the step's
  `resize_crops` gives Pillow's resample of it: bicubic and bilinear, boxes that fall between
  pixels (DCT-scaled), smaller than the output (upsampling) and too large for the canvas."""
  size = 48
  shapes = [(400, 300), (300, 400), (160, 120), (90, 70), (600, 75)]
  paths = [photo_jpeg(tmp_path / f"p{i}.jpg", w, h) for i, (w, h) in enumerate(shapes)]
  for interpolation in ("bicubic", "bilinear"):
    canvases, crops, expected = [], [], []
    for i in range(20):
      rng = np.random.default_rng(i)
      region, box = transforms.decode_image(paths[i % len(paths)],
                                      lambda b: transforms.decode_crop_region(b, rng, size, (0.1, 1.0)))
      flip = i % 2 == 1
      canvas, crop = transforms.crop_on_canvas(region, box, size, flip, interpolation)
      assert canvas.shape == (2 * size, 2 * size, 3) and crop.dtype == np.float32
      want = transforms.resize_region(region, box, size, interpolation)
      canvases.append(canvas), crops.append(crop), expected.append(want[:, ::-1] if flip else want)
    got = np.asarray(jax.jit(device_resample.train_images, static_argnums=1)(
        {"image": np.stack(canvases), device_resample.CROP_FIELD: np.stack(crops)}, interpolation))
    diff = np.abs(got.astype(int) - np.stack(expected).astype(int))
    assert got.shape == (20, size, size, 3) and got.dtype == np.uint8
    # Pillow rounds to 8 bits between its two passes and (in Pillow 13) picks their order
    # itself; this resample goes horizontal first.
    assert (diff <= 1).mean() > 0.995 and diff.mean() < 0.02, (diff.max(), diff.mean())
  assert all(c[4] <= 2 * size and c[5] <= 2 * size for c in crops)
  # The 600 x 75 image's boxes (mostly its central 100 x 75) exceed the 96 px canvas: resampled
  # on the host, sent as they are.
  assert any(tuple(c) == (0, 0, size, size, size, size) for c in crops)


def test_loader_sends_canvases_when_the_device_resamples(cifar_folder):
  """The same seed gives the same crops both ways: the host's batch equals the device's
  resample of the canvases (up to rounding)."""
  c = tiny_config(cifar_folder)
  c.dataset.random_resized_crop, c.dataset.hflip = True, True
  src = sources.ImageFolderSource(cifar_folder, "test")
  host = next(iter(pipeline.make_loader(c.dataset, src, train=True, global_batch_size=8, seed=5)))
  c.dataset.resize_on = "device"
  dev = next(iter(pipeline.make_loader(c.dataset, src, train=True, global_batch_size=8, seed=5)))
  assert dev["image"].shape == (8, 64, 64, 3) and dev[device_resample.CROP_FIELD].shape == (8, 6)
  got = np.asarray(device_resample.train_images(dev))
  assert np.abs(got.astype(int) - host["image"].astype(int)).max() <= 4
  assert (got == host["image"]).mean() > 0.97
