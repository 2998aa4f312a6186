"""What a failed orbax read or write prints besides its own error, kept out of the user's way:
the root cause in one line (`failure_reason`), and the tracebacks of background threads muted
(`quiet_background_failures` around a read; `quiet_storage_fault_noise` for a full disk)."""

import contextlib
import gc
import logging
import sys
import threading
import time
from typing import Optional

from mae_jax import errors


def failure_reason(e: BaseException, limit: int = 300) -> str:
  """The root cause of a failed read, in one line (orbax and tensorstore wrap it several times)."""
  while e.__cause__ is not None:
    e = e.__cause__
  text = str(e).strip().splitlines()[0] if str(e).strip() else ""
  text = f"{type(e).__name__}: {text}" if text else type(e).__name__
  return text if len(text) <= limit else text[:limit] + "..."


@contextlib.contextmanager
def quiet_background_failures():
  """Mutes what a failed orbax read leaves behind besides its own exception: its other
  concurrent reads fail in tensorstore's threads and in coroutines nobody awaits any more, and
  print thousands of lines ('Event loop is closed', 'Task exception was never retrieved') that
  say nothing the reported reason does not. The exception of the read itself is unaffected."""
  hooks = sys.excepthook, sys.unraisablehook, threading.excepthook
  asyncio_logger = logging.getLogger("asyncio")
  level = asyncio_logger.level
  sys.excepthook = lambda *a: None
  sys.unraisablehook = threading.excepthook = lambda *a: None
  asyncio_logger.setLevel(logging.CRITICAL + 1)
  try:
    yield
  finally:
    # Also after a read that succeeds: stragglers of an earlier failed read are collected here.
    time.sleep(0.2)  # let the remaining reads of a failed restore settle
    gc.collect()     # and their orphaned tasks be collected, here rather than later
    sys.excepthook, sys.unraisablehook, threading.excepthook = hooks
    asyncio_logger.setLevel(level)


TMP_MARK = ".orbax-checkpoint-tmp"  # orbax's temporary checkpoint folders


def _is_fault_noise(exc: Optional[BaseException]) -> bool:
  """What a save failing for lack of storage leaves behind besides its own error: the same fault
  reported again by its background writers, and their callbacks into a closed event loop."""
  return exc is not None and (errors.storage_cause(exc) is not None or "Event loop is closed" in str(exc)
                              or TMP_MARK in str(exc))


class _FaultNoiseFilter(logging.Filter):
  def filter(self, record):
    text = record.getMessage()
    if (any(w in text for w in errors.STORAGE_ERRNOS.values()) or "Event loop is closed" in text
        or TMP_MARK in text):  # an error about a save's temporary folder: the save failed
      return False
    return not (record.exc_info and _is_fault_noise(record.exc_info[1]))


def quiet_storage_fault_noise() -> None:
  """Drops (process-wide, once) the reports of a storage fault that orbax's and tensorstore's
  background threads print (hundreds of lines for one full disk); the fault itself reaches the
  job as an exception and is reported in one line. Anything else is printed as before."""
  if getattr(sys.excepthook, "_mae_jax_quiet", False):
    return
  for name in ("absl", "asyncio"):  # orbax logs through absl; orphaned tasks through asyncio
    logging.getLogger(name).addFilter(_FaultNoiseFilter())
  excepthook, unraisablehook, thread_hook = sys.excepthook, sys.unraisablehook, threading.excepthook

  def on_exception(kind, value, tb):  # also the main thread's: only tensorstore's callbacks muted
    if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
      excepthook(kind, value, tb)

  def on_unraisable(u):
    if not _is_fault_noise(u.exc_value):
      unraisablehook(u)

  def on_thread_exception(args):
    if not _is_fault_noise(args.exc_value):
      thread_hook(args)

  on_exception._mae_jax_quiet = True
  sys.excepthook, sys.unraisablehook, threading.excepthook = on_exception, on_unraisable, on_thread_exception
