"""Metrics: JSON lines (`workdir/metrics.jsonl`), TensorBoard events (`workdir/tb/`), a progress line.

Only process 0 writes. TensorBoard files come from tensorboardX, which needs no TensorFlow.
"""

import datetime
import json
import os
import sys
import time
from typing import Optional

import jax


class MetricWriter:

  def __init__(self, workdir: str, enabled: Optional[bool] = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = None
    self._jsonl = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tb"))
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")

  def write(self, step: int, metrics: dict) -> None:
    if not self.enabled:
      return
    clean = {k: float(v) for k, v in metrics.items()}
    self._jsonl.write(json.dumps({"step": int(step), **clean}) + "\n")
    self._jsonl.flush()
    for k, v in clean.items():
      self._tb.add_scalar(k, v, int(step))
    self._tb.flush()

  def close(self):
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


class Progress:
  """Formats 'step 100/3900 | epoch 2.56 | loss 0.4521 | lr 1.2e-04 | 2,345 img/s | ETA 0:12:34'."""

  def __init__(self, total_steps: int, start_step: int):
    self.total_steps = total_steps
    self._t = time.perf_counter()
    self._step = start_step

  def rate(self, step: int) -> float:
    """Steps per second since the last call."""
    now = time.perf_counter()
    rate = (step - self._step) / max(now - self._t, 1e-9)
    self._t, self._step = now, step
    return rate

  def line(self, step: int, epoch: float, steps_per_s: float, images_per_step: int, **metrics) -> str:
    eta = datetime.timedelta(seconds=int((self.total_steps - step) / max(steps_per_s, 1e-9)))
    parts = [f"step {step}/{self.total_steps}", f"epoch {epoch:.2f}"]
    for k, v in metrics.items():
      parts.append(f"{k} {v:.2e}" if k == "lr" else f"{k} {v:.4f}")
    parts += [f"{steps_per_s * images_per_step:,.0f} img/s", f"ETA {eta}"]
    return " | ".join(parts)


def log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, file=sys.stdout, flush=True)
