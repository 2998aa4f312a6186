"""runtime/parallel.py: eight simulated devices, FSDP and two processes train as one device does."""

import functools
import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np

TESTS = pathlib.Path(__file__).resolve().parents[1]


def _run_script(cifar_folder, env_extra=None, args=()):
  return _run_script_cached(cifar_folder, tuple(sorted((env_extra or {}).items())), tuple(args))


@functools.lru_cache(maxsize=None)  # several tests compare against the same one-device run
def _run_script_cached(cifar_folder, env_extra, args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", **dict(env_extra)}
  out = subprocess.run([sys.executable, str(TESTS / "helpers" / "train_steps.py"), "--folder", cifar_folder,
                        *args], capture_output=True, text=True, env=env, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_eight_devices_match_one_device(cifar_folder):
  one = _run_script(cifar_folder)
  eight = _run_script(cifar_folder, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  assert one["devices"] == 1 and eight["devices"] == 8
  np.testing.assert_allclose(eight["losses"], one["losses"], rtol=2e-5)
  assert one["losses"][-1] != one["losses"][0]  # the steps did train
  assert eight["eval_labels"] == one["eval_labels"]
  np.testing.assert_allclose(eight["eval_feature_sum"], one["eval_feature_sum"], rtol=1e-4)


def test_fsdp_on_eight_devices_matches_one_device_and_splits_the_state(cifar_folder):
  from mae_jax.runtime import parallel
  one = _run_script(cifar_folder)
  fsdp = _run_script(cifar_folder, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
                     ["--fsdp"])
  np.testing.assert_allclose(fsdp["losses"], one["losses"], rtol=2e-5)
  split = 0
  for name, (shape, local) in fsdp["shards"].items():
    spec = parallel.fsdp_spec(tuple(shape), 8)
    expected = [n // 8 if axis == "data" else n for n, axis in zip(shape, tuple(spec) + (None,) * 8)]
    assert local == expected, (name, shape, local)
    split += local != shape
  # The tiny model's MLP kernels (16,384 elements) are split; smaller tensors are not.
  assert split == 4 and fsdp["shards"]["['encoder']['block0']['fc1']['kernel']"] == [[64, 256], [64, 32]]
  assert fsdp["shards"]["['encoder']['block0']['fc1']['bias']"] == [[256], [256]]
  np.testing.assert_allclose(fsdp["eval_feature_sum"], one["eval_feature_sum"], rtol=1e-4)


def test_accumulation_on_eight_devices_matches_one_device(cifar_folder):
  """2 micro-batches per step, accumulated per device and reduced once, with the state sharded
  over 8 devices: the losses of one device."""
  one = _run_script(cifar_folder, args=["--accum", "2"])
  eight = _run_script(cifar_folder, {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
                      ["--accum", "2", "--fsdp"])
  assert eight["devices"] == 8
  np.testing.assert_allclose(eight["losses"], one["losses"], rtol=2e-5)
  assert one["losses"][-1] != one["losses"][0]


def test_fsdp_splits_the_largest_divisible_dimension_of_large_tensors():
  from mae_jax.runtime.parallel import P, fsdp_spec
  assert fsdp_spec((768, 3072), 8) == P(None, "data")
  assert fsdp_spec((3072, 768), 8) == P("data", None)
  assert fsdp_spec((1000, 768), 16) == P(None, "data")   # 1000 is not divisible by 16
  assert fsdp_spec((1, 197, 768), 8) == P(None, None, "data")
  assert fsdp_spec((768,), 8) == P()                      # small: replicated
  assert fsdp_spec((999, 999), 8) == P()                  # nothing divides
  assert fsdp_spec((768, 3072), 1) == P()
  # Scanned layers: the layer axis is never split, and the size floor is one layer's.
  assert fsdp_spec((12, 768, 3072), 8, stacked=True) == P(None, None, "data")
  assert fsdp_spec((32, 1280), 8, stacked=True) == P(None)   # a layer norm per layer: replicated
  assert fsdp_spec((32, 1280), 8) == P(None, "data")         # what the stack alone would get
  assert fsdp_spec((48, 8, 100), 8) == P("data", None, None)  # only the 48 divides...
  assert fsdp_spec((48, 8, 100), 8, stacked=True) == P(None)   # ...but it counts layers


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process(cifar_folder):
  """Each process feeds its own rows of the 2 micro-batches of every step."""
  one = _run_script(cifar_folder, args=["--accum", "2"])
  port = _free_port()
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  procs = [subprocess.Popen([sys.executable, str(TESTS / "helpers" / "train_steps.py"), "--folder",
                             cifar_folder, "--num_processes", "2", "--process_id", str(i),
                             "--port", str(port), "--accum", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env) for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  two = json.loads(outs[0][0].strip().splitlines()[-1])
  assert two["processes"] == 2 and two["devices"] == 2
  np.testing.assert_allclose(two["losses"], one["losses"], rtol=2e-5)
  # Evaluation sees every image once, though the two shards differ in size.
  assert len(one["eval_labels"]) == 9 and two["eval_labels"] == one["eval_labels"]
  np.testing.assert_allclose(two["eval_feature_sum"], one["eval_feature_sum"], rtol=1e-4)
