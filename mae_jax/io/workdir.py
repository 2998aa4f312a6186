"""The workdir of a job: made writable before any work, and held by one run at a time.

Two runs on one workdir would resume from each other's checkpoints, overwrite them and
interleave their metrics. `hold(workdir)` takes an exclusive `flock` on `workdir/.lock.<process>`
for the job's duration and writes who holds it (pid, host, start, command) into that file. The
kernel drops the lock when the process ends, however it ends, so a lock file left by a crashed
or killed run is recognised as stale (it names a holder but nobody holds the lock) and taken over.

A workdir on a bucket (gs://...) has no flock: the lock is an object naming its holder, deleted when
the run ends. One left by a run that was killed is taken over when its holder was a process of this
host that is gone; one naming another host stops the run with how to remove it.
"""

import contextlib
import datetime
import errno
import fcntl
import functools
import json
import os
import socket
import sys

import jax

from mae_jax.errors import WorkdirError
from mae_jax.io import metrics as metrics_lib
from mae_jax.runtime import paths

_held = set()  # lock paths this process holds: a job may enter its workdir again (nested calls)


def ensure_writable(workdir: str) -> str:
  """Creates `workdir` if needed; raises WorkdirError when that or writing into it fails."""
  if paths.is_remote(workdir):
    if paths.isfile(workdir):
      raise WorkdirError(f"--workdir {workdir} is an object, not a folder; give a folder (new or existing)")
    paths.makedirs(workdir)
    return str(workdir).rstrip("/")
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise WorkdirError(f"--workdir {workdir} is a file, not a folder; give a folder (new or existing)")
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f"cannot create --workdir {workdir}: {e.strerror}; choose a folder you can "
                       "write to") from None
  return path


def _holder_record() -> dict:
  return {"pid": os.getpid(), "host": socket.gethostname(),
          "started": datetime.datetime.now().isoformat(timespec="seconds"),
          "command": " ".join([os.path.basename(sys.executable), *sys.argv])}


def _describe(record: dict) -> str:
  return (f"pid {record.get('pid')} on {record.get('host')}, started {record.get('started')}: "
          f"{record.get('command')}")


def _read_record(fd: int) -> dict:
  os.lseek(fd, 0, os.SEEK_SET)
  return _parse(os.read(fd, 65536).decode(errors="replace"))


def _parse(text: str) -> dict:
  text = text.strip()
  try:
    return json.loads(text) if text else {}
  except json.JSONDecodeError:
    return {"command": text[:200]}


def _alive_here(record: dict) -> bool:
  """Whether the recorded holder is a live process of this host (for file systems without flock)."""
  if record.get("host") != socket.gethostname() or not isinstance(record.get("pid"), int):
    return False
  try:
    os.kill(record["pid"], 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


@contextlib.contextmanager
def hold(workdir: str):
  """Holds `workdir` exclusively for this process while the block runs (re-entrant)."""
  path = os.path.join(ensure_writable(workdir), f".lock.{jax.process_index()}")
  if path in _held:
    yield
    return
  if paths.is_remote(path):
    with _hold_object(workdir, path):
      yield
    return
  try:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise WorkdirError(f"--workdir {workdir} is not writable ({e.strerror}); choose a folder you "
                       "can write to") from None
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    locked = True
  except OSError as e:
    if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN) and not _alive_here(_read_record(fd)):
      locked = False  # a file system without flock (some network mounts): the record decides
    else:
      other = _read_record(fd)
      os.close(fd)
      raise WorkdirError(
          f"--workdir {workdir} is in use by another run ({_describe(other)}); wait for it to end or "
          "stop it, or give this run another --workdir") from None
  previous = _read_record(fd)
  if previous:
    metrics_lib.log(f"workdir {workdir}: the run that held it ({_describe(previous)}) ended "
                    "without releasing it (crash or kill); taking it over")
  os.ftruncate(fd, 0)
  os.pwrite(fd, json.dumps(_holder_record()).encode(), 0)
  _held.add(path)
  try:
    yield
  finally:
    _held.discard(path)
    os.ftruncate(fd, 0)  # an empty lock file: released cleanly
    if locked:
      fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


@contextlib.contextmanager
def _hold_object(workdir: str, path: str):
  """`hold` for a workdir on an object store: the lock is an object naming its holder."""
  if paths.exists(path):
    other = _parse(paths.read_text(path))
    if other and not (other.get("host") == socket.gethostname() and not _alive_here(other)):
      raise WorkdirError(
          f"--workdir {workdir} is in use by another run ({_describe(other)}); wait for it to end or "
          f"stop it, or give this run another --workdir. If that run is gone (a machine that was "
          f"preempted or deleted), remove {path} and run again")
    if other:
      metrics_lib.log(f"workdir {workdir}: the run that held it ({_describe(other)}) ended "
                      "without releasing it (crash or kill); taking it over")
  paths.write_bytes(path, json.dumps(_holder_record()).encode())
  _held.add(path)
  try:
    yield
  finally:
    _held.discard(path)
    with contextlib.suppress(Exception):  # released; a failure here leaves a lock the next run takes over
      paths.remove(path)


def holding_workdir(job):
  """Decorates a job `job(config, workdir, ...)` to hold its workdir while it runs."""
  @functools.wraps(job)
  def run(config, workdir, *args, **kwargs):
    with hold(workdir):
      return job(config, workdir, *args, **kwargs)
  return run
