"""Paths anywhere: a local path, or a URL such as `gs://bucket/run` (any etils.epath / fsspec scheme).

Local paths go through `os` (durable writes fsync and rename them: runtime/durable.py). URLs go
through etils.epath's fsspec backend (gcsfs for gs://; `pip install -e ".[gcs]"`); orbax writes
checkpoint arrays to them through tensorstore. An object store writes an object whole or not at
all, so a URL is written directly under its final name: there is no partial object to rename.

For a local GCS API (tests, or trying a bucket layout without a project), set
`STORAGE_EMULATOR_HOST=http://HOST:PORT`: gcsfs reads it, and `mae_jax` points tensorstore at the
same server (`TENSORSTORE_GCS_HTTP_URL`) unless that is set already.
"""

import os
from typing import Iterator

from mae_jax.errors import UserError

# The fsspec implementation each scheme needs, and the extra that installs it.
_SCHEME_PACKAGES = {"gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs")}


def is_remote(path) -> bool:
  """Whether `path` is a URL (gs://...), not a path of this machine's file systems."""
  return "://" in str(path)


def absolute(path) -> str:
  """`path` made absolute; a URL is returned as it is."""
  return str(path) if is_remote(path) else os.path.abspath(path)


def epath(path):
  """An etils.epath.Path for `path`; a clear error when the scheme's package is not installed."""
  scheme = str(path).split("://", 1)[0] if is_remote(path) else None
  if scheme in _SCHEME_PACKAGES:
    package, extra = _SCHEME_PACKAGES[scheme]
    try:
      __import__(package)
    except ImportError:
      raise UserError(f"{path}: {scheme}:// paths need {package}: pip install -e \".[{extra}]\"") from None
  from etils import epath as epath_lib
  return epath_lib.Path(path)


def exists(path) -> bool:
  return epath(path).exists() if is_remote(path) else os.path.exists(path)


def isdir(path) -> bool:
  return epath(path).is_dir() if is_remote(path) else os.path.isdir(path)


def isfile(path) -> bool:
  return epath(path).is_file() if is_remote(path) else os.path.isfile(path)


def makedirs(path) -> None:
  """Creates the folder (on an object store: nothing to create, folders are name prefixes)."""
  if is_remote(path):
    epath(path).mkdir(parents=True, exist_ok=True)
  else:
    os.makedirs(path, exist_ok=True)


def listdir(path) -> list[str]:
  """The names in folder `path` (not their paths)."""
  if is_remote(path):
    return [p.name for p in epath(path).iterdir()]
  return os.listdir(path)


def walk(top) -> Iterator[tuple[str, list[str], list[str]]]:
  """os.walk for local folders and URLs alike (top-down)."""
  if not is_remote(top):
    yield from os.walk(top)
    return
  scheme = str(top).split("://", 1)[0] + "://"
  for folder, dirs, files in epath(top).walk():
    folder = str(folder)  # fsspec yields a bucket's folders without their scheme
    yield (folder if "://" in folder else scheme + folder.lstrip("/")), dirs, files


def read_bytes(path) -> bytes:
  if is_remote(path):
    return epath(path).read_bytes()
  with open(path, "rb") as f:
    return f.read()


def read_text(path) -> str:
  return read_bytes(path).decode()


def write_bytes(path, data: bytes) -> None:
  """Writes an object in one upload (whole or not at all). Local files: use durable.write_bytes."""
  assert is_remote(path), path
  epath(path).write_bytes(data)


def upload_tree(local: str, url: str) -> None:
  """Uploads every file under the local folder `local` to the same relative name under `url`."""
  for folder, _, files in os.walk(local):
    for name in sorted(files):
      path = os.path.join(folder, name)
      write_bytes(url.rstrip("/") + path[len(local.rstrip("/")):], read_bytes(path))


def remove(path) -> None:
  if is_remote(path):
    epath(path).unlink()
  else:
    os.remove(path)


def rmtree(path) -> None:
  if is_remote(path):
    epath(path).rmtree()
  else:
    import shutil
    shutil.rmtree(path)


def rename(src, dst) -> None:
  """Moves `src` to `dst` (on an object store: copies, then deletes, object by object)."""
  if is_remote(src) or is_remote(dst):
    epath(src).rename(dst)
  else:
    os.replace(src, dst)
