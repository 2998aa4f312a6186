"""The training batches on their way to the devices: fetched ahead of the step that takes them,
with the loader position each one was read from (what a checkpoint records)."""

import collections
from typing import Optional

import jax
import numpy as np

from mae_jax.errors import LoaderError, UserError
from mae_jax.io.checkpoint_noise import failure_reason


class DeviceFeed:
  """The training batches, put on the devices `depth` ahead of the step that takes them.

  `fill()`, called once the step is dispatched, reads and sends the next batches while the step
  runs. The loader's position is remembered before each batch, so that a checkpoint (grain's
  handler calls get_state) records the next batch the step will take, not the last one fetched:
  resuming neither skips nor repeats a batch. With `group` K > 1 a step's batch is K consecutive
  loader batches (micro-batches) joined on the host: the loader's workers hold micro-batches, not
  whole accumulated batches.
  """

  def __init__(self, loader_iter, put, depth: int = 2, group: int = 1):
    self.loader_iter, self.put, self.depth, self.group = loader_iter, put, depth, group
    self.queue = collections.deque()  # (loader state before the batch, batch on device)
    self.failed_at = None  # the loader state before a fetch that failed

  def fill(self, remaining: Optional[int] = None):
    """Fetches up to `depth` batches ahead (at most `remaining`: none past the last step)."""
    want = self.depth if remaining is None else min(self.depth, remaining)
    while len(self.queue) < want:
      position = self.loader_iter.get_state()
      try:
        parts = [next(self.loader_iter) for _ in range(self.group)]
      except (StopIteration, UserError):
        raise
      except Exception as e:  # a worker process died, or grain failed otherwise
        self.failed_at = position  # the next batch the step takes: where a resume starts
        raise LoaderError(f"the data loader failed ({failure_reason(e)})") from e
      local = parts[0] if self.group == 1 else jax.tree.map(lambda *xs: np.concatenate(xs), *parts)
      self.queue.append((position, self.put(local)))

  def __next__(self):
    if not self.queue:
      self.fill()
    return self.queue.popleft()[1]

  def get_state(self):
    if self.queue:
      return self.queue[0][0]
    return self.failed_at if self.failed_at is not None else self.loader_iter.get_state()

  def set_state(self, state):
    self.queue.clear()
    self.loader_iter.set_state(state)

  def close(self) -> None:
    """Drops the batches fetched ahead and stops the loader's workers, freeing their shared memory
    now rather than at the interpreter's exit (where it would be reported as leaked)."""
    self.queue.clear()
    inner = getattr(self.loader_iter, "_iterator", None)  # grain's DataLoaderIterator has no close()
    if callable(getattr(inner, "close", None)):
      inner.close()

  def __getattr__(self, name):  # the rest of the loader iterator's interface (start_prefetch, ...)
    return getattr(self.loader_iter, name)
