"""A line now and then while a long pass runs (feature extraction, evaluation, writing shards),
so that a command working for minutes does not look hung."""

import datetime
import time

import jax


class PassProgress:
  """A line every `every_s` seconds while a pass over `total` items runs (on process 0):
  '<what>: 12,800/50,000 images, 0:01:20 left'."""

  def __init__(self, what: str, total: int, unit: str = "images", every_s: float = 30.0):
    self.what, self.total, self.unit, self.every_s = what, total, unit, every_s
    self._start = self._last = time.perf_counter()

  def update(self, done: int) -> None:
    now = time.perf_counter()
    if now - self._last < self.every_s or done >= self.total:
      return
    self._last = now
    left = datetime.timedelta(seconds=int((now - self._start) / max(done, 1) * (self.total - done)))
    if jax.process_index() == 0:
      print(f"{self.what}: {done:,}/{self.total:,} {self.unit}, {left} left", flush=True)
