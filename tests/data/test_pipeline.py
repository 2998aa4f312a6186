"""data/pipeline.py, the grain loader: determinism and exact resume, read threads, evaluation
batches, process slices, normalisation, where the train crop is resampled."""

import numpy as np
import pytest

from mae_jax import config_check, errors
from mae_jax.data import pipeline, sources

from conftest import tiny_config


def test_worker_count_from_the_cores():
  assert [pipeline.resolve_workers(-1, cores) for cores in (1, 2, 8, 96)] == [1, 1, 7, 32]
  assert pipeline.resolve_workers(0, 8) == 0 and pipeline.resolve_workers(5, 2) == 5


def _first_batches(loader_iter, n):
  return [next(loader_iter)["image"] for _ in range(n)]


def test_loader_is_deterministic_and_resumes_exactly(cifar_folder):
  c = tiny_config(cifar_folder)
  c.dataset.random_resized_crop, c.dataset.hflip = True, True
  src = sources.ImageFolderSource(cifar_folder, "test")
  make = lambda: iter(pipeline.make_loader(c.dataset, src, train=True, global_batch_size=8, seed=3))
  run_a = _first_batches(make(), 5)
  run_b = _first_batches(make(), 5)
  for a, b in zip(run_a, run_b):
    np.testing.assert_array_equal(a, b)
  assert run_a[0].shape == (8, 32, 32, 3) and run_a[0].dtype == np.uint8
  # Save the state after 2 batches; a new iterator restored from it yields batches 3..5.
  it = make()
  _first_batches(it, 2)
  state = it.get_state()
  resumed = make()
  resumed.set_state(state)
  for a, b in zip(run_a[2:], _first_batches(resumed, 3)):
    np.testing.assert_array_equal(a, b)
  other_seed = next(iter(pipeline.make_loader(c.dataset, src, train=True, global_batch_size=8, seed=4)))["image"]
  assert not np.array_equal(other_seed, run_a[0])


def test_the_stream_does_not_depend_on_the_read_threads(cifar_folder):
  c = tiny_config(cifar_folder)
  src = sources.ImageFolderSource(cifar_folder, "test")
  streams = []
  for threads in (0, 1, 3):
    c.dataset.read_threads = threads
    streams.append(_first_batches(iter(pipeline.make_loader(c.dataset, src, train=True, global_batch_size=8,
                                                        seed=3)), 3))
  for other in streams[1:]:
    for a, b in zip(streams[0], other):
      np.testing.assert_array_equal(a, b)
  assert pipeline.read_options(3).prefetch_buffer_size == 12  # not grain's 500 (see read_options)


def test_eval_batches_cover_every_example_once_in_order(cifar_folder):
  c = tiny_config(cifar_folder)
  c.dataset.num_workers = 0
  src = sources.ImageFolderSource(cifar_folder, "test")
  subset = [src[i] for i in range(13)]
  batches = list(pipeline.eval_batches(c.dataset, subset, 4, ("image", "label")))
  assert len(batches) == 4 and all(b["image"].shape == (4, 32, 32, 3) for b in batches)
  np.testing.assert_array_equal(np.concatenate([b["valid"] for b in batches]), [1] * 13 + [0] * 3)
  labels = np.concatenate([b["label"] for b in batches])[:13]
  np.testing.assert_array_equal(labels, [r["label"] for r in subset])
  np.testing.assert_array_equal(batches[0]["image"][1], pipeline.load_images(subset, [1], 32)[0])


def test_process_slices_split_evenly_and_cover_every_record_once(monkeypatch):
  seen = []
  for index in range(3):
    monkeypatch.setattr(pipeline.jax, "process_count", lambda: 3)
    monkeypatch.setattr(pipeline.jax, "process_index", lambda index=index: index)
    part = pipeline.ProcessSlice(list(range(10)))
    seen.append([part[i] for i in range(len(part))])
  assert seen == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]


def test_normalize_round_trip():
  x = np.arange(256, dtype=np.uint8).reshape(1, 4, 64, 1).repeat(3, -1)
  mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
  n = pipeline.normalize(x, mean, std)
  np.testing.assert_allclose(n[0, 0, 1], (1 / 255 - np.array(mean)) / np.array(std), rtol=1e-6)
  np.testing.assert_allclose(pipeline.denormalize(n, mean, std), x / 255.0, atol=1e-6)


def test_resize_on_is_checked_and_the_host_resamples_by_default(cifar_folder):
  c = tiny_config(cifar_folder)
  c.dataset.random_resized_crop = True
  assert c.dataset.resize_on == "host" and not pipeline.train_augment(c.dataset).resize_on_device
  c.dataset.resize_on = "device"
  assert pipeline.train_augment(c.dataset).resize_on_device
  c.finetune.random_resized_crop, c.finetune.randaug_num_ops = True, 2  # RandAugment: on the host
  assert not pipeline.train_augment(c.dataset, c.finetune, randaug=True).resize_on_device
  c.dataset.resize_on = "gpu"
  with pytest.raises(errors.ConfigError, match="dataset.resize_on='gpu' must be one of host, device"):
    config_check.validate(c)
  c.dataset.resize_on, c.dataset.interpolation = "device", "nearest"
  with pytest.raises(errors.ConfigError, match="use --config.dataset.resize_on=host"):
    config_check.validate(c)
