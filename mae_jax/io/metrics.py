"""Metrics: JSON lines (`workdir/metrics.jsonl`), TensorBoard events (`workdir/tb/`), a progress line.

Only process 0 writes. TensorBoard files come from tensorboardX, which needs no TensorFlow. In a
workdir on a bucket (gs://...), both files are uploaded whole (an object cannot be appended to): at
most every 30 s as rows arrive, and always before a checkpoint is saved and at the end.
"""

import datetime
import json
import os
import sys
import time
from typing import Callable, Optional

import jax
import numpy as np

from mae_jax.runtime import durable, paths

UPLOAD_EVERY_S = 30.0


def last_row(workdir: str, field: str = "loss") -> Optional[dict]:
  """The last row of `workdir`/metrics.jsonl that has `field` (None: no such row or no file)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not paths.exists(path):
    return None
  rows = [json.loads(line) for line in paths.read_text(path).splitlines() if line.strip()]
  rows = [r for r in rows if field in r]
  return rows[-1] if rows else None


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported without PyTorch: where torch is installed,
  tensorboardX imports it only to accept torch tensors (this writer logs floats), and that import
  adds 1.5-2.6 s to the start of every run on a 2-core machine."""
  if "torch" in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules["torch"] = None  # `import torch` raises ImportError while this is set
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules["torch"]
  return SummaryWriter


class MetricWriter:
  """Appends to `workdir/metrics.jsonl` and `workdir/tb/`.

  `keep_row(step)`, where given, filters the rows already in metrics.jsonl (a half-written last
  line is dropped too), and `purge_step` hides TensorBoard's events from that step on: a run
  resumed from its checkpoint at step S keeps the steps up to S and logs the later ones again,
  so that every step appears once.
  """

  def __init__(self, workdir: str, enabled: Optional[bool] = None,
               keep_row: Optional[Callable[[int], bool]] = None, purge_step: Optional[int] = None,
               wandb_config=None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = None
    self._jsonl = None
    self._wandb = None
    if self.enabled:
      paths.makedirs(workdir)
      path = os.path.join(workdir, "metrics.jsonl")
      if keep_row is not None and paths.exists(path):
        _filter_rows(path, keep_row)
      self._tb = _summary_writer_class()(os.path.join(workdir, "tb"), purge_step=purge_step)
      self._jsonl = _ObjectLog(path) if paths.is_remote(path) else open(path, "a")
      if wandb_config is not None and wandb_config.wandb_project is not None:
        from mae_jax.io.wandb_writer import WandbWriter
        self._wandb = WandbWriter(wandb_config, workdir)

  def write(self, step: int, metrics: dict) -> None:
    """Scalars go to a metrics.jsonl row (with its wall-clock time, seconds since the epoch) and to
    TensorBoard; images (H, W, 3 uint8 arrays) to TensorBoard's image tab."""
    if not self.enabled:
      return
    images = {k: v for k, v in metrics.items() if np.ndim(v) == 3}
    clean = {k: float(v) for k, v in metrics.items() if k not in images}
    if clean:
      self._jsonl.write(json.dumps({"step": int(step), **clean, "wall_time": round(time.time(), 3)}) + "\n")
      self._jsonl.flush()
    for k, v in clean.items():
      self._tb.add_scalar(k, v, int(step))
    for k, v in images.items():
      self._tb.add_image(k, np.asarray(v), int(step), dataformats="HWC")
    if not isinstance(self._jsonl, _ObjectLog):
      self._tb.flush()  # (on a bucket each flush uploads the whole file: sync does it)
    if self._wandb is not None:
      self._wandb.write(step, clean, images)

  def sync(self) -> None:
    """Flushes the rows written so far to the disk or the bucket (before a checkpoint is saved)."""
    if not self.enabled:
      return
    if isinstance(self._jsonl, _ObjectLog):
      self._jsonl.upload()
      self._tb.flush()
    else:
      os.fsync(self._jsonl.fileno())

  def close(self, quiet: bool = False):
    """Closes the files; `quiet` (after a failure, e.g. a full disk) drops errors closing them."""
    if not self.enabled:
      return
    for f in (self._jsonl, self._tb, self._wandb):
      if f is None:
        continue
      try:
        f.close()
      except Exception:
        if not quiet:
          raise


class _ObjectLog:
  """An append log kept as one object: the text so far is uploaded whole (`flush`: at most every
  UPLOAD_EVERY_S seconds; `upload`, `close`: now)."""

  def __init__(self, path: str):
    self.name = path
    self._text = paths.read_text(path) if paths.exists(path) else ""
    self._uploaded = time.monotonic()

  def write(self, text: str) -> None:
    self._text += text

  def flush(self) -> None:
    if time.monotonic() - self._uploaded >= UPLOAD_EVERY_S:
      self.upload()

  def upload(self) -> None:
    paths.write_bytes(self.name, self._text.encode())
    self._uploaded = time.monotonic()

  def close(self) -> None:
    self.upload()


def _filter_rows(path: str, keep_row: Callable[[int], bool]) -> None:
  """Rewrites metrics.jsonl (atomically) with the complete rows whose step `keep_row` keeps."""
  lines = paths.read_text(path).splitlines()
  kept = []
  for line in lines:
    try:
      row = json.loads(line)
    except json.JSONDecodeError:  # cut off by a crash while writing
      continue
    if keep_row(int(row.get("step", 0))):
      kept.append(line)
  if len(kept) == len(lines):
    return
  log(f"metrics.jsonl: dropped {len(lines) - len(kept)} rows that this run logs again (from past "
      "the checkpoint it resumes from, or an earlier evaluation of the same step)")
  durable.write_text(path, "".join(line + "\n" for line in kept))


class Progress:
  """Formats 'step 100/3900 | 409,600 images | epoch 8.19 | loss 0.4521 | lr 1.2e-04 | 2,345 img/s |
  ETA 0:12:34': steps are optimizer updates, each of `images_per_step` images."""

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
    parts = [f"step {step}/{self.total_steps}", f"{step * images_per_step:,} images", f"epoch {epoch:.2f}"]
    for k, v in metrics.items():
      parts.append(f"{k} {v:.2e}" if k == "lr" else f"{k} {v:.4f}")
    parts += [f"{steps_per_s * images_per_step:,.0f} img/s", f"ETA {eta}"]
    return " | ".join(parts)


def log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, file=sys.stdout, flush=True)
