"""The errors a user can fix. Each entry point catches `UserError` and prints its message in one
line (exit 2); `FaultError`s (storage, a dying loader worker) also print one line, with their own
exit codes; anything else is a bug and keeps its traceback."""

import os
import re
from typing import Optional


class UserError(Exception):
  """A mistake in the input (config, data, checkpoint, workdir); the message says the fix."""


class ConfigError(UserError, ValueError):
  """A config value that cannot work; the message says which and how to fix it."""


class DataError(UserError, ValueError):
  """Data that cannot be read: a missing folder, a corrupt image."""


class CheckpointMismatchError(UserError, ValueError):
  """The workdir holds a checkpoint of another model."""


class CheckpointUnreadableError(UserError, ValueError):
  """No checkpoint of a workdir can be read."""


class WorkdirError(UserError, ValueError):
  """The workdir cannot be used: a file, not writable, or held by another run."""


class ConvertError(UserError, ValueError):
  """Weights that cannot be converted; the message says what is wrong and what to do."""


class LPIPSWeightsError(UserError, FileNotFoundError):
  """The LPIPS weights file is absent or of another network."""


class TargetError(UserError, ValueError):
  """An accelerator target (`--target`) that is unknown or cannot be compiled for."""


class NonFiniteError(UserError):
  """A step's loss or gradient was not finite (and config.skip_nonfinite is off)."""


class FaultError(Exception):
  """The machine failed the run, not the input: storage (a full disk, a read-only or failing file
  system) or a data-loader worker. The message names the cause and the checkpoint the same
  command resumes from; `exit_code` tells a scheduler what happened (sysexits.h)."""
  exit_code = 75  # EX_TEMPFAIL: running the same command again resumes


class StorageError(FaultError):
  """A write or read of the workdir failed in the file system (no space, read-only, I/O error)."""
  exit_code = 74  # EX_IOERR: fix the storage, then run the same command to resume


class LoaderError(FaultError):
  """The data loader failed (a worker process died); a checkpoint of the step reached was saved."""
  exit_code = 75


# errno values of a file system that cannot take (or give back) data, and their wording in
# messages of libraries that do not keep the OSError (tensorstore, under orbax).
STORAGE_ERRNOS = {28: "No space left on device", 30: "Read-only file system", 5: "Input/output error",
                  122: "Disk quota exceeded", 116: "Stale file handle"}


def storage_cause(e: BaseException, written: Optional[str] = None) -> Optional[str]:
  """'<cause>' or '<cause>: <path>' when `e` (or an exception it was raised from) is a storage
  fault; None otherwise. With `written`, the path being written, a failure of a writer that kept
  no errno (torch's) is a full disk when that file system has no space left."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS:
      return STORAGE_ERRNOS[e.errno] + (f": {e.filename}" if e.filename else "")
    text = str(e)
    for words in STORAGE_ERRNOS.values():
      if words.lower() in text.lower():
        path = re.search(r"[\"']((?:/|gs://)[^\"']+)[\"']", text)
        return words + (f": {path.group(1)}" if path else "")
    e = e.__cause__ or e.__context__
  if written is None:
    return None
  try:
    stat = os.statvfs(os.path.dirname(os.path.abspath(written)))
  except OSError:
    return None
  return STORAGE_ERRNOS[28] if stat.f_bavail == 0 else None


def storage_fault_message(cause: str, step: Optional[int] = None, checkpoint_dir: Optional[str] = None) -> str:
  """The line a storage fault ends a command with; for a training run (`checkpoint_dir` given),
  naming the checkpoint the same command resumes from."""
  if checkpoint_dir is None:
    return (f"storage fault ({cause}); the command stopped. Free space or repair the file system, "
            "then run the same command")
  where = (f"the last saved checkpoint is step {step} in {checkpoint_dir}" if step is not None
           else "no checkpoint was saved")
  return (f"storage fault ({cause}); the run stopped and {where}. Free space or repair the file "
          "system, then run the same command to resume")


class StopRequested(Exception):
  """Raised by the training loop after a SIGTERM/SIGHUP/SIGINT, once the checkpoint is saved."""

  def __init__(self, signum: int, step: int):
    super().__init__(f"stopped by signal {signum} at step {step}")
    self.signum, self.step = signum, step
