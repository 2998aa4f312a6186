"""train/device_feed.py: batches fetched ahead, and the loader position a checkpoint records."""

import numpy as np


def test_the_device_feed_checkpoints_the_next_batch_the_step_takes():
  from mae_jax.train import device_feed

  class Loader:  # a loader iterator whose position is the next value it yields
    def __init__(self):
      self.position = 0

    def __next__(self):
      self.position += 1
      return self.position - 1

    def get_state(self):
      return self.position

    def set_state(self, position):
      self.position = position

  feed = device_feed.DeviceFeed(Loader(), put=lambda x: x * 10, depth=2)
  assert next(feed) == 0
  feed.fill()
  assert feed.loader_iter.position == 3  # batches 1 and 2 already on their way to the devices
  assert feed.get_state() == 1           # a checkpoint resumes at batch 1, the next one taken
  assert [next(feed), next(feed)] == [10, 20]
  feed.set_state(1)
  assert next(feed) == 10 and feed.get_state() == 2
  # Grouped: a step's batch is 3 consecutive loader batches joined, and the checkpoint position
  # is that of the first of the next group.
  class Rows(Loader):
    def __next__(self):
      return {"image": np.array([super().__next__()])}
  grouped = device_feed.DeviceFeed(Rows(), put=lambda b: b["image"].tolist(), depth=2, group=3)
  assert next(grouped) == [0, 1, 2]
  grouped.fill()
  assert grouped.loader_iter.position == 9 and grouped.get_state() == 3
  assert next(grouped) == [3, 4, 5]
