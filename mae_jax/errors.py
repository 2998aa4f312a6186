"""The errors a user can fix. Each entry point catches `UserError` and prints its message in one
line (exit 2); anything else is a bug and keeps its traceback."""


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


class StopRequested(Exception):
  """Raised by the training loop after a SIGTERM/SIGINT, once the checkpoint is saved."""

  def __init__(self, signum: int, step: int):
    super().__init__(f"stopped by signal {signum} at step {step}")
    self.signum, self.step = signum, step
