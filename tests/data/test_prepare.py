"""python -m mae_jax.prepare: an image folder written once into ArrayRecord shards."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mae_jax import config_check, errors
from mae_jax.data import pipeline, prepare, sources, transforms
from mae_jax.runtime import durable

from conftest import REPO, tiny_config


def _folder(root):
  """train/ and test/ with 3 classes: JPEGs of 40x30 and 120x90, a PNG, a grayscale JPEG."""
  rng = np.random.default_rng(0)
  for split, n in (("train", 4), ("test", 2)):
    for c in ("cat", "dog", "eel"):
      d = root / split / c
      d.mkdir(parents=True)
      for i in range(n):
        size = (120, 90) if i % 2 else (40, 30)
        img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        if i == 2:
          img.save(d / f"{i}.png")
        elif i == 3:
          img.convert("L").save(d / f"{i}.jpg", quality=90)
        else:
          img.save(d / f"{i}.jpg", quality=90)
  return str(root)


def test_prepared_folder_feeds_the_same_batches_as_the_image_folder(tmp_path):
  folder = _folder(tmp_path / "images")
  meta = prepare.prepare(folder, str(tmp_path / "prep"), shard_images=5, workers=1)
  assert meta["classes"] == ["cat", "dog", "eel"] and meta["splits"]["train"]["count"] == 12
  assert len(meta["splits"]["train"]["shards"]) == 3  # 12 images, 5 per shard
  for split in ("train", "test"):
    images, prepared = sources.ImageFolderSource(folder, split), sources.PreparedSource(str(tmp_path / "prep"), split)
    assert len(prepared) == len(images) and prepared.classes == images.classes
    for i in range(len(images)):
      assert prepared[i]["label"] == images[i]["label"]
      np.testing.assert_array_equal(transforms.decode_image(prepared[i]["image"]), transforms.decode_image(images[i]["image"]))
  # The training loader (random resized crop, flip) gives the same batches from either source.
  c = tiny_config(folder)
  c.dataset.random_resized_crop, c.dataset.hflip = True, True
  p = tiny_config(str(tmp_path / "prep"))
  p.dataset.source = "prepared"
  p.dataset.random_resized_crop, p.dataset.hflip = True, True
  config_check.validate(p, ("pretrain",))
  batches = []
  for cfg in (c, p):
    loader = pipeline.make_loader(cfg.dataset, sources.make_source(cfg.dataset, "train"), train=True, global_batch_size=4, seed=1)
    it = iter(loader)
    batches.append([next(it) for _ in range(4)])
  for a, b in zip(*batches):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])


def test_max_side_shrinks_only_larger_images(tmp_path):
  folder = _folder(tmp_path / "images")
  prepare.prepare(folder, str(tmp_path / "prep"), ["train"], max_side=64, workers=1)
  images, prepared = sources.ImageFolderSource(folder, "train"), sources.PreparedSource(str(tmp_path / "prep"), "train")
  for i in range(len(images)):
    original = transforms.decode_image(images[i]["image"])
    stored = transforms.decode_image(prepared[i]["image"])
    if original.shape[1] > 64:  # 120x90 -> 64x48, close to a bicubic resize of the original
      assert stored.shape == (48, 64, 3)
      want = transforms.resize(original, (48, 64), "bicubic").astype(int)
      assert np.abs(stored.astype(int) - want).mean() < 12  # JPEG of random noise
    else:  # stored unchanged, whatever the format
      with open(images[i]["image"], "rb") as f:
        assert prepared[i]["image"] == f.read()


def test_bad_input_is_named_nothing_half_written_is_readable_and_the_same_command_then_works(tmp_path):
  folder = _folder(tmp_path / "images")
  broken = tmp_path / "images" / "train" / "dog" / "broken.jpg"
  broken.write_bytes(b"\xff\xd8 not a jpeg")
  out = tmp_path / "prep"
  result = subprocess.run([sys.executable, "-m", "mae_jax.prepare", f"--folder={folder}", f"--out={out}"],
                          capture_output=True, text=True, cwd=REPO)
  assert result.returncode == 2 and "broken.jpg" in result.stderr
  assert not (out / sources.PREPARED_METADATA).exists()
  with pytest.raises(errors.DataError, match="not a folder written by mae_jax.prepare"):
    sources.PreparedSource(str(out), "train")
  assert not [e for e in os.listdir(out) if durable.PARTIAL in e]  # no half-written shard
  broken.unlink()
  # The same command again writes the interrupted folder anew; a complete one is never overwritten.
  meta = prepare.prepare(folder, str(out), workers=1)
  assert sources.PreparedSource(str(out), "train").classes == meta["classes"]
  with pytest.raises(errors.DataError, match="is not empty"):
    prepare.prepare(folder, str(out), workers=1)
  prepare.prepare(folder, str(tmp_path / "prep2"), ["train"], workers=1)
  with pytest.raises(errors.DataError, match="no split 'test'"):
    sources.PreparedSource(str(tmp_path / "prep2"), "test")
  with open(tmp_path / "prep2" / sources.PREPARED_METADATA) as f:
    assert json.load(f)["splits"]["train"]["count"] == 12
  c = tiny_config(folder)
  c.dataset.source, c.dataset.folder = "prepared", ""
  with pytest.raises(errors.ConfigError, match="needs --config.dataset.folder"):
    config_check.validate(c, ("pretrain",))
