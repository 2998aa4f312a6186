"""Files a user keeps, written so that a kill, a full disk or a power cut never leaves a broken
file under the final name: each is written under a temporary name beside it, flushed to the disk
(fsync of the file, or of every file and folder of a tree), renamed into place, and the rename
itself flushed (fsync of the parent folder). Until the rename the final name holds what it held
before (nothing, or the previous version); after it, the new content, on the disk.

Temporary names are `.<name>.partial-<pid>`; one left by a killed process is removed by the next
write to the same name (`remove_stale`).

A URL (gs://...) is written from a local temporary copy in one upload per file: an object store
shows an object whole or not at all (runtime/paths.py).
"""

import contextlib
import errno
import json
import os
import shutil
import tempfile
from typing import Iterator, Optional

from mae_jax.runtime import paths

PARTIAL = ".partial-"


def fsync_file(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def fsync_dir(path: str) -> None:
  """Flushes a folder's entries (a file created, renamed or removed in it) to the disk."""
  try:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
  except OSError as e:
    if e.errno in (errno.EACCES, errno.EISDIR):  # some file systems do not open folders
      return
    raise
  try:
    os.fsync(fd)
  except OSError as e:
    if e.errno != errno.EINVAL:  # file systems that cannot fsync a folder say EINVAL
      raise
  finally:
    os.close(fd)


def sync_tree(root: str) -> None:
  """fsync of every file and folder under `root` (files first, each folder after its content),
  then of `root`'s parent, which holds `root`'s own entry."""
  for folder, _, files in os.walk(root, topdown=False):
    for name in files:
      fsync_file(os.path.join(folder, name))
    fsync_dir(folder)
  fsync_dir(os.path.dirname(os.path.abspath(root)))


def storage_fault(folder: str) -> Optional[OSError]:
  """The error writing (and flushing) a small file in `folder` gives, if it is a storage fault (no
  space, read-only, I/O error); None when the write works. Tells the cause of a failure that a
  library reported without it (a missing temporary folder, a closed handle)."""
  from mae_jax.errors import STORAGE_ERRNOS
  if paths.is_remote(folder):
    return None
  path = os.path.join(folder, f".write-probe-{os.getpid()}")
  try:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
      os.write(fd, b"\0" * 4096)
      os.fsync(fd)
    finally:
      os.close(fd)
      with contextlib.suppress(OSError):
        os.remove(path)
  except OSError as e:
    return e if e.errno in STORAGE_ERRNOS else None
  return None


def partial_name(final: str) -> str:
  head, name = os.path.split(os.path.abspath(final))
  return os.path.join(head, f".{name}{PARTIAL}{os.getpid()}")


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def remove_stale(final: str) -> list[str]:
  """Removes the temporary copies of `final` that killed processes left; returns their paths."""
  head, name = os.path.split(os.path.abspath(final))
  prefix = f".{name}{PARTIAL}"
  removed = []
  if not os.path.isdir(head):
    return removed
  for entry in os.listdir(head):
    if not entry.startswith(prefix) or not entry[len(prefix):].isdigit():
      continue
    if int(entry[len(prefix):]) != os.getpid() and _alive(int(entry[len(prefix):])):
      continue  # another process is writing it now
    path = os.path.join(head, entry)
    shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
    removed.append(path)
  return removed


def _remove(path: str) -> None:
  if os.path.isdir(path) and not os.path.islink(path):
    shutil.rmtree(path, ignore_errors=True)
  elif os.path.lexists(path):
    with contextlib.suppress(OSError):
      os.remove(path)


@contextlib.contextmanager
def replacing(final: str, replace: bool = True) -> Iterator[str]:
  """Yields a temporary path beside `final` to write a file or a folder to; when the block ends
  without an error, flushes it and renames it to `final`, then flushes the rename. On an error
  (or a signal's exception) the temporary copy is removed and `final` is as it was.

  A folder replaces only a missing or empty `final`; a file replaces an existing one when
  `replace`."""
  if paths.is_remote(final):
    with _uploading(final, replace) as tmp:
      yield tmp
    return
  final = os.path.abspath(final)
  remove_stale(final)
  tmp = partial_name(final)
  _remove(tmp)
  try:
    yield tmp
    if os.path.isdir(tmp):
      sync_tree(tmp)
      if os.path.lexists(final) and not (os.path.isdir(final) and not os.listdir(final)):
        raise FileExistsError(errno.EEXIST, "exists; it is left as it was", final)
      os.rename(tmp, final)  # replaces an empty folder
    else:
      fsync_file(tmp)
      if not replace and os.path.lexists(final):
        raise FileExistsError(errno.EEXIST, "exists; it is left as it was", final)
      os.replace(tmp, final)
    fsync_dir(os.path.dirname(final))
  except BaseException:
    _remove(tmp)
    raise


@contextlib.contextmanager
def _uploading(final: str, replace: bool) -> Iterator[str]:
  """`replacing` for a URL: the block writes a local temporary file or folder, then each file is
  uploaded as one object (a folder's files one by one, under `final`)."""
  with tempfile.TemporaryDirectory(prefix="mae-jax-upload-") as scratch:
    tmp = os.path.join(scratch, os.path.basename(final.rstrip("/")))
    yield tmp
    if os.path.isdir(tmp):
      if paths.exists(final) and paths.listdir(final):
        raise FileExistsError(errno.EEXIST, "exists; it is left as it was", final)
      paths.upload_tree(tmp, final)
    else:
      if not replace and paths.exists(final):
        raise FileExistsError(errno.EEXIST, "exists; it is left as it was", final)
      paths.write_bytes(final, paths.read_bytes(tmp))


def write_bytes(path: str, data: bytes) -> None:
  if paths.is_remote(path):
    paths.write_bytes(path, data)  # one upload: whole or not at all
    return
  with replacing(path) as tmp, open(tmp, "wb") as f:
    f.write(data)


def write_text(path: str, text: str) -> None:
  write_bytes(path, text.encode())


def write_json(path: str, obj, indent: int = 2) -> None:
  write_text(path, json.dumps(obj, indent=indent))
