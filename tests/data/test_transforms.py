"""data/transforms.py, one image at a time: decoding as Pillow does, RandomResizedCrop as
torchvision draws it, crops decoded from only the bytes they need, the evaluation resize."""

import numpy as np
import pytest
from PIL import Image

from mae_jax import errors
from mae_jax.data import transforms

from conftest import photo_jpeg


def test_random_resized_crop_box_in_bounds_and_seeded():
  for seed in range(50):
    top, left, h, w = transforms.random_resized_crop_box(32, 48, np.random.default_rng(seed), (0.2, 1.0))
    assert 0 <= top and top + h <= 32 and 0 <= left and left + w <= 48 and h > 0 and w > 0
    assert 0.2 * 32 * 48 * 0.8 <= h * w  # area within the scale range (rounding aside)
  a = transforms.random_resized_crop_box(32, 32, np.random.default_rng(7), (0.2, 1.0))
  assert a == transforms.random_resized_crop_box(32, 32, np.random.default_rng(7), (0.2, 1.0))


def _torchvision_transforms():
  from benchmarks import torch_cpu
  return torch_cpu.tolerant_import("torchvision.transforms")


def _ks(a, b):
  """Two-sample Kolmogorov-Smirnov statistic."""
  grid = np.sort(np.concatenate([a, b]))
  return np.abs(np.searchsorted(np.sort(a), grid, "right") / len(a)
                - np.searchsorted(np.sort(b), grid, "right") / len(b)).max()


@pytest.mark.parametrize("h, w", [(375, 500), (60, 600)])  # a photo; a strip that often falls back
def test_random_resized_crop_boxes_follow_torchvisions_rule(h, w):
  """Boxes drawn with fixed seeds have torchvision's RandomResizedCrop.get_params distribution
  (area fraction, log aspect ratio, position, the central fallback)."""
  import torch
  tv_transforms = _torchvision_transforms()
  n = 20000
  ours = np.array([transforms.random_resized_crop_box(h, w, np.random.default_rng(s), (0.2, 1.0))
                   for s in range(n)], np.float64)
  torch.manual_seed(0)
  image = torch.zeros(1, h, w)
  theirs = np.array([tv_transforms.RandomResizedCrop.get_params(image, (0.2, 1.0), (3 / 4, 4 / 3))
                     for _ in range(n)], np.float64)
  for box in (ours, theirs):
    assert (box[:, 0] >= 0).all() and (box[:, 0] + box[:, 2] <= h).all()
    assert (box[:, 1] >= 0).all() and (box[:, 1] + box[:, 3] <= w).all()
  stats = lambda b: {"area": b[:, 2] * b[:, 3] / (h * w), "log_aspect": np.log(b[:, 3] / b[:, 2]),
                     "top": b[:, 0] / np.maximum(h - b[:, 2], 1), "left": b[:, 1] / np.maximum(w - b[:, 3], 1)}
  for name, a in stats(ours).items():
    assert _ks(a, stats(theirs)[name]) < 0.02, name  # 20,000 draws a side: noise is about 0.01
  fallback = lambda b: np.mean((b[:, 2] == b[:, 2].max()) & (b[:, 0] == (h - b[:, 2]) // 2))
  assert abs(fallback(ours) - fallback(theirs)) < 0.02


def _crop_of(image, seed: int, size: int, scale=(0.5, 1.0)):
  """TrainAugment's host crop of an encoded image (a path) with a fixed seed."""
  rng = np.random.default_rng(seed)
  region, box = transforms.decode_image(image, lambda b: transforms.decode_crop_region(b, rng, size, scale))
  return region, box, transforms.resize_region(region, box, size, "bicubic")


def test_random_crop_decodes_only_what_the_box_needs(tmp_path):
  """A big crop of a big JPEG decodes at a reduced DCT scale, draws the same box as decoding
  first, and gives nearly the same pixels; other formats go the decode-first way, bit for bit."""
  jpeg = photo_jpeg(tmp_path / "big.jpg", 1600, 1200)
  png = tmp_path / "big.png"
  Image.open(jpeg).save(png)
  full = _pillow_decode(jpeg)
  for seed in range(8):
    region, box, fast = _crop_of(jpeg, seed, 64)
    top, left, ch, cw = transforms.random_resized_crop_box(1200, 1600, np.random.default_rng(seed), (0.5, 1.0))
    assert region.shape[1] <= cw // 4 + 2  # the box is >= 800 px wide: 1/4 scale or less still gives 64
    assert min(box[2] - box[0], box[3] - box[1]) >= 64
    slow = transforms.resize(full[top:top + ch, left:left + cw], (64, 64), "bicubic")
    assert fast.shape == (64, 64, 3) and fast.dtype == np.uint8
    assert np.abs(fast.astype(int) - slow.astype(int)).mean() < 2.0  # of 255
    np.testing.assert_array_equal(_crop_of(str(png), seed, 64)[2], slow)


def _pillow_decode(path):
  with Image.open(path) as im:
    return transforms.to_rgb8(im)


def _jpegs_of_each_colour_space(tmp_path, w=300, h=200):
  """A colour, a greyscale and a CMYK JPEG of one photograph."""
  jpeg = photo_jpeg(tmp_path / "small.jpg", w, h)
  grey = tmp_path / "grey.jpg"
  Image.open(jpeg).convert("L").save(grey, quality=90)
  cmyk = tmp_path / "cmyk.jpg"
  Image.open(jpeg).convert("CMYK").save(cmyk, quality=90)
  return [jpeg, str(grey), str(cmyk)]


def test_jpegs_decode_as_pillow_does(tmp_path):
  """Whole JPEGs (libjpeg-turbo through simplejpeg for colour and greyscale files, Pillow for
  CMYK) give Pillow's pixels bit for bit, a 32 px CIFAR-sized file too; a truncated one is named."""
  paths = _jpegs_of_each_colour_space(tmp_path) + [photo_jpeg(tmp_path / "cifar.jpg", 32, 32)]
  for path in paths:
    got = transforms.decode_image(path)
    assert got.dtype == np.uint8 and got.shape[2] == 3
    np.testing.assert_array_equal(got, _pillow_decode(path))
  with open(paths[0], "rb") as f:
    head = f.read(2000)
  (tmp_path / "cut.jpg").write_bytes(head)
  with pytest.raises(errors.DataError, match="cut.jpg.*remove or replace it"):
    transforms.decode_image(str(tmp_path / "cut.jpg"))


def test_jpeg_crops_decode_as_pillow_does(tmp_path):
  """At full scale the JPEG path (libjpeg-turbo through simplejpeg) gives Pillow's decode of the
  box, bit for bit, for colour and greyscale files; CMYK files go through Pillow."""
  for path in _jpegs_of_each_colour_space(tmp_path):
    full = _pillow_decode(path)
    for seed in range(4):
      region, box, _ = _crop_of(path, seed, 128, (0.2, 1.0))  # boxes < 256 px: no DCT scaling
      top, left, ch, cw = transforms.random_resized_crop_box(200, 300, np.random.default_rng(seed), (0.2, 1.0))
      assert box == (0.0, 0.0, float(cw), float(ch))
      np.testing.assert_array_equal(region, full[top:top + ch, left:left + cw])


def test_a_corrupt_jpeg_is_named_when_the_crop_decodes_it(tmp_path):
  path = photo_jpeg(tmp_path / "cut.jpg", 400, 300)
  with open(path, "rb") as f:
    head = f.read(300)
  with open(path, "wb") as f:
    f.write(head)
  with pytest.raises(errors.DataError, match="cut.jpg"):
    _crop_of(path, 0, 32, (0.2, 1.0))


def test_center_crop_resize():
  img = np.zeros((20, 40, 3), np.uint8)
  img[:, 10:30] = 255  # the central 20 x 20 square
  out = transforms.center_crop_resize(img, 10, "nearest")  # nearest: no blending at the edges
  assert out.shape == (10, 10, 3)
  assert out.min() == 255  # only the central square survives the crop


def _palette_with_transparency():
  im = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), mode="P")
  im.putpalette([10, 20, 30, 200, 0, 0] + [0] * 762)
  im.info["transparency"] = 0  # index 0 is transparent
  return im


# (mode, file, hand-made image, expected 8-bit RGB of its pixels). Deeper modes scale by their
# range (convert("RGB") clipped them: a 16-bit image came out white), alpha composites onto white.
DECODE_CASES = [
    ("I;16", "png", Image.fromarray(np.array([[0, 257], [32896, 65535]], np.uint16)),
     [[0, 1], [128, 255]]),
    ("I;16B", "tif", Image.fromarray(np.array([[0, 257], [32896, 65535]], ">u2")), [[0, 1], [128, 255]]),
    ("I (16-bit values)", "tif", Image.fromarray(np.array([[0, 257], [32896, 65535]], np.int32)),
     [[0, 1], [128, 255]]),
    ("I (32-bit values)", "tif", Image.fromarray(np.array([[0, 2**23], [2**30, 2**31 - 1]], np.int32)),
     [[0, 1], [128, 255]]),
    ("F", "tif", Image.fromarray(np.array([[0.0, 0.25], [0.5, 1.0]], np.float32)), [[0, 64], [128, 255]]),
    ("LA", "png", Image.fromarray(np.array([[[100, 0], [100, 255]], [[100, 128], [0, 255]]], np.uint8), "LA"),
     [[255, 100], [177, 0]]),  # 100 * 128/255 + 255 * 127/255 = 177.2
    ("P with transparency", "png", _palette_with_transparency(),
     [[(255, 255, 255), (200, 0, 0)], [(200, 0, 0), (255, 255, 255)]]),
    ("RGBA", "png", Image.fromarray(np.array([[[10, 20, 30, 0], [10, 20, 30, 255]]], np.uint8), "RGBA"),
     [[(255, 255, 255), (10, 20, 30)]]),
    ("CMYK", "tif", Image.fromarray(np.array([[[0, 255, 255, 0], [0, 0, 0, 255]],
                                              [[128, 0, 0, 0], [0, 0, 0, 0]]], np.uint8), "CMYK"),
     [[(255, 0, 0), (0, 0, 0)], [(127, 255, 255), (255, 255, 255)]]),  # 255 (1 - C)(1 - K)
    ("1", "png", Image.fromarray(np.array([[0, 255]], np.uint8)).convert("1"), [[0, 255]]),
]


@pytest.mark.parametrize("mode, ext, image, expected", DECODE_CASES, ids=[c[0] for c in DECODE_CASES])
def test_decode_every_mode_to_8_bit_rgb(tmp_path, mode, ext, image, expected):
  path = tmp_path / f"img.{ext}"
  image.save(path, **({"transparency": 0} if mode == "P with transparency" else {}))
  with Image.open(path) as reopened:
    assert reopened.mode == mode.split(" ")[0]  # the file really holds that mode
  got = transforms.decode_image(str(path))
  want = np.asarray(expected, np.uint8)
  if want.ndim == 2:
    want = np.repeat(want[:, :, None], 3, axis=-1)
  assert got.dtype == np.uint8 and got.shape == want.shape
  np.testing.assert_array_equal(got, want)


def test_decode_refuses_values_without_a_defined_colour(tmp_path):
  path = tmp_path / "hdr.tif"
  Image.fromarray(np.array([[0.0, 2.5]], np.float32)).save(path)
  with pytest.raises(errors.DataError, match=r"hdr.tif.*values in \[0, 2.5\], outside \[0, 1\]"):
    transforms.decode_image(str(path))
