"""Shared fixtures. Tests run on CPU, offline; the CIFAR-10 copy comes from ../shared/data."""

import os
import pathlib
import tarfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
CIFAR_ARCHIVE = pathlib.Path(os.environ.get(
    "MAE_JAX_CIFAR10_JPEG", REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.xz"))


@pytest.fixture(scope="session")
def cifar_folder(tmp_path_factory) -> str:
  """The unpacked CIFAR-10 JPEG copy (root of train/ and test/); skips where the archive is absent."""
  if not CIFAR_ARCHIVE.exists():
    reason = f"CIFAR-10 copy not found at {CIFAR_ARCHIVE} (set MAE_JAX_CIFAR10_JPEG to its path)"
    if os.environ.get("CI"):  # CI has the copy: there a missing archive is a failure, not a skip
      pytest.fail(reason)
    pytest.skip(reason)
  cache = REPO / ".cache"
  root = cache / "cifar10-jpeg"
  if not (root / "test").is_dir():
    cache.mkdir(exist_ok=True)
    with tarfile.open(CIFAR_ARCHIVE) as tar:
      tar.extractall(cache, filter="data")
  return str(root)


def tiny_config(folder: str, **overrides):
  """The CPU-sized CIFAR-10 preset reading the image folder, with overrides (dotted keys)."""
  import sys
  sys.path.insert(0, str(REPO))
  from configs import cifar10_vit_t
  c = cifar10_vit_t.get_config("tiny")
  c.dataset.source, c.dataset.folder, c.dataset.num_workers = "folder", folder, 0
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c
