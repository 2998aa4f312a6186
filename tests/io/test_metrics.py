"""io/metrics.py: metrics rows carry their wall-clock time; figures reach TensorBoard's image tab."""

import glob
import json
import struct
import time

import numpy as np

from mae_jax.io import metrics


def _events(folder):
  """The Event records of the TensorBoard files in `folder` (TFRecord framing, read by hand)."""
  from tensorboardX.proto import event_pb2
  out = []
  for path in sorted(glob.glob(str(folder / "events.out.tfevents.*"))):
    data = open(path, "rb").read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event()
      event.ParseFromString(data[pos + 12:pos + 12 + length])
      out.append(event)
      pos += 12 + length + 4
  return out


def test_rows_carry_their_time_and_images_go_to_tensorboard(tmp_path):
  writer = metrics.MetricWriter(str(tmp_path), enabled=True)
  before = time.time()
  grid = np.zeros((20, 30, 3), np.uint8)
  grid[:, :10] = 255
  writer.write(7, {"loss": 0.5, "reconstruction": grid})
  writer.close()
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert len(rows) == 1 and rows[0]["step"] == 7 and rows[0]["loss"] == 0.5
  assert before - 1 <= rows[0]["wall_time"] <= time.time() + 1
  assert "reconstruction" not in rows[0]  # the image is not a number for the jsonl rows
  values = [(e.step, v.tag, v) for e in _events(tmp_path / "tb") for v in e.summary.value]
  assert (7, "loss") in [(s, t) for s, t, _ in values]
  image = next(v.image for s, t, v in values if t == "reconstruction" and s == 7)
  assert (image.height, image.width, image.colorspace) == (20, 30, 3)
  assert image.encoded_image_string.startswith(b"\x89PNG")
