"""data/sources.py: image folders, tfds (mock and offline-prepared CIFAR-10), one label map across
splits, class-balanced label subsets."""

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from mae_jax import config_check, errors
from mae_jax.data import pipeline, sources, transforms

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


def test_tfds_source_with_mock_data():
  c = tiny_config("unused")
  c.dataset.source, c.dataset.name = "tfds", "cifar10"
  with tfds.testing.mock_data(num_examples=16):
    src = sources.make_source(c.dataset, "train")
    assert len(src) == 16
    batch = next(iter(pipeline.make_loader(c.dataset, src, train=True, global_batch_size=4, seed=0)))
  assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.uint8
  assert batch["label"].shape == (4,)


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
