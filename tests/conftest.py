"""Shared fixtures. Tests run on CPU, offline; the CIFAR-10 copy comes from ../shared/data."""

import atexit
import fcntl
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
CIFAR_ARCHIVE = pathlib.Path(os.environ.get(
    "MAE_JAX_CIFAR10_JPEG", REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.xz"))

# The suite runs on the CPU. The dev extra brings libtpu and the CUDA plugin to compile for TPUs
# and GPUs (tests/tools/test_compile.py, tests/tools/test_targets.py); JAX itself, and every job the tests start, stays on the CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent XLA compilation cache for the session, its subprocesses included (they inherit
# the environment; JAX reads it when first imported, after this file). pytest-xdist's controller
# loads this file before it starts the test processes, so they share the controller's cache.
# Many tests and CLI runs compile the same tiny-preset programs; with the cache each is compiled
# once per session. A JAX_COMPILATION_CACHE_DIR set by the caller is used instead and kept.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _xla_cache = tempfile.mkdtemp(prefix="mae_jax_tests_xla_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _xla_cache
  atexit.register(shutil.rmtree, _xla_cache, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


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
  # Unpacked into a scratch folder and renamed into place once whole, with a marker beside it:
  # a run stopped mid-way (Ctrl-C, a killed CI job) must not leave a half folder that later
  # runs take for the data set.
  # Test workers running side by side (pytest -n) take turns: one unpacks, the others wait.
  unpacked = cache / "cifar10-jpeg.unpacked"
  cache.mkdir(exist_ok=True)
  with open(cache / "cifar10-jpeg.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not unpacked.exists():
      shutil.rmtree(root, ignore_errors=True)
      scratch = pathlib.Path(tempfile.mkdtemp(dir=cache, prefix=".unpacking-"))
      try:
        with tarfile.open(CIFAR_ARCHIVE) as tar:
          tar.extractall(scratch, filter="data")
        (scratch / "cifar10-jpeg").rename(root)
      finally:
        shutil.rmtree(scratch, ignore_errors=True)
      unpacked.touch()
  return str(root)


def tiny_config(folder: str, **overrides):
  """The CPU-sized CIFAR-10 preset reading the image folder, with overrides (dotted keys)."""
  from mae_jax import config_lib

  from configs import cifar10_vit_t
  c = cifar10_vit_t.get_config("tiny")
  c.dataset.source, c.dataset.folder, c.dataset.num_workers = "folder", folder, 0
  return config_lib.set_fields(c, overrides)


def run_losses(workdir) -> dict:
  """{step: loss} of every row of a run's metrics.jsonl."""
  import json
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  return {r["step"]: r["loss"] for r in rows}


def tiny_workdir(path) -> str:
  """A workdir holding freshly initialised weights of the tiny preset's MAE as checkpoint 0."""
  import jax
  import numpy as np

  from mae_jax.io import checkpointing
  from mae_jax.models.mae import mae_from_config
  c = tiny_config("unused")
  model = mae_from_config(c.model, c.dataset.image_size)
  params = model.init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3), np.float32),
                      np.zeros((1, model.num_patches), np.float32))["params"]
  checkpointing.write_workdir(jax.tree.map(np.asarray, params), c.to_dict(), str(path))
  return str(path)


def photo_jpeg(path, w, h) -> str:
  """A smooth synthetic photograph (gradients and a disc), saved as a quality-90 JPEG."""
  import numpy as np
  from PIL import Image
  yy, xx = np.mgrid[0:h, 0:w]
  img = np.stack([xx * 255 // w, yy * 255 // h, 128 + 100 * np.sin(xx / 37.0) * np.cos(yy / 23.0)], -1)
  img[(yy - h / 2) ** 2 + (xx - w / 3) ** 2 < (h / 4) ** 2] = (250, 30, 60)
  Image.fromarray(img.astype(np.uint8)).save(path, quality=90)
  return str(path)


def small_folder(cifar_folder, root, per_class=8, classes=("cat", "dog")):
  """A few CIFAR-10 images per class, linked into root/{train,test}/<class>/."""
  for split in ("train", "test"):
    for cls in classes:
      d = root / split / cls
      d.mkdir(parents=True)
      src = os.path.join(cifar_folder, split, cls)
      for name in sorted(os.listdir(src))[:per_class]:
        os.symlink(os.path.join(src, name), d / name)
  return str(root)


# What the tests run as a user does, and how they damage a checkpoint (shared by several files).
def run_cli(workdir, *overrides, folder=None, wait=True, module="mae_jax.main",
            config="configs/cifar10_vit_t.py:tiny"):
  args = [sys.executable, "-m", module, f"--config={REPO / config}", f"--workdir={workdir}"]
  if folder:
    args += ["--config.dataset.source=folder", f"--config.dataset.folder={folder}",
             "--config.dataset.num_workers=1"]
  args += list(overrides)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
  if not wait:
    # A session of its own: signals can go to its whole process group, as a terminal sends them.
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=REPO, start_new_session=True)
  return subprocess.run(args, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)


def _truncate_largest_array_file(step_dir):
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
  biggest = max(files, key=lambda p: p.stat().st_size)
  with open(biggest, "r+b") as f:
    f.truncate(1000)


CHECKPOINT_DAMAGE = {
    "truncated array file": _truncate_largest_array_file,
    "deleted array index": lambda step_dir: (step_dir / "state" / "manifest.ocdbt").unlink(),
    "empty config file": lambda step_dir: (step_dir / "config" / "metadata").write_text(""),
}
