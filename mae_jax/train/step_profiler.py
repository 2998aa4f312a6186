"""A jax.profiler trace of chosen training steps (`config.profile_start_step`), viewable in
TensorBoard's Profile tab or XProf. For a workdir in a bucket the trace is written to a local
folder, then uploaded."""

import os
import shutil
import tempfile
from typing import Optional

import jax

from mae_jax.io import metrics as metrics_lib
from mae_jax.runtime import paths


class StepProfiler:
  """A jax.profiler trace of steps `start` .. `start + count - 1` into workdir/profile (each step
  annotated with its number); a no-op with `start` None."""

  def __init__(self, workdir: str, start: Optional[int], count: int):
    self.folder, self.start, self.count, self.tracing = os.path.join(workdir, "profile"), start, count, False

  def before(self, step: int) -> None:
    if self.start is not None and step == self.start and jax.process_index() == 0:
      self._local = tempfile.mkdtemp(prefix="mae-jax-profile-") if paths.is_remote(self.folder) else self.folder
      jax.profiler.start_trace(self._local)
      self.tracing = True

  def after(self, step: int, state) -> None:
    if self.tracing and step == self.start + self.count - 1:
      jax.block_until_ready(state)  # the traced steps' device work, not only their dispatch
      self.stop()
      metrics_lib.log(f"profile of steps {self.start}-{step} in {self.folder}: tensorboard --logdir "
                      f"{self.folder} (Profile tab, with the xprof plugin)")

  def stop(self) -> None:
    if self.tracing:
      self.tracing = False
      jax.profiler.stop_trace()
      if self._local != self.folder:
        paths.upload_tree(self._local, self.folder)
        shutil.rmtree(self._local, ignore_errors=True)
