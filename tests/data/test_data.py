"""Sources, decoding, augmentation and the grain loader: determinism and exact resume."""


import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from mae_jax import errors
from mae_jax import config_check
from mae_jax.data import pipeline
from mae_jax.data import transforms
from mae_jax.data import device_resample
from mae_jax.data import sources
from conftest import tiny_config


def _write_folder(root, n_per_class=3, size=(10, 14)):
  rng = np.random.default_rng(0)
  for split in ("train", "test"):
    for cls in ("b_cat", "a_dog"):
      d = root / split / cls
      d.mkdir(parents=True)
      for i in range(n_per_class):
        Image.fromarray(rng.integers(0, 255, (*size, 3), np.uint8)).save(d / f"{i}.png")
  return root


def test_image_folder_source(tmp_path):
  src = sources.ImageFolderSource(str(_write_folder(tmp_path)), "train")
  assert len(src) == 6 and src.classes == ["a_dog", "b_cat"]
  assert [src[i]["label"] for i in range(6)] == [0, 0, 0, 1, 1, 1]
  img = transforms.decode_image(src[0]["image"])
  assert img.shape == (10, 14, 3) and img.dtype == np.uint8


def test_image_folder_errors(tmp_path):
  with pytest.raises(errors.DataError, match="does not exist"):
    sources.ImageFolderSource(str(tmp_path), "train")
  (tmp_path / "train" / "cls").mkdir(parents=True)
  with pytest.raises(errors.DataError, match="holds no images"):
    sources.ImageFolderSource(str(tmp_path), "train")
  bad = tmp_path / "train" / "cls" / "broken.jpg"
  bad.write_bytes(b"not a jpeg at all")
  src = sources.ImageFolderSource(str(tmp_path), "train")
  with pytest.raises(errors.DataError, match="broken.jpg"):
    transforms.decode_image(src[0]["image"])


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


def _photo_jpeg(path, w, h):
  """A smooth synthetic photograph (gradients and a disc), saved as a quality-90 JPEG."""
  yy, xx = np.mgrid[0:h, 0:w]
  img = np.stack([xx * 255 // w, yy * 255 // h, 128 + 100 * np.sin(xx / 37.0) * np.cos(yy / 23.0)], -1)
  img[(yy - h / 2) ** 2 + (xx - w / 3) ** 2 < (h / 4) ** 2] = (250, 30, 60)
  Image.fromarray(img.astype(np.uint8)).save(path, quality=90)
  return str(path)


def _crop_of(image, seed: int, size: int, scale=(0.5, 1.0)):
  """TrainAugment's host crop of an encoded image (a path) with a fixed seed."""
  rng = np.random.default_rng(seed)
  region, box = transforms.decode_image(image, lambda b: transforms.decode_crop_region(b, rng, size, scale))
  return region, box, transforms.resize_region(region, box, size, "bicubic")


def test_random_crop_decodes_only_what_the_box_needs(tmp_path):
  """A big crop of a big JPEG decodes at a reduced DCT scale, draws the same box as decoding
  first, and gives nearly the same pixels; other formats go the decode-first way, bit for bit."""
  jpeg = _photo_jpeg(tmp_path / "big.jpg", 1600, 1200)
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
  jpeg = _photo_jpeg(tmp_path / "small.jpg", w, h)
  grey = tmp_path / "grey.jpg"
  Image.open(jpeg).convert("L").save(grey, quality=90)
  cmyk = tmp_path / "cmyk.jpg"
  Image.open(jpeg).convert("CMYK").save(cmyk, quality=90)
  return [jpeg, str(grey), str(cmyk)]


def test_jpegs_decode_as_pillow_does(tmp_path):
  """Whole JPEGs (libjpeg-turbo through simplejpeg for colour and greyscale files, Pillow for
  CMYK) give Pillow's pixels bit for bit, a 32 px CIFAR-sized file too; a truncated one is named."""
  paths = _jpegs_of_each_colour_space(tmp_path) + [_photo_jpeg(tmp_path / "cifar.jpg", 32, 32)]
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
  path = _photo_jpeg(tmp_path / "cut.jpg", 400, 300)
  with open(path, "rb") as f:
    head = f.read(300)
  with open(path, "wb") as f:
    f.write(head)
  with pytest.raises(errors.DataError, match="cut.jpg"):
    _crop_of(path, 0, 32, (0.2, 1.0))


def test_crops_resampled_on_device_match_pillow(tmp_path):
  """dataset.resize_on='device': the crop goes out on a canvas, flipped or not, and the step's
  `resize_crops` gives Pillow's resample of it: bicubic and bilinear, boxes that fall between
  pixels (DCT-scaled), smaller than the output (upsampling) and too large for the canvas."""
  size = 48
  shapes = [(400, 300), (300, 400), (160, 120), (90, 70), (600, 75)]
  paths = [_photo_jpeg(tmp_path / f"p{i}.jpg", w, h) for i, (w, h) in enumerate(shapes)]
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


def test_worker_count_from_the_cores():
  assert [pipeline.resolve_workers(-1, cores) for cores in (1, 2, 8, 96)] == [1, 1, 7, 32]
  assert pipeline.resolve_workers(0, 8) == 0 and pipeline.resolve_workers(5, 2) == 5


def test_center_crop_resize():
  img = np.zeros((20, 40, 3), np.uint8)
  img[:, 10:30] = 255  # the central 20 x 20 square
  out = transforms.center_crop_resize(img, 10, "nearest")  # nearest: no blending at the edges
  assert out.shape == (10, 10, 3)
  assert out.min() == 255  # only the central square survives the crop


def _first_batches(loader_iter, n):
  return [next(loader_iter)["image"] for _ in range(n)]


def test_loader_is_deterministic_and_resumes_exactly(cifar_folder):
  c = tiny_config(cifar_folder)
  c.dataset.random_resized_crop, c.dataset.hflip = True, True
  src = sources.ImageFolderSource(cifar_folder, "test")
  make = lambda: iter(pipeline.make_loader(c.dataset, src, train=True, global_batch_size=8, seed=3))
  run_a = _first_batches(make(), 5)
  run_b = _first_batches(make(), 5)
  for a, b in zip(run_a, run_b):
    np.testing.assert_array_equal(a, b)
  assert run_a[0].shape == (8, 32, 32, 3) and run_a[0].dtype == np.uint8
  # Save the state after 2 batches; a new iterator restored from it yields batches 3..5.
  it = make()
  _first_batches(it, 2)
  state = it.get_state()
  resumed = make()
  resumed.set_state(state)
  for a, b in zip(run_a[2:], _first_batches(resumed, 3)):
    np.testing.assert_array_equal(a, b)
  other_seed = next(iter(pipeline.make_loader(c.dataset, src, train=True, global_batch_size=8, seed=4)))["image"]
  assert not np.array_equal(other_seed, run_a[0])


def test_the_stream_does_not_depend_on_the_read_threads(cifar_folder):
  c = tiny_config(cifar_folder)
  src = sources.ImageFolderSource(cifar_folder, "test")
  streams = []
  for threads in (0, 1, 3):
    c.dataset.read_threads = threads
    streams.append(_first_batches(iter(pipeline.make_loader(c.dataset, src, train=True, global_batch_size=8,
                                                        seed=3)), 3))
  for other in streams[1:]:
    for a, b in zip(streams[0], other):
      np.testing.assert_array_equal(a, b)
  assert pipeline.read_options(3).prefetch_buffer_size == 12  # not grain's 500 (see read_options)


def test_eval_batches_cover_every_example_once_in_order(cifar_folder):
  c = tiny_config(cifar_folder)
  c.dataset.num_workers = 0
  src = sources.ImageFolderSource(cifar_folder, "test")
  subset = [src[i] for i in range(13)]
  batches = list(pipeline.eval_batches(c.dataset, subset, 4, ("image", "label")))
  assert len(batches) == 4 and all(b["image"].shape == (4, 32, 32, 3) for b in batches)
  np.testing.assert_array_equal(np.concatenate([b["valid"] for b in batches]), [1] * 13 + [0] * 3)
  labels = np.concatenate([b["label"] for b in batches])[:13]
  np.testing.assert_array_equal(labels, [r["label"] for r in subset])
  np.testing.assert_array_equal(batches[0]["image"][1], pipeline.load_images(subset, [1], 32)[0])


def test_process_slices_split_evenly_and_cover_every_record_once(monkeypatch):
  seen = []
  for index in range(3):
    monkeypatch.setattr(pipeline.jax, "process_count", lambda: 3)
    monkeypatch.setattr(pipeline.jax, "process_index", lambda index=index: index)
    part = pipeline.ProcessSlice(list(range(10)))
    seen.append([part[i] for i in range(len(part))])
  assert seen == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]


def test_tfds_source_with_mock_data():
  c = tiny_config("unused")
  c.dataset.source, c.dataset.name = "tfds", "cifar10"
  with tfds.testing.mock_data(num_examples=16):
    src = sources.make_source(c.dataset, "train")
    assert len(src) == 16
    batch = next(iter(pipeline.make_loader(c.dataset, src, train=True, global_batch_size=4, seed=0)))
  assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.uint8
  assert batch["label"].shape == (4,)


def test_normalize_round_trip():
  x = np.arange(256, dtype=np.uint8).reshape(1, 4, 64, 1).repeat(3, -1)
  mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
  n = pipeline.normalize(x, mean, std)
  np.testing.assert_allclose(n[0, 0, 1], (1 / 255 - np.array(mean)) / np.array(std), rtol=1e-6)
  np.testing.assert_allclose(pipeline.denormalize(n, mean, std), x / 255.0, atol=1e-6)


def _cifar_binary_archive(path, rng, train_per_file=2, test_images=3):
  """A tiny archive in CIFAR-10's binary format (label byte + 3072 bytes of R, G, B planes per
  record); returns the train and test (labels, images HWC) it holds."""
  import io
  import tarfile
  made = {}
  with tarfile.open(path, "w:gz") as tar:
    def add(name, payload):
      info = tarfile.TarInfo("cifar-10-batches-bin/" + name)
      info.size = len(payload)
      tar.addfile(info, io.BytesIO(payload))
    for split, files, n in (("train", [f"data_batch_{i}.bin" for i in range(1, 6)], train_per_file),
                            ("test", ["test_batch.bin"], test_images)):
      labels, images = [], []
      for name in files:
        y = rng.integers(0, 10, n, dtype=np.uint8)
        x = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        add(name, b"".join(bytes([int(l)]) + im.tobytes() for l, im in zip(y, x)))
        labels.append(y)
        images.append(x.transpose(0, 2, 3, 1))
      made[split] = (np.concatenate(labels), np.concatenate(images))
    add("batches.meta.txt", "\n".join(f"class_{i}" for i in range(10)).encode())
  return made


def test_tfds_downloads_and_prepares_cifar10_offline(tmp_path, monkeypatch):
  """The first-run path of the README's main command: tfds downloads CIFAR-10 (here from a server
  on 127.0.0.1 holding a tiny archive of the real format), prepares it as ArrayRecord into a data
  dir, and `make_source` reads it. A missing dependency of that path fails here."""
  import functools
  import http.server
  import threading
  from tensorflow_datasets.image_classification import cifar
  served = tmp_path / "served"
  served.mkdir()
  made = _cifar_binary_archive(served / "cifar-10-binary.tar.gz", np.random.default_rng(0))
  handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  url = f"http://127.0.0.1:{server.server_address[1]}/cifar-10-binary.tar.gz"
  info = cifar.Cifar10._cifar_info
  monkeypatch.setattr(cifar.Cifar10, "_cifar_info", property(lambda self: info.fget(self)._replace(url=url)))
  c = tiny_config("unused")
  c.dataset.source, c.dataset.name, c.dataset.tfds_data_dir = "tfds", "cifar10", str(tmp_path / "tfds")
  try:
    for split in ("train", "test"):
      src = sources.make_source(c.dataset, split)
      labels, images = made[split]
      assert len(src) == len(labels)
      got = sorted((int(src[i]["label"]), transforms.decode_image(src[i]["image"]).tobytes()) for i in range(len(src)))
      assert got == sorted((int(y), x.tobytes()) for y, x in zip(labels, images))
  finally:
    server.shutdown()
  assert list((tmp_path / "tfds" / "cifar10").glob("*/cifar10-train.array_record*"))


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


def _labelled_folder(root, classes_by_split):
  """root/<split>/<class>/ with one image per listed class (None: an empty class folder)."""
  for split, classes in classes_by_split.items():
    for cls, n in classes.items():
      d = root / split / cls
      d.mkdir(parents=True)
      for i in range(n or 0):
        Image.fromarray(np.full((4, 4, 3), 10 * i, np.uint8)).save(d / f"{i}.png")
  c = tiny_config(str(root))
  return c.dataset


def test_splits_share_one_label_map_and_empty_classes_are_skipped_alike(tmp_path, caplog):
  # 'b_empty' holds no images in either split: skipped in both, with a warning; 'c' is label 1
  # in both splits (listed per split, an empty folder in one split used to shift the labels).
  d = _labelled_folder(tmp_path, {"train": {"a": 2, "b_empty": None, "c": 2},
                                  "test": {"a": 1, "c": 1}})
  train, test = sources.labelled_sources(d)
  assert train.classes == test.classes == ["a", "c"]
  assert train.labels == [0, 0, 1, 1] and test.labels == [0, 1]
  assert "skipping 1 class folder(s) without images: b_empty" in caplog.text


@pytest.mark.parametrize("layout, message", [
    ({"train": {"a": 1, "b": 1, "c": 1}, "test": {"a": 1, "b": None, "c": 1}},
     "class 'b' has images in 'train' but not in 'test'"),
    ({"train": {"a": 1, "c": 1}, "test": {"a": 1, "b": 1, "c": 1}},
     "class 'b' has images in 'test' but not in 'train'"),
])
def test_splits_with_different_classes_are_an_error_naming_the_class(tmp_path, layout, message):
  d = _labelled_folder(tmp_path, layout)
  with pytest.raises(errors.DataError, match=message):
    sources.labelled_sources(d)


def test_resize_on_is_checked_and_the_host_resamples_by_default(cifar_folder):
  from mae_jax import config_check
  c = tiny_config(cifar_folder)
  c.dataset.random_resized_crop = True
  assert c.dataset.resize_on == "host" and not pipeline.train_augment(c.dataset).resize_on_device
  c.dataset.resize_on = "device"
  assert pipeline.train_augment(c.dataset).resize_on_device
  c.finetune.random_resized_crop, c.finetune.randaug_num_ops = True, 2  # RandAugment: on the host
  assert not pipeline.train_augment(c.dataset, c.finetune, randaug=True).resize_on_device
  c.dataset.resize_on = "gpu"
  with pytest.raises(errors.ConfigError, match="dataset.resize_on='gpu' must be one of host, device"):
    config_check.validate(c)
  c.dataset.resize_on, c.dataset.interpolation = "device", "nearest"
  with pytest.raises(errors.ConfigError, match="use --config.dataset.resize_on=host"):
    config_check.validate(c)


def test_label_subsets_are_balanced_seeded_nested_and_from_the_train_split(cifar_folder):
  c = tiny_config(cifar_folder, **{"dataset.label_fraction": 0.01})
  train, test = sources.labelled_sources(c.dataset)
  assert len(train) == 500 and len(test) == 10000  # the evaluation split stays whole
  labels = sources.source_labels(train)
  assert np.bincount(labels).tolist() == [50] * 10
  assert all("/train/" in train.source.files[i] for i in train.indices)
  assert sources.subset_info(train) == {"examples": 500, "of": 50000, "label_fraction": 0.01,
                                     "labels_per_class": 0, "label_seed": 0, "per_class_min": 50,
                                     "per_class_max": 50}
  again = sources.labelled_sources(c.dataset)[0]
  np.testing.assert_array_equal(again.indices, train.indices)  # identical for a seed
  c.dataset.label_seed = 1
  other = sources.labelled_sources(c.dataset)[0]
  assert len(set(other.indices) & set(train.indices)) < 50  # about 1% of 500 by chance
  c.dataset.label_seed, c.dataset.label_fraction = 0, 0.1
  assert set(train.indices) <= set(sources.labelled_sources(c.dataset)[0].indices)  # 1% inside 10%
  c.dataset.label_fraction, c.dataset.labels_per_class = 1.0, 7
  assert np.bincount(sources.source_labels(sources.labelled_sources(c.dataset)[0])).tolist() == [7] * 10


def test_label_subsets_pick_the_same_images_from_a_folder_and_its_prepared_copy(tmp_path):
  from mae_jax.data import prepare
  root = _write_folder(tmp_path / "images", n_per_class=20)
  prepare.prepare(str(root), str(tmp_path / "prepared"), workers=0)
  picked = {}
  for source, folder in (("folder", root), ("prepared", tmp_path / "prepared")):
    c = tiny_config(str(folder), **{"dataset.source": source, "dataset.label_fraction": 0.25})
    train = sources.labelled_sources(c.dataset)[0]
    assert np.bincount(sources.source_labels(train)).tolist() == [5, 5]
    picked[source] = [transforms.decode_image(train[i]["image"]).tobytes() for i in range(len(train))]
  assert picked["folder"] == picked["prepared"]


def test_label_subsets_of_a_tfds_source():
  c = tiny_config("unused", **{"dataset.source": "tfds", "dataset.labels_per_class": 2})
  with tfds.testing.mock_data(num_examples=60):
    train = sources.label_subset(sources.make_source(c.dataset, "train"), c.dataset)
    labels = sources.source_labels(train)
  assert len(train) == 2 * len(np.unique(labels)) and np.all(np.bincount(labels)[np.unique(labels)] == 2)


def test_label_subset_settings_are_checked():
  c = tiny_config("unused", **{"dataset.label_fraction": 0.1, "dataset.labels_per_class": 5})
  with pytest.raises(errors.ConfigError, match="both choose the label subset; set one"):
    config_check.validate(c)
  c.dataset.labels_per_class, c.dataset.label_fraction = 0, 0.0
  with pytest.raises(errors.ConfigError, match=r"dataset.label_fraction=0.0 must be in \(0, 1\]"):
    config_check.validate(c)
